// The gateway's OpenAI-compatible HTTP API (on the strict HTTP/1.1 server of
// http1/server.h), in front of a RouterPool.
//
//   POST /v1/completions        {"prompt": "text" | [ids] | [[ids]], ...}
//   POST /v1/chat/completions   {"messages": [{"role", "content": "text" | [ids]}], ...}
//                               (both: see openai_protocol.h)
//   POST /tokenize              {"prompt": "text" | "messages": [...]} -> {"tokens", "count"}
//   POST /detokenize            {"tokens": [ids]} -> {"prompt": "text"}
//   GET  /v1/models, /v1/models/{id}
//   GET  /health                200 {"status":"ok","routers":<ready>} | 503
//   GET  /metrics               Prometheus text format
//
// Errors are JSON {"error": {"message", "type", "param", "code"}}: 400 for a
// bad body or parameter (param named) or a request the server cannot read,
// 404 for an unknown route or model, 405 (with Allow) for a method a route
// does not take, 501 for a method that is not HTTP's, 408 for a request not
// received in time, 413 for a body over --max-body-bytes, 429 when the gateway
// (--max-inflight) or every router is full, 502 for a router error, 503 when
// no router is ready or while draining, 504 at the request deadline. After an
// unreadable request (malformed request line or header, conflicting
// Content-Length, HTTP/0.9 or /2, headers over 64 KiB) the connection closes
// right after the answer.
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
// that arrives as a `data: {"error": ...}` event before [DONE].
//
// Clients that leave: every `disconnect_poll` without a token the handler
// looks at the socket. A reset connection cancels the upstream call (the
// router frees the sequence), streaming or not. A client that sent FIN may
// have gone or only half-closed its sending side (`nc -N`, some proxies):
// a streaming answer then writes an SSE comment (": keep-alive"), which fails
// by the next check if the client has gone; a non-streaming one keeps going,
// since that client may still read its answer.
//
// Connections: HTTP/1.1 keep-alive and pipelining; idle connections hold no
// thread. `threads` handler threads run the requests (0: --max-inflight + 16,
// so that /health and /metrics are answered while generations hold theirs).
//
// Thread safety: Start/SetDraining/Stop from one controlling thread; requests
// are served on the handler threads.
#ifndef DMOE_GATEWAY_HTTP_SERVER_H_
#define DMOE_GATEWAY_HTTP_SERVER_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "gateway/inflight_limiter.h"
#include "gateway/metrics.h"
#include "gateway/router_pool.h"
#include "prometheus/registry.h"
#include "text/chat_template.h"
#include "text/tokenizer.h"

namespace dmoe::gateway {

struct HttpServerOptions {
  std::string model_name = "dmoe";
  size_t max_body_bytes = 8 << 20;
  int threads = 0;                                       // handler threads; 0 = limiter's max + 16
  size_t max_connections = 4096;                         // open connections; more get 503
  absl::Duration keep_alive_timeout = absl::Seconds(5);  // idle connection closed after
  absl::Duration read_timeout = absl::Seconds(30);       // a request's bytes, from its first: 408
  absl::Duration write_timeout = absl::Seconds(30);      // a client not reading: connection dropped
  absl::Duration request_timeout = absl::Seconds(600);
  absl::Duration header_hold = absl::Milliseconds(250);
  absl::Duration disconnect_poll = absl::Milliseconds(100);
  uint32_t max_tokens_limit = 1 << 20;
  // The model's tokenizer and chat template (null: token ids only); when there
  // is a tokenizer but no usable template, chat_template_error says why.
  std::shared_ptr<const text::Tokenizer> tokenizer;
  std::shared_ptr<const text::ChatTemplate> chat_template;
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
