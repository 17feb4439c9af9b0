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
#include "gateway/generation.h"
#include "gateway/internal/http_errors.h"
#include "gateway/openai_protocol.h"
#include "gateway/text_output.h"
#include "httplib.h"
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

// Request methods of RFC 9110: cpp-httplib answers the ones it has no
// handlers for as 404 (or 400 for TRACE and CONNECT, which it never routes).
bool IsStandardMethod(const std::string& method) {
  for (const char* m : {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS",
                        "PATCH", "TRACE", "CONNECT"}) {
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

void SetJson(httplib::Response& res, int status, const ojson& body) {
  res.status = status;
  res.set_content(Dump(body), kJson);
}

void SetError(httplib::Response& res, const absl::Status& st, ApiKind kind = ApiKind::kCompletion,
              bool from_router = false) {
  const internal::HttpError e = internal::MapError(st, kind, from_router);
  SetJson(res, e.status, ErrorJson(st.message(), e.type, e.param, e.code));
  if (e.status == 429 || e.status == 503) res.set_header("Retry-After", "1");
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
// metrics record until cpp-httplib drops the content provider.
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

  // The first event, seen while the status line was held.
  void SetFirst(std::optional<v1::GenerateResponse> token, bool ended) {
    first_ = std::move(token);
    ended_ok_ = ended;
  }

  // cpp-httplib's chunked content provider: writes the whole stream in one
  // call.
  bool Pump(httplib::DataSink& sink) {
    if (first_.has_value()) {
      v1::GenerateResponse m = std::move(*first_);
      first_.reset();
      if (!SendToken(sink, m)) return Disconnected();
    }
    absl::Status end;
    while (!ended_ok_ && !Stopped()) {
      v1::GenerateResponse m;
      switch (gen_->Next(poll_, &m, &end)) {
        case Generation::Event::kTimeout:
          if (!sink.is_writable()) return Disconnected();
          continue;
        case Generation::Event::kToken:
          if (!SendToken(sink, m)) return Disconnected();
          continue;
        case Generation::Event::kEnd:
          break;
      }
      break;
    }
    int code = 200;
    if (Stopped()) {
      gen_->Cancel();  // a stop string ended it: the router can free the
                       // sequence
      finish_reason_ = "stop";
    }
    if (ended_ok_ || end.ok() || Stopped()) {
      metrics_.AddPromptTokens(static_cast<double>(prompt_tokens_));
      const std::string rest = text_ != nullptr ? text_->Finish() : std::string();
      Send(sink, Dump(FinalChunkJson(meta_, FinishReason(finish_reason_, sent_, max_tokens_),
                                     prompt_tokens_, sent_, rest)));
    } else {
      // The status line is out: the error becomes an event (as OpenAI's).
      const internal::HttpError e = internal::MapError(end, meta_.kind, /*from_router=*/true);
      Send(sink, Dump(ErrorJson(end.message(), e.type, e.param, e.code)));
      code = e.status;
    }
    Send(sink, "[DONE]");
    // Before the terminating chunk: once the client has it, the request is
    // over.
    Complete(code);
    sink.done();
    return true;
  }

 private:
  bool Send(httplib::DataSink& sink, const std::string& data) {
    const std::string event = absl::StrCat("data: ", data, "\n\n");
    return sink.write(event.data(), event.size());
  }

  bool SendToken(httplib::DataSink& sink, const v1::GenerateResponse& m) {
    if (sent_ == 0) {
      metrics_.RecordTimeToFirstToken(absl::Now() - record_->start());
      prompt_tokens_ = m.prompt_tokens();
    }
    if (!m.finish_reason().empty()) finish_reason_ = m.finish_reason();
    const std::string text = text_ != nullptr ? text_->Push(m.token()) : std::string();
    const bool ok = Send(sink, Dump(TokenChunkJson(meta_, m.token(), sent_ == 0, text)));
    if (ok) ++sent_;
    return ok;
  }

  bool Stopped() const { return text_ != nullptr && text_->stopped(); }

  bool Disconnected() {
    gen_->Cancel();
    metrics_.RecordClientDisconnect();
    Complete(499);  // nginx's "client closed request", for the metrics only
    return false;
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

  std::optional<v1::GenerateResponse> first_;
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
        options_(std::move(options)) {
    parse_.model_name = options_.model_name;
    parse_.max_tokens_limit = options_.max_tokens_limit;
    parse_.tokenizer = options_.tokenizer.get();
    parse_.chat_template = options_.chat_template.get();
    parse_.chat_template_error = options_.chat_template_error;
    const int threads = options_.threads > 0 ? options_.threads : limiter_.max() + 16;
    server_.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
    server_.set_payload_max_length(options_.max_body_bytes);
    Route();
  }

  absl::StatusOr<int> Start(const std::string& host, int port) {
    int bound = -1;
    if (port == 0) {
      bound = server_.bind_to_any_port(host);
    } else if (server_.bind_to_port(host, port)) {
      bound = port;
    }
    if (bound <= 0) {
      return absl::UnavailableError(absl::StrCat("HTTP: cannot listen on ", host, ":", port));
    }
    thread_ = std::thread([this] { server_.listen_after_bind(); });
    // stop() is a no-op until the loop runs; wait for it so that Stop() works.
    for (int i = 0; i < 5000 && !server_.is_running(); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return bound;
  }

  void SetDraining() { draining_ = true; }

  void Stop() {
    if (!thread_.joinable()) return;
    server_.stop();
    thread_.join();
  }

 private:
  void Route() {
    server_.Post(kCompletions, [this](const httplib::Request& req, httplib::Response& res,
                                      const httplib::ContentReader& reader) {
      Generate(ApiKind::kCompletion, req, res, reader);
    });
    server_.Post(kChat, [this](const httplib::Request& req, httplib::Response& res,
                               const httplib::ContentReader& reader) {
      Generate(ApiKind::kChatCompletion, req, res, reader);
    });
    server_.Post(kTokenize, [this](const httplib::Request& req, httplib::Response& res) {
      RequestRecord record(metrics_, kTokenize);
      Tokenize(req, res);
      record.Finish(res.status);
    });
    server_.Post(kDetokenize, [this](const httplib::Request& req, httplib::Response& res) {
      RequestRecord record(metrics_, kDetokenize);
      Detokenize(req, res);
      record.Finish(res.status);
    });
    server_.Get("/v1/models", [this](const httplib::Request& req, httplib::Response& res) {
      RequestRecord record(metrics_, "/v1/models");
      ojson list;
      list["object"] = "list";
      list["data"] = ojson::array({ModelJson()});
      SetJson(res, 200, list);
      record.Finish(200);
    });
    server_.Get(R"(/v1/models/(.+))", [this](const httplib::Request& req, httplib::Response& res) {
      RequestRecord record(metrics_, "/v1/models/{id}");
      if (req.matches[1] == options_.model_name) {
        SetJson(res, 200, ModelJson());
      } else {
        SetJson(res, 404,
                ErrorJson(absl::StrCat("model '", req.matches[1].str(), "' does not exist"),
                          "invalid_request_error", "model", "model_not_found"));
      }
      record.Finish(res.status);
    });
    server_.Get("/health", [this](const httplib::Request& req, httplib::Response& res) {
      RequestRecord record(metrics_, "/health");
      Health(res);
      record.Finish(res.status);
    });
    server_.Get("/metrics", [this](const httplib::Request& req, httplib::Response& res) {
      RequestRecord record(metrics_, "/metrics");
      record.Finish(200);  // counted before serializing, so a scrape sees itself
      res.status = 200;
      res.set_content(prometheus::TextSerializer().Serialize(registry_.Collect()),
                      "text/plain; version=0.0.4; charset=utf-8");
    });
    // Unknown routes, and errors cpp-httplib answers itself (413, 400 for a
    // malformed request line): give them a JSON body. Responses that already
    // have one (set by the handlers above) pass through. A routed path with a
    // method it does not take (no handler: cpp-httplib says 404, or 400 for
    // TRACE/CONNECT) is 405 with Allow, for every method alike; the request
    // body has been read by then, so the connection stays usable.
    server_.set_error_handler(httplib::Server::HandlerWithResponse(
        [this](const httplib::Request& req, httplib::Response& res) {
          if (!res.body.empty() || res.is_chunked_content_provider_) {
            return httplib::Server::HandlerResponse::Unhandled;
          }
          if (const char* allow = AllowedMethods(req.path);
              allow != nullptr && (res.status == 404 || res.status == 400) &&
              IsStandardMethod(req.method) && !Takes(allow, req.method)) {
            res.set_header("Allow", allow);
            SetJson(
                res, 405,
                ErrorJson(absl::StrCat(req.path, " takes ", allow, ", not ",
                                       req.method),
                          "invalid_request_error", "", "method_not_allowed"));
            metrics_.RecordHttp(EndpointOf(req.path), 405,
                                absl::ZeroDuration());
            return httplib::Server::HandlerResponse::Handled;
          }
          std::string message = absl::StrCat("HTTP ", res.status);
          const char* type = "invalid_request_error";
          const char* code = "";
          if (res.status == 404) {
            message = absl::StrCat("no route for ", req.method, " ", req.path);
            code = "not_found";
          } else if (res.status == 413) {
            message = absl::StrCat("request body over the limit of ", options_.max_body_bytes,
                                   " bytes (--max-body-bytes)");
          } else if (res.status >= 500) {
            type = "server_error";
          }
          SetJson(res, res.status, ErrorJson(message, type, "", code));
          metrics_.RecordHttp(EndpointOf(req.path), res.status, absl::ZeroDuration());
          return httplib::Server::HandlerResponse::Handled;
        }));
    server_.set_exception_handler([this](const httplib::Request& req, httplib::Response& res,
                                         std::exception_ptr ep) {
      std::string what = "unknown exception";
      try {
        if (ep) std::rethrow_exception(ep);
      } catch (const std::exception& e) {
        what = e.what();
      } catch (...) {
      }
      SetJson(
          res, 500,
          ErrorJson(absl::StrCat("internal error: ", what), "server_error", "", "internal_error"));
    });
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
  void Health(httplib::Response& res) {
    const int healthy = pool_.HealthyCount();
    ojson j;
    j["status"] = draining_ ? "draining" : healthy > 0 ? "ok" : "unavailable";
    j["routers"] = healthy;
    j["routers_total"] = pool_.size();
    j["inflight"] = limiter_.current();
    SetJson(res, !draining_ && healthy > 0 ? 200 : 503, j);
  }

  // POST /tokenize: {"prompt": text or ids, "add_special_tokens"} or
  // {"messages", "add_generation_prompt"}: the prompt tokens a generation would
  // get.
  void Tokenize(const httplib::Request& req, httplib::Response& res) {
    if (options_.tokenizer == nullptr) return SetError(res, NoTokenizer());
    nlohmann::json body = nlohmann::json::parse(req.body, nullptr, /*allow_exceptions=*/false);
    const bool chat = body.is_object() && body.contains("messages");
    const ApiKind kind = chat ? ApiKind::kChatCompletion : ApiKind::kCompletion;
    absl::StatusOr<ParsedRequest> parsed = ParseGenerateRequest(req.body, kind, parse_);
    if (!parsed.ok()) return SetError(res, parsed.status(), kind);
    const auto& ids = parsed->upstream.prompt_tokens();
    ojson j;
    j["count"] = ids.size();
    j["tokens"] = std::vector<int32_t>(ids.begin(), ids.end());
    SetJson(res, 200, j);
  }

  // POST /detokenize: {"tokens": [ids], "skip_special_tokens": false} ->
  // {"prompt"}.
  void Detokenize(const httplib::Request& req, httplib::Response& res) {
    if (options_.tokenizer == nullptr) return SetError(res, NoTokenizer());
    nlohmann::json body = nlohmann::json::parse(req.body, nullptr, /*allow_exceptions=*/false);
    if (!body.is_object() || !body.contains("tokens") || !body["tokens"].is_array()) {
      return SetError(res, InvalidParam("tokens", "tokens is required (a list of token ids)"));
    }
    std::vector<int32_t> ids;
    for (const auto& v : body["tokens"]) {
      if (!v.is_number_integer() || v.get<int64_t>() < 0 ||
          v.get<int64_t>() > std::numeric_limits<int32_t>::max()) {
        return SetError(
            res, InvalidParam("tokens", absl::StrCat("tokens: ", v.dump(), " is not a token id")));
      }
      ids.push_back(v.get<int32_t>());
    }
    // A boolean as ParseGenerateRequest checks them: null is the default.
    bool skip = false;
    if (auto it = body.find("skip_special_tokens");
        it != body.end() && !it->is_null()) {
      if (!it->is_boolean()) {
        return SetError(
            res, InvalidParam(
                     "skip_special_tokens",
                     absl::StrCat("skip_special_tokens must be a boolean, got ",
                                  JsonTypeName(*it))));
      }
      skip = it->get<bool>();
    }
    absl::StatusOr<std::string> text = options_.tokenizer->Decode(ids, skip);
    if (!text.ok()) {
      return SetError(res,
                      InvalidParam("tokens", absl::StrCat("tokens: ", text.status().message())));
    }
    ojson j;
    j["prompt"] = *text;
    SetJson(res, 200, j);
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

  void Generate(ApiKind kind, const httplib::Request& req, httplib::Response& res,
                const httplib::ContentReader& reader) {
    auto record = std::make_shared<RequestRecord>(metrics_, EndpointOf(req.path));
    auto fail = [&](const absl::Status& st, bool from_router = false) {
      SetError(res, st, kind, from_router);
      record->Finish(res.status);
    };
    if (draining_) return fail(absl::UnavailableError("gateway is shutting down"));
    InflightLimiter::Slot slot = limiter_.TryAcquire();
    if (!slot) {
      return fail(absl::ResourceExhaustedError(
          absl::StrCat("gateway at capacity: ", limiter_.max(),
                       " requests in flight (--max-inflight); retry later")));
    }
    if (req.is_multipart_form_data()) {
      return fail(InvalidParam("", "request body must be JSON (Content-Type: application/json)"));
    }
    std::string body;
    bool too_big = false;
    const bool read = reader([&](const char* data, size_t n) {
      if (body.size() + n > options_.max_body_bytes) {
        too_big = true;
        return false;
      }
      body.append(data, n);
      return true;
    });
    uint64_t declared = 0;
    if (too_big || (absl::SimpleAtoi(req.get_header_value("Content-Length"), &declared) &&
                    declared > options_.max_body_bytes)) {
      SetJson(res, 413,
              ErrorJson(absl::StrCat("request body over the limit of ", options_.max_body_bytes,
                                     " bytes (--max-body-bytes)"),
                        "invalid_request_error", "", "request_too_large"));
      record->Finish(413);
      return;
    }
    if (!read) return fail(InvalidParam("", "could not read the request body"));

    absl::StatusOr<ParsedRequest> parsed = ParseGenerateRequest(body, kind, parse_);
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
      while ((*gen)->Next(absl::InfiniteDuration(), &m, &end) == Generation::Event::kToken) {
        if (tokens.empty()) {
          metrics_.RecordTimeToFirstToken(absl::Now() - record->start());
          prompt_tokens = m.prompt_tokens();
        }
        tokens.push_back(m.token());
        if (!m.finish_reason().empty()) finish = m.finish_reason();
        if (text != nullptr) {
          text->Push(m.token());
          if (text->stopped()) {
            (*gen)->Cancel();  // a stop string ended it: the router can free
                               // the sequence
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
      SetJson(res, 200,
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
    auto stream =
        std::make_shared<SseStream>(*std::move(gen), std::move(slot), record, metrics_, meta,
                                    max_tokens, options_.disconnect_poll, std::move(text));
    std::optional<v1::GenerateResponse> first_token;
    if (ev == Generation::Event::kToken) first_token = std::move(first);
    stream->SetFirst(std::move(first_token), ev == Generation::Event::kEnd);
    res.status = 200;
    res.set_header("Cache-Control", "no-cache");
    res.set_header("X-Accel-Buffering",
                   "no");  // nginx in front: do not buffer the stream
    res.set_chunked_content_provider(
        "text/event-stream",
        [stream](size_t, httplib::DataSink& sink) { return stream->Pump(sink); });
  }

  RouterPool& pool_;
  InflightLimiter& limiter_;
  GatewayMetrics& metrics_;
  prometheus::Registry& registry_;
  const HttpServerOptions options_;
  ParseOptions parse_;
  std::atomic<bool> draining_{false};
  httplib::Server server_;
  std::thread thread_;
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
