// The HTTP side of serve_bench: one keep-alive HTTP/1.1 connection per
// simulated user, streaming responses read as they arrive, each Server-Sent
// Event stamped with the time its line was complete.
//
// Contract:
//   ResponseParser     an incremental parser of one HTTP/1.1 response. Feed(bytes,
//                      t) takes the bytes of one read at time t (seconds since the
//                      request was sent) in any split; the body is framed by
//                      Content-Length, chunked transfer coding, or the end of the
//                      connection (FinishAtEof). Every "data: X" line of the body
//                      (an SSE event; "data:X" too) becomes SseEvent{t, X} with
//                      the time of the read that completed the line. Feed returns
//                      false once the response is malformed (error() says how:
//                      status line, header, chunk size, a body over 64 MiB);
//                      done() is true once the whole response arrived.
//   HttpStreamClient   Post(path, body) sends one POST (JSON), Get(path) one
//                      GET, on its connection, opening it (again) as needed,
//                      and reads the response to its end; Post with `stop`
//                      reads until stop(event) is true for an event, then
//                      closes the connection, as a user who stops reading (the
//                      result says client_closed). A reused connection the
//                      server closed meanwhile is reopened and the request
//                      sent once more. Every read and the connect time out
//                      after `timeout_s`. Not thread-safe: one client per
//                      thread.
#ifndef DMOE_BENCH_SERVE_HTTP_STREAM_H_
#define DMOE_BENCH_SERVE_HTTP_STREAM_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

namespace dmoe::bench::serve {

struct SseEvent {
  double t = 0;      // seconds since the request was sent
  std::string data;  // after "data:" (one leading space dropped)
};

class ResponseParser {
 public:
  bool Feed(std::string_view bytes, double t);
  // The connection ended: true when that ends the response (close-delimited
  // body), else sets the error (truncated).
  bool FinishAtEof(double t);
  bool done() const { return state_ == State::kDone; }
  bool failed() const { return state_ == State::kFailed; }
  int status() const { return status_; }
  bool keep_alive() const { return keep_alive_; }
  const std::string& body() const { return body_; }
  const std::vector<SseEvent>& events() const { return events_; }
  const std::string& error() const { return error_; }
  double first_byte_t() const { return first_byte_t_; }
  double done_t() const { return done_t_; }

 private:
  enum class State { kHead, kBody, kChunkSize, kChunkData, kChunkEnd, kTrailer, kDone, kFailed };
  bool Fail(std::string why);
  bool ParseHead(std::string_view head);
  void Body(std::string_view bytes, double t);
  void Finish(double t);

  State state_ = State::kHead;
  std::string pending_;  // unparsed bytes (head, chunk framing)
  int status_ = 0;
  bool keep_alive_ = true, chunked_ = false, sse_ = false;
  int64_t content_length_ = -1;  // -1: close-delimited (when not chunked)
  int64_t remaining_ = 0;        // of Content-Length or the current chunk
  std::string body_;             // all body bytes (not SSE) or the SSE line in progress
  std::vector<SseEvent> events_;
  std::string error_;
  double first_byte_t_ = -1, done_t_ = -1;
};

struct HttpResult {
  int status = 0;     // 0: no answer; `error` says why
  std::string error;  // transport or framing problem
  std::string body;   // a non-SSE body (error answers)
  std::vector<SseEvent> events;
  double first_byte_t = -1, done_t = -1;  // seconds since sent
  bool client_closed = false;             // ended by Post's `stop`
};

class HttpStreamClient {
 public:
  HttpStreamClient(std::string host, int port, double timeout_s);
  ~HttpStreamClient();
  HttpStreamClient(const HttpStreamClient&) = delete;
  HttpStreamClient& operator=(const HttpStreamClient&) = delete;

  using StopFn = std::function<bool(const SseEvent&)>;
  HttpResult Post(const std::string& path, const std::string& json_body, StopFn stop = nullptr);
  HttpResult Get(const std::string& path);
  // Times are relative to this point (the send), also returned.
  std::chrono::steady_clock::time_point last_send() const { return last_send_; }

 private:
  bool Connect(std::string* error);
  void Close();
  HttpResult Request(const std::string& request, const StopFn& stop = nullptr);
  // One attempt on the current connection; *retry when the connection was
  // stale (closed before any byte of the answer).
  HttpResult Attempt(const std::string& request, bool reused, const StopFn& stop, bool* retry);

  std::string host_;
  int port_;
  double timeout_s_;
  int fd_ = -1;
  std::chrono::steady_clock::time_point last_send_{};
};

}  // namespace dmoe::bench::serve

#endif  // DMOE_BENCH_SERVE_HTTP_STREAM_H_
