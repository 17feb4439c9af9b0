#include "gateway/http_server.h"

#include <atomic>
#include <chrono>
#include <limits>
#include <optional>
#include <sstream>
#include <thread>
#include <utility>
#include <vector>

#include "absl/random/random.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/http1/request_parser.h"
#include "common/http1/server.h"
#include "gateway/generation.h"
#include "gateway/internal/http_errors.h"
#include "gateway/openai_protocol.h"
#include "gateway/text_output.h"
#include "prometheus/text_serializer.h"

namespace dmoe::gateway {
namespace {

using ojson = nlohmann::ordered_json;

constexpr char kCompletions[] = "/v1/completions";
constexpr char kChat[] = "/v1/chat/completions";
constexpr char kJson[] = "application/json";
constexpr char kTokenize[] = "/tokenize";
constexpr char kDetokenize[] = "/detokenize";

// Bounded label values for the metrics: the route, never the raw path.
std::string EndpointOf(const std::string& path) {
  for (const char* e :
       {kCompletions, kChat, kTokenize, kDetokenize, "/v1/models", "/health", "/metrics"}) {
    if (path == e) return e;
  }
  if (absl::StartsWith(path, "/v1/models/")) return "/v1/models/{id}";
  return "other";
}

// The methods a routed path takes (its Allow header), or nullptr for a path
// that has no route. HEAD is served by the GET handlers.
const char* AllowedMethods(const std::string& path) {
  const std::string endpoint = EndpointOf(path);
  for (const char* post : {kCompletions, kChat, kTokenize, kDetokenize}) {
    if (endpoint == post) return "POST";
  }
  // /v1/models/ alone has no route: the pattern needs an id.
  if (endpoint == "other" || path == "/v1/models/") return nullptr;
  return "GET, HEAD";
}

bool Takes(const char* allow, const std::string& method) {
  for (absl::string_view m : absl::StrSplit(allow, ", ")) {
    if (m == method) return true;
  }
  return false;
}

// Request methods of RFC 9110 (others are 501).
bool IsStandardMethod(const std::string& method) {
  for (const char* m :
       {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT"}) {
    if (method == m) return true;
  }
  return false;
}

// As ParseGenerateRequest names JSON types in its errors.
std::string JsonTypeName(const nlohmann::json& v) {
  if (v.is_number_integer()) return "integer";
  if (v.is_number_float()) return "number";
  return v.type_name();
}

std::string NewId(ApiKind kind) {
  thread_local absl::BitGen gen;
  static constexpr char kHex[] = "0123456789abcdef";
  std::string id = kind == ApiKind::kCompletion ? "cmpl-" : "chatcmpl-";
  for (int i = 0; i < 24; ++i) id += kHex[absl::Uniform(gen, 0, 16)];
  return id;
}

uint64_t RandomSeed() {
  thread_local absl::BitGen gen;
  return absl::Uniform<uint64_t>(gen);
}

using http1::Headers;
using http1::Responder;

// A JSON response; Retry-After on 429 and 503 (the client may retry soon).
void SendJson(Responder& r, int status, const ojson& body, Headers headers = {}) {
  headers.emplace_back("Content-Type", kJson);
  if (status == 429 || status == 503) headers.emplace_back("Retry-After", "1");
  r.Send(status, headers, Dump(body));
}

// Returns the HTTP status sent.
int SendError(Responder& r, const absl::Status& st, ApiKind kind = ApiKind::kCompletion,
              bool from_router = false) {
  const internal::HttpError e = internal::MapError(st, kind, from_router);
  SendJson(r, e.status, ErrorJson(st.message(), e.type, e.param, e.code));
  return e.status;
}

// Records one HTTP request's metrics once, when Finish is called or the record
// is dropped (a stream that ends in its resource releaser).
class RequestRecord {
 public:
  RequestRecord(GatewayMetrics& metrics, std::string endpoint)
      : metrics_(metrics), endpoint_(std::move(endpoint)), start_(absl::Now()) {}
  ~RequestRecord() { Finish(500); }  // no-op after Finish
  void Finish(int code) {
    if (done_.exchange(true)) return;
    metrics_.RecordHttp(endpoint_, code, absl::Now() - start_);
  }
  absl::Time start() const { return start_; }

 private:
  GatewayMetrics& metrics_;
  const std::string endpoint_;
  const absl::Time start_;
  std::atomic<bool> done_{false};
};

std::string FinishReason(const std::string& upstream, size_t tokens, uint32_t max_tokens) {
  if (!upstream.empty()) return upstream;
  return tokens >= max_tokens ? "length" : "stop";
}

// One streaming response: owns the generation, the in-flight slot and the
// metrics record; Pump writes the whole stream on the handler thread.
class SseStream {
 public:
  // `text` (may be null: no tokenizer) turns the tokens into the chunks' text.
  SseStream(std::unique_ptr<Generation> gen, InflightLimiter::Slot slot,
            std::shared_ptr<RequestRecord> record, GatewayMetrics& metrics, CompletionMeta meta,
            uint32_t max_tokens, absl::Duration poll, std::unique_ptr<TextOutput> text)
      : gen_(std::move(gen)),
        slot_(std::move(slot)),
        record_(std::move(record)),
        metrics_(metrics),
        meta_(std::move(meta)),
        max_tokens_(max_tokens),
        poll_(poll),
        text_(std::move(text)) {}

  ~SseStream() { Complete(500); }  // no-op when Pump completed

  // Streams after the status line: `first` is the event seen while it was
  // held (a token, or the end when `ended`).
  void Pump(Responder& r, std::optional<v1::GenerateResponse> first, bool ended) {
    ended_ok_ = ended;
    if (first.has_value() && !SendToken(r, *first)) return Disconnected();
    absl::Status end;
    while (!ended_ok_ && !Stopped()) {
      v1::GenerateResponse m;
      switch (gen_->Next(poll_, &m, &end)) {
        case Generation::Event::kTimeout:
          // A client that sent FIN may have gone or only half-closed: a
          // comment line (ignored by SSE clients) tells them apart, since
          // writing to a closed peer fails by the next check.
          switch (r.CheckPeer()) {
            case Responder::Peer::kGone:
              return Disconnected();
            case Responder::Peer::kHalfClosed:
              if (!Send(r, ": keep-alive\n\n")) return Disconnected();
              break;
            case Responder::Peer::kOpen:
              break;
          }
          continue;
        case Generation::Event::kToken:
          if (!SendToken(r, m)) return Disconnected();
          continue;
        case Generation::Event::kEnd:
          break;
      }
      break;
    }
    int code = 200;
    if (Stopped()) {
      gen_->Cancel();  // a stop string ended it: the router can free the sequence
      finish_reason_ = "stop";
    }
    if (ended_ok_ || end.ok() || Stopped()) {
      metrics_.AddPromptTokens(static_cast<double>(prompt_tokens_));
      const std::string rest = text_ != nullptr ? text_->Finish() : std::string();
      SendEvent(r, Dump(FinalChunkJson(meta_, FinishReason(finish_reason_, sent_, max_tokens_),
                                       prompt_tokens_, sent_, rest)));
    } else {
      // The status line is out: the error becomes an event (as OpenAI's).
      const internal::HttpError e = internal::MapError(end, meta_.kind, /*from_router=*/true);
      SendEvent(r, Dump(ErrorJson(end.message(), e.type, e.param, e.code)));
      code = e.status;
    }
    SendEvent(r, "[DONE]");
    // Before the terminating chunk: once the client has it, the request is
    // over.
    Complete(code);
    r.EndStream();
  }

 private:
  static bool Send(Responder& r, std::string_view data) { return r.Write(data); }
  static bool SendEvent(Responder& r, const std::string& data) {
    return r.Write(absl::StrCat("data: ", data, "\n\n"));
  }

  bool SendToken(Responder& r, const v1::GenerateResponse& m) {
    if (sent_ == 0) {
      metrics_.RecordTimeToFirstToken(absl::Now() - record_->start());
      prompt_tokens_ = m.prompt_tokens();
    }
    if (!m.finish_reason().empty()) finish_reason_ = m.finish_reason();
    const std::string text = text_ != nullptr ? text_->Push(m.token()) : std::string();
    const bool ok = SendEvent(r, Dump(TokenChunkJson(meta_, m.token(), sent_ == 0, text)));
    if (ok) ++sent_;
    return ok;
  }

  bool Stopped() const { return text_ != nullptr && text_->stopped(); }

  void Disconnected() {
    gen_->Cancel();
    metrics_.RecordClientDisconnect();
    Complete(499);  // nginx's "client closed request", for the metrics only
  }

  // Records the request's metrics and gives back its in-flight slot, once.
  void Complete(int code) {
    if (completed_) return;
    completed_ = true;
    metrics_.AddGeneratedTokens(static_cast<double>(sent_));
    record_->Finish(code);
    slot_.Reset();
  }

  std::unique_ptr<Generation> gen_;
  InflightLimiter::Slot slot_;
  std::shared_ptr<RequestRecord> record_;
  GatewayMetrics& metrics_;
  const CompletionMeta meta_;
  const uint32_t max_tokens_;
  const absl::Duration poll_;
  const std::unique_ptr<TextOutput> text_;

  bool ended_ok_ = false;
  size_t sent_ = 0;
  int64_t prompt_tokens_ = 0;
  std::string finish_reason_;
  bool completed_ = false;
};

}  // namespace

class HttpServer::Impl {
 public:
  Impl(RouterPool& pool, InflightLimiter& limiter, GatewayMetrics& metrics,
       prometheus::Registry& registry, HttpServerOptions options)
      : pool_(pool),
        limiter_(limiter),
        metrics_(metrics),
        registry_(registry),
        options_(std::move(options)),
        server_(
            MakeServerOptions(),
            [this](const http1::Request& req, Responder& r) { Handle(req, r); },
            [this](int status, const std::string& message, const std::string& path) {
              return ServerError(status, message, path);
            }) {
    parse_.model_name = options_.model_name;
    parse_.max_tokens_limit = options_.max_tokens_limit;
    parse_.tokenizer = options_.tokenizer.get();
    parse_.chat_template = options_.chat_template.get();
    parse_.chat_template_error = options_.chat_template_error;
  }

