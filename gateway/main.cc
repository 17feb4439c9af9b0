// dmoe-gateway: the public API. OpenAI-compatible HTTP (completions, chat
// completions with SSE streaming, models, health, metrics) and an optional gRPC
// RouterService pass-through, picking the least-loaded router per request.
//
// Exit codes: 0 after a graceful shutdown (SIGTERM/SIGINT) or --help, 1 when a
// port cannot be bound or the port file cannot be written, 2 for bad flags.
#include <signal.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "core/chat_template.h"
#include "core/status.h"
#include "core/tokenizer.h"
#include "gateway/gateway.h"
#include "tools/args.h"
#include "tools/service_main.h"

namespace dmoe::gateway {
namespace {

constexpr char kName[] = "dmoe-gateway";

void DeclareFlags(tools::Args& args) {
  args.Flag("routers", "HOST:PORT,...", "routers to send generations to, comma-separated",
            std::nullopt, true)
      .Flag("host", "HOST", "address to listen on (HTTP and gRPC)", "127.0.0.1")
      .Flag("http-port", "P", "HTTP port (0 = any free port)", "8000")
      .Flag("port-file", "PATH", "write the bound HTTP port to PATH once serving")
      .Flag("grpc-port", "P",
            "serve dmoe.v1.RouterService (pass-through) on P (0 = any free port); "
            "default: no gRPC server")
      .Flag("grpc-port-file", "PATH", "write the bound gRPC port to PATH once serving")
      .Flag("model-name", "NAME", "the model name clients see and must send", "dmoe")
      .Flag("tokenizer", "DIR",
            "the model's tokenizer.json and tokenizer_config.json (e.g. the model directory): "
            "text prompts, chat messages, text in answers, stop strings, /tokenize; default: "
            "token ids only")
      .Flag("max-body-bytes", "N", "largest accepted request body", "8388608")
      .Flag("max-inflight", "N", "generations in flight before HTTP 429 / RESOURCE_EXHAUSTED",
            "256")
      .Flag("threads", "N",
            "HTTP handler threads, one per request being answered; idle connections hold none "
            "(0 = max-inflight + 16)",
            "0")
      .Flag("max-connections", "N", "open HTTP connections before new ones get 503", "4096")
      .Flag("idle-timeout-s", "S", "an idle keep-alive connection is closed after S seconds",
            "5")
      .Flag("request-timeout-s", "S", "deadline of one generation, seconds", "600")
      .Flag("max-tokens-limit", "N", "largest max_tokens accepted (routers also check the context)",
            "1048576")
      .Flag("poll-interval-ms", "MS", "how often routers' load is polled (GetLoad)", "200")
      .Flag("shutdown-grace-ms", "MS",
            "on SIGTERM/SIGINT, time given to requests in flight before they are cancelled",
            "5000");
}

absl::StatusOr<int64_t> IntIn(const tools::Args& args, const char* name, int64_t lo, int64_t hi) {
  DMOE_ASSIGN_OR_RETURN(int64_t v, args.Int(name));
  if (v < lo || v > hi) {
    return absl::InvalidArgumentError(
        absl::StrCat(kName, ": --", name, " must be in [", lo, ", ", hi, "], got ", v));
  }
  return v;
}

struct Config {
  GatewayOptions gateway;
  std::string port_file, grpc_port_file;
  int64_t grace_ms = 0;
};

absl::StatusOr<Config> ReadFlags(const tools::Args& args) {
  Config c;
  GatewayOptions& g = c.gateway;
  for (absl::string_view s : absl::StrSplit(args.Str("routers"), ',', absl::SkipWhitespace())) {
    g.routers.emplace_back(s);
  }
  if (g.routers.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(kName, ": --routers is empty"));
  }
  g.host = args.Str("host");
  if (g.host.empty()) return absl::InvalidArgumentError(absl::StrCat(kName, ": --host is empty"));
  DMOE_ASSIGN_OR_RETURN(int64_t http_port, IntIn(args, "http-port", 0, 65535));
  g.http_port = static_cast<int>(http_port);
  c.port_file = args.Str("port-file");
  if (args.Has("grpc-port")) {
    DMOE_ASSIGN_OR_RETURN(int64_t grpc_port, IntIn(args, "grpc-port", 0, 65535));
    g.grpc_port = static_cast<int>(grpc_port);
  }
  c.grpc_port_file = args.Str("grpc-port-file");
  if (!c.grpc_port_file.empty() && g.grpc_port < 0) {
    return absl::InvalidArgumentError(absl::StrCat(kName, ": --grpc-port-file needs --grpc-port"));
  }
  g.http.model_name = args.Str("model-name");
  if (g.http.model_name.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(kName, ": --model-name is empty"));
  }
  if (args.Has("tokenizer")) {
    absl::StatusOr<std::unique_ptr<core::Tokenizer>> tok =
        core::Tokenizer::Load(args.Str("tokenizer"));
    if (!tok.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(kName, ": --tokenizer: ", tok.status().message()));
    }
    g.http.tokenizer = *std::move(tok);
    if (g.http.tokenizer->chat_template().empty()) {
      g.http.chat_template_error = "tokenizer_config.json has no chat_template";
    } else if (absl::StatusOr<std::unique_ptr<core::ChatTemplate>> t =
                   core::ChatTemplate::Parse(g.http.tokenizer->chat_template());
               t.ok()) {
      g.http.chat_template = *std::move(t);
    } else {
      // Completions still work; chat requests with text get this reason (501).
      g.http.chat_template_error = std::string(t.status().message());
      std::fprintf(stderr, "%s: warning: chat template not usable: %s\n", kName,
                   g.http.chat_template_error.c_str());
    }
  }
  DMOE_ASSIGN_OR_RETURN(int64_t body, IntIn(args, "max-body-bytes", 1024, int64_t{1} << 32));
  g.http.max_body_bytes = static_cast<size_t>(body);
  DMOE_ASSIGN_OR_RETURN(int64_t inflight, IntIn(args, "max-inflight", 1, 100000));
  g.max_inflight = static_cast<int>(inflight);
  DMOE_ASSIGN_OR_RETURN(int64_t threads, IntIn(args, "threads", 0, 100000));
  g.http.threads = static_cast<int>(threads);
  DMOE_ASSIGN_OR_RETURN(int64_t conns, IntIn(args, "max-connections", 1, 1000000));
  g.http.max_connections = static_cast<size_t>(conns);
  DMOE_ASSIGN_OR_RETURN(int64_t idle, IntIn(args, "idle-timeout-s", 1, 3600));
  g.http.keep_alive_timeout = absl::Seconds(idle);
  DMOE_ASSIGN_OR_RETURN(int64_t timeout, IntIn(args, "request-timeout-s", 1, 86400));
  g.http.request_timeout = absl::Seconds(timeout);
  DMOE_ASSIGN_OR_RETURN(int64_t max_tokens, IntIn(args, "max-tokens-limit", 1, 1 << 30));
  g.http.max_tokens_limit = static_cast<uint32_t>(max_tokens);
  DMOE_ASSIGN_OR_RETURN(int64_t poll, IntIn(args, "poll-interval-ms", 10, 60000));
  g.poll_interval = absl::Milliseconds(poll);
  DMOE_ASSIGN_OR_RETURN(c.grace_ms, IntIn(args, "shutdown-grace-ms", 0, 3600000));
  return c;
}

