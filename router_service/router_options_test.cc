#include "router_service/router_options.h"

#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace dmoe::router {
namespace {

absl::StatusOr<RouterOptions> Parse(std::vector<std::string> flags) {
  flags.insert(flags.begin(), "dmoe-router");
  std::vector<char*> argv;
  for (std::string& f : flags) argv.push_back(f.data());
  common::Args args = RouterArgs();
  if (absl::Status st = args.Parse(static_cast<int>(argv.size()), argv.data(), 1); !st.ok()) {
    return st;
  }
  return RouterOptionsFromFlags(args);
}

std::string Error(std::vector<std::string> flags) {
  flags.insert(flags.begin(), {"--model", "m"});
  absl::StatusOr<RouterOptions> o = Parse(std::move(flags));
  if (o.ok()) return "ok";
  EXPECT_EQ(o.status().code(), absl::StatusCode::kInvalidArgument);
  return std::string(o.status().message());
}

TEST(RouterOptionsTest, UsageNamesTheProgram) {
  const std::string usage = RouterArgs().Usage();
  EXPECT_EQ(usage.rfind("usage: dmoe-router [flags]\n  router of disaggregated MoE inference", 0),
            0u)
      << usage;
  EXPECT_NE(usage.find("  --model DIR                  checkpoint directory (config.json + "
                       "*.safetensors) (required)\n"),
            std::string::npos)
      << usage;
  EXPECT_NE(usage.find("  --controller                 run the placement controller"),
            std::string::npos);
  EXPECT_NE(usage.find("[default: 50051]"), std::string::npos);
}

TEST(RouterOptionsTest, Defaults) {
  absl::StatusOr<RouterOptions> o = Parse({"--model", "m"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->model, "m");
  EXPECT_TRUE(o->experts.empty());
  EXPECT_EQ(o->placement, "");
  EXPECT_EQ(o->shared, place::SharedDuty::kExpertServers);
  EXPECT_EQ(o->host, "127.0.0.1");
  EXPECT_EQ(o->port, 50051);
  EXPECT_EQ(o->compute, core::ComputeType::kBF16);
  EXPECT_EQ(o->wire, "auto");
  EXPECT_TRUE(o->per_assignment);
  EXPECT_EQ(o->threads, 0);
  EXPECT_EQ(o->sched.kv_cache_bytes, size_t{1} << 30);
  EXPECT_EQ(o->sched.kv_block_tokens, 32);
  EXPECT_EQ(o->sched.kv_admission, KvAdmission::kPaged);
  EXPECT_TRUE(o->sched.prefix_cache);
  EXPECT_EQ(o->sched.kv_dtype, core::KvDtype::kF16) << "auto with --dtype bf16";
  EXPECT_EQ(o->sched.max_batch_tokens, 2048);
  EXPECT_EQ(o->sched.max_queue, 256);
  EXPECT_EQ(o->micro_batches, 2);
  EXPECT_EQ(o->expert_deadline_ms, 10000);
  EXPECT_EQ(o->grace_ms, 5000);
  EXPECT_EQ(o->metrics_host, "127.0.0.1");
  EXPECT_EQ(o->metrics_port, 9190);
  EXPECT_FALSE(o->metrics_port_explicit);
  EXPECT_TRUE(o->per_expert_metrics);
  EXPECT_EQ(o->window.window, absl::Seconds(60));
  EXPECT_EQ(o->window.mode, LoadWindowOptions::Mode::kSliding);
  EXPECT_FALSE(o->controller);
  EXPECT_EQ(o->controller_router, "");
  EXPECT_EQ(o->control.slots_per_server, 0);
  EXPECT_TRUE(o->control.auto_rebalance);
  EXPECT_DOUBLE_EQ(o->control.trigger, 1.25);
  EXPECT_DOUBLE_EQ(o->control.hysteresis, 0.05);
  EXPECT_DOUBLE_EQ(o->control.min_gain, 0.05);
  EXPECT_DOUBLE_EQ(o->control.balance_slack, 0.02);
  EXPECT_DOUBLE_EQ(o->control.min_tokens, 256);
  EXPECT_EQ(o->control.sustain, absl::Seconds(10));
  EXPECT_EQ(o->control.min_interval, absl::Seconds(60));
  EXPECT_EQ(o->control.lost_after, absl::Seconds(30));
  EXPECT_EQ(o->control.num_groups, 0);
  EXPECT_EQ(o->control.num_nodes, 0);
  EXPECT_TRUE(o->gate_bias.empty());
  EXPECT_TRUE(o->Validate().ok());
}

TEST(RouterOptionsTest, Values) {
  absl::StatusOr<RouterOptions> o = Parse({"--model",
                                           "m",
                                           "--experts",
                                           "a:1, b:2",
                                           "--controller",
                                           "--rebalance",
                                           "manual",
                                           "--dtype",
                                           "f32",
                                           "--combine",
                                           "per-server",
                                           "--wire-dtype",
                                           "fp8",
                                           "--shared-expert",
                                           "router",
                                           "--load-window-mode",
                                           "ema",
                                           "--gate-bias-for-testing",
                                           "3:1.5,0:-2",
                                           "--rebalance-threshold",
                                           "2",
                                           "--metrics-port",
                                           "0"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->experts, (std::vector<std::string>{"a:1", " b:2"}));
  EXPECT_TRUE(o->controller);
  EXPECT_FALSE(o->control.auto_rebalance);
  EXPECT_EQ(o->compute, core::ComputeType::kF32);
  EXPECT_EQ(o->expert_weights, core::ComputeType::kF32);  // auto = --dtype
  EXPECT_FALSE(o->per_assignment);
  EXPECT_EQ(o->wire, "fp8");
  EXPECT_EQ(o->shared, place::SharedDuty::kRouter);
  EXPECT_EQ(o->window.mode, LoadWindowOptions::Mode::kEma);
  ASSERT_EQ(o->gate_bias.size(), 2u);
  EXPECT_EQ(o->gate_bias[0], (std::pair<int64_t, float>{3, 1.5f}));
  EXPECT_EQ(o->gate_bias[1], (std::pair<int64_t, float>{0, -2.0f}));
  EXPECT_DOUBLE_EQ(o->control.trigger, 2);
  EXPECT_TRUE(o->metrics_port_explicit);
  EXPECT_EQ(o->metrics_port, 0);

  absl::StatusOr<RouterOptions> f =
      Parse({"--model", "m", "--controller-router", "c:7", "--advertise", "me:1"});
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->controller_router, "c:7");
  EXPECT_EQ(f->advertise, "me:1");
  // --experts none = in-process.
  absl::StatusOr<RouterOptions> none = Parse({"--model", "m", "--experts", "none"});
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_TRUE(none->experts.empty());
}

TEST(RouterOptionsTest, CrossFlagRules) {
  EXPECT_EQ(Error({"--controller"}), "dmoe-router: --controller needs --experts");
  EXPECT_EQ(Error({"--placement", "p.json"}), "dmoe-router: --placement needs --experts");
  const std::string excl =
      "dmoe-router: --controller-router takes the placement and the expert servers from that "
      "router: give no --controller, --experts or --placement";
  EXPECT_EQ(Error({"--controller-router", "c:1", "--experts", "a:1"}), excl);
  EXPECT_EQ(Error({"--controller-router", "c:1", "--controller"}), excl);
  EXPECT_EQ(Error({"--controller-router", "c:1", "--experts", "a:1", "--placement", "p"}), excl);
  EXPECT_EQ(Error({"--controller-router", "c"}),
            "dmoe-router: --controller-router: 'c' is not HOST:PORT");
  EXPECT_EQ(Error({"--experts", "none,a:1"}),
            "dmoe-router: --experts: 'none' (compute the experts in-process) cannot be combined "
            "with expert server addresses");
  EXPECT_EQ(Error({"--experts", "a:1,b"}), "dmoe-router: --experts: 'b' is not HOST:PORT");
  EXPECT_EQ(Error({"--experts", "a:"}), "dmoe-router: --experts: 'a:' is not HOST:PORT");
}

TEST(RouterOptionsTest, BadValues) {
  EXPECT_EQ(Error({"--port", "65536"}), "dmoe-router: --port must be in [0, 65535], got 65536");
  EXPECT_EQ(Error({"--port", "p"}), "dmoe-router: --port must be an integer, got 'p'");
  EXPECT_EQ(Error({"--host="}), "dmoe-router: --host is empty");
  EXPECT_EQ(Error({"--metrics-host="}), "dmoe-router: --metrics-host is empty");
  EXPECT_EQ(Error({"--shared-expert", "gpu"}),
            "dmoe-router: --shared-expert must be expert or router, got 'gpu'");
  EXPECT_EQ(Error({"--dtype", "f16"}), "dmoe-router: --dtype must be f32 or bf16, got 'f16'");
  EXPECT_EQ(Error({"--expert-weights", "q4"}),
            "dmoe-router: --expert-weights must be auto, f32, bf16 or int8, got 'q4'");
  EXPECT_EQ(Error({"--wire-dtype", "int8"}),
            "dmoe-router: --wire-dtype must be auto, f32, bf16 or fp8, got 'int8'");
  EXPECT_EQ(Error({"--combine", "sum"}),
            "dmoe-router: --combine must be invariant or per-server, got 'sum'");
  EXPECT_EQ(Error({"--threads", "1025"}), "dmoe-router: --threads must be in [0, 1024], got 1025");
  EXPECT_EQ(Error({"--kv-admission", "greedy"}),
            "dmoe-router: --kv-admission must be paged or reserve, got 'greedy'");
  EXPECT_EQ(Error({"--kv-dtype", "fp16"}),
            "dmoe-router: --kv-dtype must be auto, f32, f16 or bf16, got 'fp16'");
  EXPECT_EQ(Error({"--prefix-cache", "maybe"}),
            "dmoe-router: --prefix-cache must be on or off, got 'maybe'");
  EXPECT_EQ(Error({"--kv-block-tokens", "0"}),
            "dmoe-router: --kv-block-tokens must be in [1, 4096], got 0");
  EXPECT_EQ(Error({"--micro-batches", "0"}),
            "dmoe-router: --micro-batches must be in [1, 64], got 0");
  EXPECT_EQ(Error({"--expert-metrics", "x"}),
            "dmoe-router: --expert-metrics must be per-expert or per-layer, got 'x'");
  EXPECT_EQ(Error({"--load-window-mode", "decay"}),
            "dmoe-router: --load-window-mode must be sliding or ema, got 'decay'");
  EXPECT_EQ(Error({"--rebalance", "never"}),
            "dmoe-router: --rebalance must be auto or manual, got 'never'");
  EXPECT_EQ(Error({"--rebalance-threshold", "1"}),
            "dmoe-router: --rebalance-threshold must be in [1.0001, 1e+06], got 1");
  EXPECT_EQ(Error({"--rebalance-slack", "x"}),
            "dmoe-router: --rebalance-slack must be a number, got 'x'");
  EXPECT_EQ(Error({"--server-lost-after-s", "0"}),
            "dmoe-router: --server-lost-after-s must be in [1, 86400], got 0");
  EXPECT_EQ(Error({"--gate-bias-for-testing", "3"}),
            "dmoe-router: --gate-bias-for-testing: '3' is not EXPERT:BIAS");
  EXPECT_EQ(Error({"--gate-bias-for-testing", "-1:2"}),
            "dmoe-router: --gate-bias-for-testing: '-1:2' is not EXPERT:BIAS");
}

TEST(RouterOptionsTest, ValidateOnAStruct) {
  RouterOptions o;
  EXPECT_TRUE(o.Validate().ok());
  o.controller = true;
  EXPECT_EQ(o.Validate().message(), "dmoe-router: --controller needs --experts");
  o.experts = {"a:1"};
  EXPECT_TRUE(o.Validate().ok());
  o.controller_router = "c:1";
  EXPECT_EQ(o.Validate().message(),
            "dmoe-router: --controller-router takes the placement and the expert servers from "
            "that router: give no --controller, --experts or --placement");
  o = RouterOptions();
  o.placement = "p.json";
  EXPECT_EQ(o.Validate().message(), "dmoe-router: --placement needs --experts");
}

}  // namespace
}  // namespace dmoe::router