  absl::StatusOr<int> Start(const std::string& host, int port) {
    absl::StatusOr<int> bound = server_.Start(host, port);
    if (!bound.ok())
      return absl::UnavailableError(absl::StrCat("HTTP: ", bound.status().message()));
    return bound;
  }

  void SetDraining() { draining_ = true; }

  void Stop() { server_.Stop(); }

 private:
  http1::ServerOptions MakeServerOptions() const {
    http1::ServerOptions o;
    o.limits.max_body_bytes = options_.max_body_bytes;
    o.threads = options_.threads > 0 ? options_.threads : limiter_.max() + 16;
    o.keep_alive_timeout = options_.keep_alive_timeout;
    o.read_timeout = options_.read_timeout;
    o.write_timeout = options_.write_timeout;
    o.max_connections = options_.max_connections;
    return o;
  }

  // The JSON body of a response the HTTP server makes itself (a request it
  // could not read, 408, 503 when full).
  http1::ErrorResponse ServerError(int status, const std::string& message,
                                   const std::string& path) {
    metrics_.RecordHttp(path.empty() ? "other" : EndpointOf(path), status, absl::ZeroDuration());
    std::string text = message;
    const char* code = "";
    if (status == 413) {
      text = absl::StrCat(message, " (--max-body-bytes)");
      code = "request_too_large";
    }
    http1::ErrorResponse r;
    r.headers = {{"Content-Type", kJson}};
    if (status == 503) r.headers.emplace_back("Retry-After", "1");
    r.body =
        Dump(ErrorJson(text, status >= 500 ? "server_error" : "invalid_request_error", "", code));
    return r;
  }

