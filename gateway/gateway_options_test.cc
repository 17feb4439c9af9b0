#include "gateway/gateway_options.h"

#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace dmoe::gateway {
namespace {

// Parses `flags` as dmoe-gateway's command line.
absl::StatusOr<GatewayMainOptions> Parse(std::vector<std::string> flags) {
  flags.insert(flags.begin(), "dmoe-gateway");
  std::vector<char*> argv;
  for (std::string& f : flags) argv.push_back(f.data());
  common::Args args = GatewayArgs();
  if (absl::Status st = args.Parse(static_cast<int>(argv.size()), argv.data(), 1); !st.ok()) {
    return st;
  }
  return GatewayOptionsFromFlags(args);
}

std::string Error(std::vector<std::string> flags) {
  absl::StatusOr<GatewayMainOptions> o = Parse(std::move(flags));
  if (o.ok()) return "ok";
  EXPECT_EQ(o.status().code(), absl::StatusCode::kInvalidArgument);
  return std::string(o.status().message());
}

TEST(GatewayOptionsTest, UsageNamesTheProgram) {
  const std::string usage = GatewayArgs().Usage();
  EXPECT_EQ(usage.rfind("usage: dmoe-gateway [flags]\n  public API of disaggregated MoE", 0), 0u)
      << usage;
  EXPECT_NE(usage.find("  --routers HOST:PORT,...      routers to send generations to, "
                       "comma-separated (required)\n"),
            std::string::npos)
      << usage;
  EXPECT_NE(usage.find("[default: 8000]"), std::string::npos);
}

TEST(GatewayOptionsTest, Defaults) {
  absl::StatusOr<GatewayMainOptions> o = Parse({"--routers", "a:1, b:2"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->gateway.routers, (std::vector<std::string>{"a:1", " b:2"}));
  EXPECT_EQ(o->gateway.host, "127.0.0.1");
  EXPECT_EQ(o->gateway.http_port, 8000);
  EXPECT_EQ(o->gateway.grpc_port, -1);
  EXPECT_EQ(o->gateway.http.model_name, "dmoe");
  EXPECT_EQ(o->gateway.http.tokenizer, nullptr);
  EXPECT_EQ(o->gateway.http.max_body_bytes, 8388608u);
  EXPECT_EQ(o->gateway.max_inflight, 256);
  EXPECT_EQ(o->gateway.http.threads, 0);
  EXPECT_EQ(o->gateway.http.max_connections, 4096u);
  EXPECT_EQ(o->gateway.http.keep_alive_timeout, absl::Seconds(5));
  EXPECT_EQ(o->gateway.http.request_timeout, absl::Seconds(600));
  EXPECT_EQ(o->gateway.http.max_tokens_limit, 1048576u);
  EXPECT_EQ(o->gateway.poll_interval, absl::Milliseconds(200));
  EXPECT_EQ(o->grace_ms, 5000);
  EXPECT_EQ(o->port_file, "");
  EXPECT_EQ(o->grpc_port_file, "");
  EXPECT_TRUE(o->Validate().ok());
}

TEST(GatewayOptionsTest, Values) {
  absl::StatusOr<GatewayMainOptions> o =
      Parse({"--routers=r:9", "--http-port=0", "--grpc-port", "7001", "--grpc-port-file", "g",
             "--port-file", "p", "--max-inflight", "3", "--poll-interval-ms", "10",
             "--shutdown-grace-ms", "0", "--model-name", "m"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->gateway.http_port, 0);
  EXPECT_EQ(o->gateway.grpc_port, 7001);
  EXPECT_EQ(o->grpc_port_file, "g");
  EXPECT_EQ(o->port_file, "p");
  EXPECT_EQ(o->gateway.max_inflight, 3);
  EXPECT_EQ(o->gateway.poll_interval, absl::Milliseconds(10));
  EXPECT_EQ(o->grace_ms, 0);
  EXPECT_EQ(o->gateway.http.model_name, "m");
}

TEST(GatewayOptionsTest, Errors) {
  EXPECT_EQ(Error({}), "dmoe-gateway: --routers is required (see --help)");
  EXPECT_EQ(Error({"--routers", ","}), "dmoe-gateway: --routers is empty");
  EXPECT_EQ(Error({"--routers", "a:1", "--host="}), "dmoe-gateway: --host is empty");
  EXPECT_EQ(Error({"--routers", "a:1", "--http-port", "65536"}),
            "dmoe-gateway: --http-port must be in [0, 65535], got 65536");
  EXPECT_EQ(Error({"--routers", "a:1", "--http-port", "x"}),
            "dmoe-gateway: --http-port must be an integer, got 'x'");
  EXPECT_EQ(Error({"--routers", "a:1", "--grpc-port", "-1"}),
            "dmoe-gateway: --grpc-port must be in [0, 65535], got -1");
  EXPECT_EQ(Error({"--routers", "a:1", "--grpc-port-file", "f"}),
            "dmoe-gateway: --grpc-port-file needs --grpc-port");
  EXPECT_EQ(Error({"--routers", "a:1", "--model-name="}), "dmoe-gateway: --model-name is empty");
  EXPECT_EQ(Error({"--routers", "a:1", "--max-body-bytes", "1023"}),
            "dmoe-gateway: --max-body-bytes must be in [1024, 4294967296], got 1023");
  EXPECT_EQ(Error({"--routers", "a:1", "--max-inflight", "0"}),
            "dmoe-gateway: --max-inflight must be in [1, 100000], got 0");
  EXPECT_EQ(Error({"--routers", "a:1", "--poll-interval-ms", "9"}),
            "dmoe-gateway: --poll-interval-ms must be in [10, 60000], got 9");
  EXPECT_EQ(Error({"--routers", "a:1", "--shutdown-grace-ms", "-1"}),
            "dmoe-gateway: --shutdown-grace-ms must be in [0, 3600000], got -1");
  EXPECT_EQ(Error({"--routers", "a:1", "--nope"}),
            "dmoe-gateway: unknown flag --nope (see --help)");
  const std::string tok = Error({"--routers", "a:1", "--tokenizer", "/nonexistent-dir"});
  EXPECT_EQ(tok.rfind("dmoe-gateway: --tokenizer: ", 0), 0u) << tok;
}

TEST(GatewayOptionsTest, ValidateChecksCrossFlagRules) {
  GatewayMainOptions o;
  o.gateway.routers = {"a:1"};
  o.gateway.host = "h";
  o.gateway.http.model_name = "m";
  EXPECT_TRUE(o.Validate().ok());
  o.grpc_port_file = "f";
  EXPECT_EQ(o.Validate().message(), "dmoe-gateway: --grpc-port-file needs --grpc-port");
  o.gateway.grpc_port = 0;
  EXPECT_TRUE(o.Validate().ok());
  o.gateway.routers.clear();
  EXPECT_EQ(o.Validate().message(), "dmoe-gateway: --routers is empty");
}

TEST(GatewayOptionsTest, HelpIsFoundAnywhere) {
  std::vector<std::string> flags = {"dmoe-gateway", "--bogus", "-h"};
  std::vector<char*> argv;
  for (std::string& f : flags) argv.push_back(f.data());
  EXPECT_TRUE(common::Args::HelpAsked(3, argv.data(), 1));
  EXPECT_FALSE(common::Args::HelpAsked(2, argv.data(), 1));
}

}  // namespace
}  // namespace dmoe::gateway
