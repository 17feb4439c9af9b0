#include "expert_service/expert_options.h"

#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace dmoe::expert {
namespace {

absl::StatusOr<ExpertMainOptions> Parse(std::vector<std::string> flags) {
  flags.insert(flags.begin(), "dmoe-expert");
  std::vector<char*> argv;
  for (std::string& f : flags) argv.push_back(f.data());
  common::Args args = ExpertArgs();
  if (absl::Status st = args.Parse(static_cast<int>(argv.size()), argv.data(), 1); !st.ok()) {
    return st;
  }
  return ExpertOptionsFromFlags(args);
}

std::string Error(std::vector<std::string> flags) {
  absl::StatusOr<ExpertMainOptions> o = Parse(std::move(flags));
  if (o.ok()) return "ok";
  EXPECT_EQ(o.status().code(), absl::StatusCode::kInvalidArgument);
  return std::string(o.status().message());
}

// A valid fixed-placement command line plus `more`.
std::vector<std::string> Fixed(std::vector<std::string> more = {}) {
  std::vector<std::string> f = {"--model", "m", "--server-index", "1", "--num-servers", "2"};
  f.insert(f.end(), more.begin(), more.end());
  return f;
}

TEST(ExpertOptionsTest, UsageNamesTheProgram) {
  const std::string usage = ExpertArgs().Usage();
  EXPECT_EQ(usage.rfind("usage: dmoe-expert [flags]\n  serves the routed experts", 0), 0u) << usage;
  EXPECT_NE(usage.find("  --backend cpu|cuda|auto      expert compute backend"), std::string::npos)
      << usage;
  EXPECT_NE(usage.find("  --force-leave                scale-in:"), std::string::npos) << usage;
}

TEST(ExpertOptionsTest, Defaults) {
  absl::StatusOr<ExpertMainOptions> o = Parse(Fixed());
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->model_dir, "m");
  EXPECT_EQ(o->server_index, 1);
  EXPECT_EQ(o->num_servers, 2);
  EXPECT_FALSE(o->placement_file.has_value());
  EXPECT_FALSE(o->joining());
  EXPECT_EQ(o->host, "127.0.0.1");
  EXPECT_EQ(o->port, 50061);
  EXPECT_EQ(o->compute, core::ComputeType::kBF16);
  EXPECT_EQ(o->backend, core::BackendKind::kCpu);
  EXPECT_EQ(o->threads, 0);
  EXPECT_EQ(o->max_queue, 256);
  EXPECT_EQ(o->max_batch_tokens, 8192);
  EXPECT_EQ(o->drain_s, 30);
  EXPECT_EQ(o->echo_port, 0);
  EXPECT_FALSE(o->raw_echo());
  EXPECT_EQ(o->metrics_host, "127.0.0.1");
  EXPECT_EQ(o->metrics_port, 9191);
  EXPECT_FALSE(o->metrics_port_given);
  EXPECT_TRUE(o->per_expert_metrics);
  EXPECT_EQ(o->leave_s, 0);
  EXPECT_FALSE(o->force_leave);
  EXPECT_TRUE(o->Validate().ok());

  ExpertServerOptions s = ToServerOptions(*o, place::Placement());
  EXPECT_EQ(s.model_dir, "m");
  EXPECT_EQ(s.server_index, 1);
  EXPECT_FALSE(s.start_empty);
  EXPECT_EQ(s.max_queue, 256u);
  EXPECT_EQ(s.max_batch_tokens, 8192);
  EXPECT_EQ(s.backend, core::BackendKind::kCpu);
}

TEST(ExpertOptionsTest, ExpertWeightsInt8) {
  absl::StatusOr<ExpertMainOptions> o = Parse(Fixed({"--expert-weights", "int8"}));
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->compute, core::ComputeType::kInt8);
  EXPECT_EQ(ToServerOptions(*o, place::Placement()).compute, core::ComputeType::kInt8);
}