  void Handle(const http1::Request& req, Responder& r) {
    const std::string& path = req.path;
    if (!IsStandardMethod(req.method)) {
      // RFC 9110 §9.1: a method the server does not implement is 501.
      r.CloseAfter();
      SendJson(r, 501,
               ErrorJson(absl::StrCat("method ", req.method, " is not implemented"),
                         "invalid_request_error", "", "method_not_implemented"));
      metrics_.RecordHttp(EndpointOf(path), 501, absl::ZeroDuration());
      return;
    }
    const char* allow = AllowedMethods(path);
    if (allow == nullptr) {
      SendJson(r, 404,
               ErrorJson(absl::StrCat("no route for ", req.method, " ", path),
                         "invalid_request_error", "", "not_found"));
      metrics_.RecordHttp("other", 404, absl::ZeroDuration());
      return;
    }
    if (!Takes(allow, req.method)) {
      SendJson(r, 405,
               ErrorJson(absl::StrCat(path, " takes ", allow, ", not ", req.method),
                         "invalid_request_error", "", "method_not_allowed"),
               {{"Allow", allow}});
      metrics_.RecordHttp(EndpointOf(path), 405, absl::ZeroDuration());
      return;
    }
    const std::string endpoint = EndpointOf(path);
    if (endpoint == kCompletions) return Generate(ApiKind::kCompletion, req, r);
    if (endpoint == kChat) return Generate(ApiKind::kChatCompletion, req, r);
    RequestRecord record(metrics_, endpoint);
    int status = 200;
    if (endpoint == kTokenize) {
      status = Tokenize(req, r);
    } else if (endpoint == kDetokenize) {
      status = Detokenize(req, r);
    } else if (endpoint == "/v1/models") {
      ojson list;
      list["object"] = "list";
      list["data"] = ojson::array({ModelJson()});
      SendJson(r, 200, list);
    } else if (endpoint == "/v1/models/{id}") {
      std::string id;
      if (!http1::PercentDecode(std::string_view(path).substr(11), &id)) {
        id = path.substr(11);
      }
      if (id == options_.model_name) {
        SendJson(r, 200, ModelJson());
      } else {
        status = 404;
        SendJson(r, 404,
                 ErrorJson(absl::StrCat("model '", id, "' does not exist"), "invalid_request_error",
                           "model", "model_not_found"));
      }
    } else if (endpoint == "/health") {
      status = Health(r);
    } else {               // /metrics
      record.Finish(200);  // counted before serializing, so a scrape sees itself
      r.Send(200, {{"Content-Type", "text/plain; version=0.0.4; charset=utf-8"}},
             prometheus::TextSerializer().Serialize(registry_.Collect()));
    }
    record.Finish(status);
  }

