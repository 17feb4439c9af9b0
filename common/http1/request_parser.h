// A strict, incremental HTTP/1.1 request parser (RFC 9112), the reading half
// of the gateway's HTTP server (http1/server.h). No sockets: bytes in, one
// request or one error out, so that it can be unit-tested and fuzzed alone.
//
// What it accepts:
//   - a request line `METHOD SP origin-form|absolute-form|* SP HTTP/1.x`; any
//     other version is 505 (the HTTP/2 preface too), a line without one
//     (HTTP/0.9) is 400;
//   - header lines `name: value` with a token name, the colon right after the
//     name, and no control characters in the value; a line without a colon,
//     whitespace before the colon and obsolete line folding are 400;
//   - exactly one Host on HTTP/1.1 (RFC 9112 §3.2), at most one on HTTP/1.0;
//   - a body framed by Content-Length (digits only; repeated headers must all
//     agree, else 400: a smuggling risk behind proxies) or by
//     `Transfer-Encoding: chunked` (other codings 501; both headers 400);
//   - CRLF line ends, and bare LF as RFC 9112 §2.2 allows; a bare CR is 400.
// Limits (431 for a head over max_head_bytes or max_headers lines, 414 for a
// request line over the head limit, 413 for a body over max_body_bytes) are
// checked as bytes arrive, so a hostile client cannot make it buffer more.
//
// After an error the connection's framing is unknown: the server answers the
// error and closes. After a complete request, bytes past it (a pipelined next
// request) are not consumed: Reset() and feed them again.
//
// Thread safety: none; one parser per connection.
#ifndef DMOE_COMMON_HTTP1_REQUEST_PARSER_H_
#define DMOE_COMMON_HTTP1_REQUEST_PARSER_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace dmoe::http1 {

struct Limits {
  size_t max_head_bytes = 64 << 10;  // request line + headers
  size_t max_headers = 100;
  size_t max_body_bytes = 8 << 20;
};

struct Request {
  std::string method;     // as sent (methods are case-sensitive)
  std::string target;     // as sent
  std::string path;       // target's path, not percent-decoded ("*" for OPTIONS *)
  std::string query;      // after '?', without it
  int minor_version = 1;  // HTTP/1.<minor>
  // In arrival order; names lower-cased, values without surrounding blanks.
  std::vector<std::pair<std::string, std::string>> headers;
  std::string body;              // decoded (chunked framing removed)
  bool keep_alive = true;        // HTTP/1.1 without "Connection: close"
  bool expect_continue = false;  // "Expect: 100-continue"

  // The first header named `lower_name` (lower case), or nullptr.
  const std::string* Header(std::string_view lower_name) const;
};

class RequestParser {
 public:
  enum class State { kNeedMore, kComplete, kError };

  explicit RequestParser(Limits limits = Limits()) : limits_(limits) {}

  // Consumes bytes of `in` up to the end of the current request (or up to the
  // error) and returns how many it took. Call again with the rest when
  // state() is kNeedMore.
  size_t Consume(std::string_view in);

  State state() const { return state_; }
  // Whether the request line and headers are complete (the body may not be):
  // the moment to answer "Expect: 100-continue".
  bool head_complete() const { return phase_ > Phase::kHead; }
  // Whether any byte of a request (beyond leading blank lines) has arrived.
  bool started() const { return started_; }
  // With head_complete(): whether a body is still to come.
  bool expects_body() const { return phase_ == Phase::kBody || phase_ == Phase::kChunkSize; }

  // kComplete and from head_complete(): the request (body once complete).
  const Request& request() const { return request_; }
  Request TakeRequest() { return std::move(request_); }

  // kError: the status to answer (400, 413, 414, 417, 431, 501, 505) and why.
  int error_status() const { return error_status_; }
  const std::string& error_message() const { return error_message_; }

  // Ready for the next request on the connection.
  void Reset();

 private:
  enum class Phase {
    kHead,
    kBody,
    kChunkSize,
    kChunkData,
    kChunkDataEnd,
    kTrailers,
    kDone,
  };

  size_t ConsumeHead(std::string_view in);
  size_t ConsumeLine(std::string_view in, std::string* line, bool* complete);
  bool ParseHead();
  bool ParseRequestLine(std::string_view line);
  bool ParseHeaderLine(std::string_view line);
  bool FinishHeaders();
  bool ParseChunkSize(std::string_view line);
  void Fail(int status, std::string message);
  void Complete();

  const Limits limits_;
  State state_ = State::kNeedMore;
  Phase phase_ = Phase::kHead;
  bool started_ = false;
  std::string head_;      // the head's bytes so far (kHead)
  size_t head_scan_ = 0;  // head_ before this offset holds no blank line
  std::string line_;      // a chunk-size or trailer line so far
  size_t trailer_bytes_ = 0;
  uint64_t remaining_ = 0;  // body or chunk bytes still to read
  Request request_;
  int error_status_ = 0;
  std::string error_message_;
};

// The standard reason phrase of `status` ("OK", "Not Found", ...); "Unknown"
// for codes it does not know.
const char* ReasonPhrase(int status);

// Decodes %XX escapes; false on a malformed escape.
bool PercentDecode(std::string_view in, std::string* out);

}  // namespace dmoe::http1

#endif  // DMOE_COMMON_HTTP1_REQUEST_PARSER_H_