int Main(int argc, char** argv) {
  // Shutdown signals are taken with sigwait on this thread; every other thread
  // inherits the mask. A client that goes away must not kill the process.
  sigset_t signals = tools::BlockStopSignals();
  // No tcmalloc thread-cache cap here (unlike the router and expert servers):
  // in the 30-minute soaks the gateway stayed flat without it (+1.7%) and grew
  // +30% with it (285 threads sharing 8 MiB of thread caches).
  signal(SIGPIPE, SIG_IGN);

  tools::Args args(kName,
                   "public API of disaggregated MoE inference: OpenAI-compatible HTTP "
                   "and a gRPC pass-through, load-balanced over routers");
  DeclareFlags(args);
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      // Args::Usage names the `dmoe` CLI; this is a binary of its own.
      std::fputs(
          absl::StrReplaceAll(args.Usage(), {{"usage: dmoe dmoe-gateway", "usage: dmoe-gateway"}})
              .c_str(),
          stdout);
      return 0;
    }
  }
  if (absl::Status st = args.Parse(argc, argv, 1); !st.ok()) {
    std::fprintf(stderr, "%s\n", std::string(st.message()).c_str());
    return 2;
  }
  absl::StatusOr<Config> cfg = ReadFlags(args);
  if (!cfg.ok()) {
    std::fprintf(stderr, "%s\n", std::string(cfg.status().message()).c_str());
    return 2;
  }
  absl::StatusOr<std::unique_ptr<Gateway>> gw = Gateway::Start(cfg->gateway);
  if (!gw.ok()) {
    std::fprintf(stderr, "%s: %s\n", kName, std::string(gw.status().message()).c_str());
    return gw.status().code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  for (const auto& [path, port] : {std::pair{cfg->port_file, (*gw)->http_port()},
                                   std::pair{cfg->grpc_port_file, (*gw)->grpc_port()}}) {
    if (path.empty()) continue;
    if (absl::Status st = tools::WritePortFile(path, port); !st.ok()) {
      std::fprintf(stderr, "%s: %s\n", kName, std::string(st.message()).c_str());
      return 1;
    }
  }
  std::fprintf(stderr, "%s: HTTP on %s:%d", kName, cfg->gateway.host.c_str(), (*gw)->http_port());
  if ((*gw)->grpc_port() > 0) std::fprintf(stderr, ", gRPC on port %d", (*gw)->grpc_port());
  std::fprintf(stderr, "; %d of %zu routers healthy\n", (*gw)->routers().HealthyCount(),
               cfg->gateway.routers.size());

  int sig = 0;
  sigwait(&signals, &sig);
  std::fprintf(stderr, "%s: %s, shutting down (grace %lld ms)\n", kName,
               sig == SIGTERM ? "SIGTERM" : "SIGINT", static_cast<long long>(cfg->grace_ms));
  (*gw)->Shutdown(absl::Milliseconds(cfg->grace_ms));
  gw->reset();
  std::fprintf(stderr, "%s: stopped\n", kName);
  return 0;
}

}  // namespace
}  // namespace dmoe::gateway

int main(int argc, char** argv) { return dmoe::gateway::Main(argc, argv); }