  ojson ModelJson() const {
    ojson m;
    m["id"] = options_.model_name;
    m["object"] = "model";
    m["created"] = 0;
    m["owned_by"] = "dmoe";
    return m;
  }

  // Counts only: router addresses and errors are for operators (metrics,
  // logs), not for the public port.
  int Health(Responder& r) {
    const int healthy = pool_.HealthyCount();
    ojson j;
    j["status"] = draining_ ? "draining" : healthy > 0 ? "ok" : "unavailable";
    j["routers"] = healthy;
    j["routers_total"] = pool_.size();
    j["inflight"] = limiter_.current();
    const int status = !draining_ && healthy > 0 ? 200 : 503;
    SendJson(r, status, j);
    return status;
  }

  // POST /tokenize: {"prompt": text or ids, "add_special_tokens"} or
  // {"messages", "add_generation_prompt"}: the prompt tokens a generation would
  // get.
  int Tokenize(const http1::Request& req, Responder& r) {
    if (options_.tokenizer == nullptr) return SendError(r, NoTokenizer());
    nlohmann::json body = nlohmann::json::parse(req.body, nullptr, /*allow_exceptions=*/false);
    const bool chat = body.is_object() && body.contains("messages");
    const ApiKind kind = chat ? ApiKind::kChatCompletion : ApiKind::kCompletion;
    absl::StatusOr<ParsedRequest> parsed = ParseGenerateRequest(req.body, kind, parse_);
    if (!parsed.ok()) return SendError(r, parsed.status(), kind);
    const auto& ids = parsed->upstream.prompt_tokens();
    ojson j;
    j["count"] = ids.size();
    j["tokens"] = std::vector<int32_t>(ids.begin(), ids.end());
    SendJson(r, 200, j);
    return 200;
  }

