#include "gateway/gateway_options.h"

#include <cstdio>
#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/status.h"
#include "text/chat_template.h"
#include "text/tokenizer.h"

namespace dmoe::gateway {
namespace {

constexpr const char* kName = kGatewayProgram;

absl::StatusOr<int64_t> IntIn(const common::Args& args, const char* name, int64_t lo, int64_t hi) {
  return args.IntIn(name, lo, hi, kName);
}

}  // namespace

void DeclareGatewayFlags(common::Args& args) {
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
      .Flag("idle-timeout-s", "S", "an idle keep-alive connection is closed after S seconds", "5")
      .Flag("request-timeout-s", "S", "deadline of one generation, seconds", "600")
      .Flag("max-tokens-limit", "N", "largest max_tokens accepted (routers also check the context)",
            "1048576")
      .Flag("poll-interval-ms", "MS", "how often routers' load is polled (GetLoad)", "200")
      .Flag("shutdown-grace-ms", "MS",
            "on SIGTERM/SIGINT, time given to requests in flight before they are cancelled",
            "5000");
}

common::Args GatewayArgs() {
  common::Args args =
      common::Args::ForProgram(kName,
                               "public API of disaggregated MoE inference: OpenAI-compatible HTTP "
                               "and a gRPC pass-through, load-balanced over routers");
  DeclareGatewayFlags(args);
  return args;
}

absl::Status GatewayMainOptions::Validate() const {
  if (gateway.routers.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(kName, ": --routers is empty"));
  }
  if (gateway.host.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(kName, ": --host is empty"));
  }
  if (!grpc_port_file.empty() && gateway.grpc_port < 0) {
    return absl::InvalidArgumentError(absl::StrCat(kName, ": --grpc-port-file needs --grpc-port"));
  }
  if (gateway.http.model_name.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(kName, ": --model-name is empty"));
  }
  return absl::OkStatus();
}

absl::StatusOr<GatewayMainOptions> GatewayOptionsFromFlags(const common::Args& args) {
  GatewayMainOptions c;
  GatewayOptions& g = c.gateway;
  for (absl::string_view s : absl::StrSplit(args.Str("routers"), ',', absl::SkipWhitespace())) {
    g.routers.emplace_back(s);
  }
  g.host = args.Str("host");
  g.http.model_name = args.Str("model-name");
  c.port_file = args.Str("port-file");
  c.grpc_port_file = args.Str("grpc-port-file");
  // The checks in the order the flags were always checked in.
  if (g.routers.empty() || g.host.empty()) return c.Validate();
  DMOE_ASSIGN_OR_RETURN(int64_t http_port, IntIn(args, "http-port", 0, 65535));
  g.http_port = static_cast<int>(http_port);
  if (args.Has("grpc-port")) {
    DMOE_ASSIGN_OR_RETURN(int64_t grpc_port, IntIn(args, "grpc-port", 0, 65535));
    g.grpc_port = static_cast<int>(grpc_port);
  }
  DMOE_RETURN_IF_ERROR(c.Validate());
  if (args.Has("tokenizer")) {
    absl::StatusOr<std::unique_ptr<text::Tokenizer>> tok =
        text::Tokenizer::Load(args.Str("tokenizer"));
    if (!tok.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(kName, ": --tokenizer: ", tok.status().message()));
    }
    g.http.tokenizer = *std::move(tok);
    if (g.http.tokenizer->chat_template().empty()) {
      g.http.chat_template_error = "tokenizer_config.json has no chat_template";
    } else if (absl::StatusOr<std::unique_ptr<text::ChatTemplate>> t =
                   text::ChatTemplate::Parse(g.http.tokenizer->chat_template());
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

}  // namespace dmoe::gateway