TEST(ExpertOptionsTest, JoinDefaultsAndValues) {
  absl::StatusOr<ExpertMainOptions> o = Parse(
      {"--model", "m", "--join", "r:1", "--dtype", "f32", "--backend", "auto", "--expert-metrics",
       "per-layer", "--metrics-port", "0", "--raw-echo-port-file", "e", "--force-leave"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_TRUE(o->joining());
  EXPECT_EQ(*o->join, "r:1");
  EXPECT_EQ(o->leave_s, 60);  // default with --join
  EXPECT_TRUE(o->force_leave);
  EXPECT_EQ(o->compute, core::ComputeType::kF32);  // --expert-weights auto: --dtype
  EXPECT_EQ(o->backend, core::BackendKind::kAuto);
  EXPECT_FALSE(o->per_expert_metrics);
  EXPECT_TRUE(o->metrics_port_given);
  EXPECT_EQ(o->metrics_port, 0);
  EXPECT_TRUE(o->raw_echo());
  ExpertServerOptions s = ToServerOptions(*o, place::Placement());
  EXPECT_TRUE(s.start_empty);
  EXPECT_EQ(s.server_index, 0);
  EXPECT_EQ(AdvertiseAddress(*o, 4242), "127.0.0.1:4242");
  o->advertise = "x:1";
  EXPECT_EQ(AdvertiseAddress(*o, 4242), "x:1");
  // ExpertPlacement: nothing to read with --join.
  absl::StatusOr<place::Placement> p = ExpertPlacement(*o, core::ModelConfig());
  ASSERT_TRUE(p.ok()) << p.status();
}

TEST(ExpertOptionsTest, CrossFlagRules) {
  EXPECT_EQ(Error({"--model", "m", "--join", "r:1", "--num-servers", "2"}),
            "--join starts with no slots: give no --num-servers or --placement");
  EXPECT_EQ(Error({"--model", "m", "--join", "r:1", "--placement", "p.json"}),
            "--join starts with no slots: give no --num-servers or --placement");
  EXPECT_EQ(Error({"--model", "m", "--server-index", "0"}),
            "give exactly one of --num-servers and --placement (see --help)");
  EXPECT_EQ(
      Error({"--model", "m", "--server-index", "0", "--num-servers", "2", "--placement", "p.json"}),
      "give exactly one of --num-servers and --placement (see --help)");
  EXPECT_EQ(Error({"--model", "m", "--num-servers", "2"}),
            "--server-index is required (unless --join)");
  EXPECT_EQ(Error({"--num-servers", "2"}), "dmoe-expert: --model is required (see --help)");
}

TEST(ExpertOptionsTest, BadValues) {
  EXPECT_EQ(Error(Fixed({"--leave-timeout-s", "-1"})), "--leave-timeout-s must be >= 0, got -1");
  EXPECT_EQ(Error(Fixed({"--port", "x"})), "dmoe-expert: --port must be an integer, got 'x'");
  EXPECT_EQ(Error(Fixed({"--port", "70000"})), "--port must be in [0, 65535], got 70000");
  EXPECT_EQ(Error({"--model", "m", "--server-index", "0", "--num-servers", "0"}),
            "--num-servers must be >= 1, got 0");
  EXPECT_EQ(Error({"--model", "m", "--server-index", "-1", "--num-servers", "1"}),
            "--server-index must be >= 0, got -1");
  EXPECT_EQ(Error(Fixed({"--metrics-port", "-2"})), "--metrics-port must be in [0, 65535], got -2");
  EXPECT_EQ(Error(Fixed({"--metrics-host="})), "--metrics-host is empty");
  EXPECT_EQ(Error(Fixed({"--raw-echo-port", "65536"})),
            "--raw-echo-port must be in [0, 65535], got 65536");
  EXPECT_EQ(Error(Fixed({"--threads", "-1"})), "--threads must be >= 0, got -1");
  EXPECT_EQ(Error(Fixed({"--max-queue", "0"})), "--max-queue must be >= 1, got 0");
  EXPECT_EQ(Error(Fixed({"--max-batch-tokens", "0"})), "--max-batch-tokens must be >= 1, got 0");
  EXPECT_EQ(Error(Fixed({"--drain-timeout-s", "-5"})), "--drain-timeout-s must be >= 0, got -5");
  EXPECT_EQ(Error(Fixed({"--expert-metrics", "all"})),
            "--expert-metrics must be per-expert or per-layer, got 'all'");
  EXPECT_EQ(Error(Fixed({"--dtype", "fp8"})), "--dtype must be f32 or bf16, got 'fp8'");
  EXPECT_EQ(Error(Fixed({"--expert-weights", "int4"})),
            "--expert-weights must be auto, f32, bf16 or int8, got 'int4'");
  EXPECT_THAT(Error(Fixed({"--expert-weights", "fp8"})),
              ::testing::HasSubstr("not kept as FP8 yet"));
  EXPECT_EQ(Error(Fixed({"--backend", "gpu"})), "--backend must be cpu, cuda or auto, got 'gpu'");
}

TEST(ExpertOptionsTest, ValidateOnAStruct) {
  ExpertMainOptions o;
  o.server_index = 0;
  o.num_servers = 1;
  EXPECT_TRUE(o.Validate().ok());
  o.join = "r:1";
  EXPECT_EQ(o.Validate().message(),
            "--join starts with no slots: give no --num-servers or --placement");
  o.num_servers.reset();
  EXPECT_TRUE(o.Validate().ok());
  o.max_queue = 0;
  EXPECT_EQ(o.Validate().message(), "--max-queue must be >= 1, got 0");
}

}  // namespace
}  // namespace dmoe::expert