  // POST /detokenize: {"tokens": [ids], "skip_special_tokens": false} ->
  // {"prompt"}.
  int Detokenize(const http1::Request& req, Responder& r) {
    if (options_.tokenizer == nullptr) return SendError(r, NoTokenizer());
    nlohmann::json body = nlohmann::json::parse(req.body, nullptr, /*allow_exceptions=*/false);
    if (!body.is_object() || !body.contains("tokens") || !body["tokens"].is_array()) {
      return SendError(r, InvalidParam("tokens", "tokens is required (a list of token ids)"));
    }
    std::vector<int32_t> ids;
    for (const auto& v : body["tokens"]) {
      if (!v.is_number_integer() || v.get<int64_t>() < 0 ||
          v.get<int64_t>() > std::numeric_limits<int32_t>::max()) {
        return SendError(
            r, InvalidParam("tokens", absl::StrCat("tokens: ", v.dump(), " is not a token id")));
      }
      ids.push_back(v.get<int32_t>());
    }
    // A boolean as ParseGenerateRequest checks them: null is the default.
    bool skip = false;
    if (auto it = body.find("skip_special_tokens"); it != body.end() && !it->is_null()) {
      if (!it->is_boolean()) {
        return SendError(r, InvalidParam("skip_special_tokens",
                                         absl::StrCat("skip_special_tokens must be a boolean, got ",
                                                      JsonTypeName(*it))));
      }
      skip = it->get<bool>();
    }
    absl::StatusOr<std::string> text = options_.tokenizer->Decode(ids, skip);
    if (!text.ok()) {
      return SendError(r,
                       InvalidParam("tokens", absl::StrCat("tokens: ", text.status().message())));
    }
    ojson j;
    j["prompt"] = *text;
    SendJson(r, 200, j);
    return 200;
  }

  static absl::Status NoTokenizer() {
    return absl::UnimplementedError(
        "this gateway has no tokenizer: start dmoe-gateway with --tokenizer "
        "DIR");
  }

  std::unique_ptr<TextOutput> NewTextOutput(const ParsedRequest& parsed) const {
    if (options_.tokenizer == nullptr) return nullptr;
    return std::make_unique<TextOutput>(*options_.tokenizer, parsed.stop_strings,
                                        parsed.skip_special_tokens);
  }

