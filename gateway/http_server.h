// The gateway's OpenAI-compatible HTTP API (cpp-httplib), in front of a
// RouterPool.
//
//   POST /v1/completions        {"prompt": "text" | [ids] | [[ids]], ...}  (see
//   openai_protocol.h) POST /v1/chat/completions   {"messages": [{"role",
//   "content": "text" | [ids]}], ...} POST /tokenize              {"prompt":
//   "text" | "messages": [...]} -> {"tokens", "count"} POST /detokenize
//   {"tokens": [ids]} -> {"prompt": "text"} GET  /v1/models, /v1/models/{id}
//   GET  /health                200 {"status":"ok","routers":<healthy>} | 503
//   GET  /metrics               Prometheus text format
//
// Errors are JSON {"error": {"message", "type", "param", "code"}}: 400 for a
// bad body or parameter (param named), 404 for an unknown route or model, 405
// for a wrong method, 413 for a body over --max-body-bytes, 429 when the
// gateway (--max-inflight) or every router is full, 502 for a router error,
// 503 when no router is healthy or while draining, 504 at the request deadline.
//
// With a tokenizer (options.tokenizer), prompts may be text, answers carry the
// text next to the token ids, and "stop" strings end a generation on the text
// (text_output.h; the upstream call is then cancelled); /tokenize and
// /detokenize answer 501 without one.
//
// Streaming ("stream": true) answers text/event-stream: one `data: {chunk}`
// per token (with the text that became final: never half a character, never
// text that a stop string may still cut), a last chunk with the rest of the
// text, finish_reason and usage, then `data: [DONE]`.
// The status line waits up to `header_hold` for the first token, so that a
// request refused by the routers still gets its 4xx/5xx status; an error after
// that arrives as a `data: {"error": ...}` event before [DONE]. While
// streaming, the client's socket is checked every `disconnect_poll`; when the
// client has gone the upstream call is cancelled (the router frees the
// sequence). A non-streaming request cannot see its client leave (cpp-httplib
// 0.11 does not expose the socket to handlers): it runs to the end or the
// deadline.
//
// Every connection holds one worker thread while it is open (cpp-httplib's
// model), so `threads` should exceed max_inflight.
//
// Thread safety: Start/SetDraining/Stop from one controlling thread; requests
// are served on the worker threads.
#ifndef DMOE_GATEWAY_HTTP_SERVER_H_
#define DMOE_GATEWAY_HTTP_SERVER_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "core/chat_template.h"
#include "core/tokenizer.h"
#include "gateway/inflight_limiter.h"
#include "gateway/metrics.h"
#include "gateway/router_pool.h"
#include "prometheus/registry.h"

namespace dmoe::gateway {

struct HttpServerOptions {
  std::string model_name = "dmoe";
  size_t max_body_bytes = 8 << 20;
  int threads = 0;  // worker threads; 0 = limiter's max + 16
  absl::Duration request_timeout = absl::Seconds(600);
  absl::Duration header_hold = absl::Milliseconds(250);
  absl::Duration disconnect_poll = absl::Milliseconds(100);
  uint32_t max_tokens_limit = 1 << 20;
  // The model's tokenizer and chat template (null: token ids only); when there
  // is a tokenizer but no usable template, chat_template_error says why.
  std::shared_ptr<const core::Tokenizer> tokenizer;
  std::shared_ptr<const core::ChatTemplate> chat_template;
  std::string chat_template_error;
};

class HttpServer {
 public:
  // Everything passed in must outlive the server.
  HttpServer(RouterPool& pool, InflightLimiter& limiter, GatewayMetrics& metrics,
             prometheus::Registry& registry, HttpServerOptions options);
  ~HttpServer();  // Stop()

  // Binds host:port (0 = any free port) and serves on a background thread.
  // Returns the bound port; UNAVAILABLE when the address cannot be bound.
  absl::StatusOr<int> Start(const std::string& host, int port);
  // New generations get 503 and /health turns 503; requests in flight go on.
  void SetDraining();
  // Closes the listening socket and waits for the requests in flight (cancel
  // them first, e.g. RouterPool::Close, to make this quick).
  void Stop();

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dmoe::gateway

#endif  // DMOE_GATEWAY_HTTP_SERVER_H_