  void Generate(ApiKind kind, const http1::Request& req, Responder& r) {
    auto record = std::make_shared<RequestRecord>(metrics_, EndpointOf(req.path));
    auto fail = [&](const absl::Status& st, bool from_router = false) {
      record->Finish(SendError(r, st, kind, from_router));
    };
    if (draining_) return fail(absl::UnavailableError("gateway is shutting down"));
    InflightLimiter::Slot slot = limiter_.TryAcquire();
    if (!slot) {
      return fail(absl::ResourceExhaustedError(
          absl::StrCat("gateway at capacity: ", limiter_.max(),
                       " requests in flight (--max-inflight); retry later")));
    }
    if (const std::string* type = req.Header("content-type");
        type != nullptr && absl::StartsWithIgnoreCase(*type, "multipart/form-data")) {
      return fail(InvalidParam("", "request body must be JSON (Content-Type: application/json)"));
    }

    absl::StatusOr<ParsedRequest> parsed = ParseGenerateRequest(req.body, kind, parse_);
    if (!parsed.ok()) return fail(parsed.status());
    v1::GenerateRequest& up = parsed->upstream;
    if (!parsed->has_seed) up.mutable_sampling()->set_seed(RandomSeed());
    CompletionMeta meta;
    meta.kind = kind;
    meta.id = NewId(kind);
    meta.created = absl::ToUnixSeconds(absl::Now());
    meta.model = options_.model_name;
    up.set_request_id(meta.id);
    const uint32_t max_tokens = up.max_tokens();

    absl::StatusOr<std::unique_ptr<Generation>> gen =
        Generation::Start(pool_, std::move(up), record->start() + options_.request_timeout);
    if (!gen.ok()) return fail(gen.status(), /*from_router=*/true);

    std::unique_ptr<TextOutput> text = NewTextOutput(*parsed);
    if (!parsed->stream) {
      std::vector<int32_t> tokens;
      std::string finish;
      int64_t prompt_tokens = 0;
      absl::Status end;
      v1::GenerateResponse m;
      while (true) {
        const Generation::Event ev = (*gen)->Next(options_.disconnect_poll, &m, &end);
        if (ev == Generation::Event::kEnd) break;
        if (ev == Generation::Event::kTimeout) {
          // A reset connection (not a half-close: that client still reads)
          // cannot take the answer: free the router's sequence now.
          if (r.CheckPeer() == Responder::Peer::kGone) {
            (*gen)->Cancel();
            metrics_.RecordClientDisconnect();
            record->Finish(499);
            r.CloseAfter();
            return fail(absl::CancelledError("client closed the connection"));
          }
          continue;
        }
        if (tokens.empty()) {
          metrics_.RecordTimeToFirstToken(absl::Now() - record->start());
          prompt_tokens = m.prompt_tokens();
        }
        tokens.push_back(m.token());
        if (!m.finish_reason().empty()) finish = m.finish_reason();
        if (text != nullptr) {
          text->Push(m.token());
          if (text->stopped()) {
            (*gen)->Cancel();  // a stop string ended it: the router can free the sequence
            finish = "stop";
            break;
          }
        }
      }
      if (!end.ok() && (text == nullptr || !text->stopped())) {
        return fail(end, /*from_router=*/true);
      }
      if (text != nullptr) text->Finish();
      metrics_.AddPromptTokens(static_cast<double>(prompt_tokens));
      metrics_.AddGeneratedTokens(static_cast<double>(tokens.size()));
      SendJson(r, 200,
               ResponseJson(meta, tokens, FinishReason(finish, tokens.size(), max_tokens),
                            prompt_tokens, text != nullptr ? text->text() : ""));
      record->Finish(200);
      return;
    }

    // Streaming: hold the status line briefly for the first event, so that a
    // refusal (429, 400 from the router, 503) keeps its status.
    v1::GenerateResponse first;
    absl::Status end;
    const Generation::Event ev = (*gen)->Next(options_.header_hold, &first, &end);
    if (ev == Generation::Event::kEnd && !end.ok()) return fail(end, /*from_router=*/true);
    SseStream stream(*std::move(gen), std::move(slot), record, metrics_, meta, max_tokens,
                     options_.disconnect_poll, std::move(text));
    std::optional<v1::GenerateResponse> first_token;
    if (ev == Generation::Event::kToken) first_token = std::move(first);
    r.StartStream(200, {{"Content-Type", "text/event-stream"},
                        {"Cache-Control", "no-cache"},
                        // nginx in front: do not buffer the stream
                        {"X-Accel-Buffering", "no"}});
    stream.Pump(r, std::move(first_token), ev == Generation::Event::kEnd);
  }

  RouterPool& pool_;
  InflightLimiter& limiter_;
  GatewayMetrics& metrics_;
  prometheus::Registry& registry_;
  const HttpServerOptions options_;
  ParseOptions parse_;
  std::atomic<bool> draining_{false};
  http1::Server server_;
};

HttpServer::HttpServer(RouterPool& pool, InflightLimiter& limiter, GatewayMetrics& metrics,
                       prometheus::Registry& registry, HttpServerOptions options)
    : impl_(std::make_unique<Impl>(pool, limiter, metrics, registry, std::move(options))) {}

HttpServer::~HttpServer() { Stop(); }

absl::StatusOr<int> HttpServer::Start(const std::string& host, int port) {
  return impl_->Start(host, port);
}

void HttpServer::SetDraining() { impl_->SetDraining(); }

void HttpServer::Stop() { impl_->Stop(); }

}  // namespace dmoe::gateway
