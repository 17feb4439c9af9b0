// Plain HTTP/1.1 over loopback sockets for tests, with no HTTP library in
// between: the gateway and the HTTP server are tested byte for byte, and
// multi-process tests read /health and /metrics of the binaries they start.
//
// Contract:
//   LoopbackClient(port)   one TCP connection to 127.0.0.1:port (connected()
//                          says whether it was made); writes time out after
//                          `io_timeout`. Send writes all bytes (false on a
//                          short write or error, never SIGPIPE); ShutdownWrite
//                          half-closes; ReadToClose reads until the peer closes
//                          or `timeout` passes (then *closed = false), and
//                          ReadUntil until `what` has arrived, the peer closes
//                          or `timeout` passes; both return everything read on
//                          this connection so far. ReadToCloseWhileActive
//                          gives up only after `idle` without a byte (a
//                          long stream that keeps sending is read to its
//                          end). Not thread-safe.
//   ParseHttpResponse(raw) the status and body (de-chunked when the answer is
//                          Transfer-Encoding: chunked) of one complete answer;
//                          status 0 and a reason in `body` when `raw` is not
//                          one.
//   HttpRequest(...)       one request on a fresh connection ("Connection:
//                          close"; a POST carries Content-Type:
//                          application/json), read to EOF and parsed; status 0
//                          and the reason in `body` on any failure. A write,
//                          or a wait for the next byte, times out after
//                          `timeout_s` seconds.
//   HttpGetBody(port, path) the body of a GET, or "" when there was no answer.
#ifndef DMOE_TESTING_HTTP_H_
#define DMOE_TESTING_HTTP_H_

#include <string>
#include <string_view>

#include "absl/time/time.h"

namespace dmoe::testing {

class LoopbackClient {
 public:
  explicit LoopbackClient(int port, absl::Duration io_timeout = absl::Seconds(10));
  ~LoopbackClient();
  LoopbackClient(const LoopbackClient&) = delete;
  LoopbackClient& operator=(const LoopbackClient&) = delete;

  bool connected() const { return connected_; }
  bool Send(std::string_view bytes);
  void ShutdownWrite();
  void Close();
  std::string ReadToClose(absl::Duration timeout, bool* closed = nullptr);
  std::string ReadUntil(std::string_view what, absl::Duration timeout);
  std::string ReadToCloseWhileActive(absl::Duration idle, bool* closed = nullptr);

 private:
  // Reads what is there within ~50 ms: > 0 bytes read, 0 peer closed, < 0 nothing yet.
  int ReadSome();

  int fd_ = -1;
  bool connected_ = false;
  std::string got_;
};

struct HttpResponse {
  int status = 0;    // 0: no (valid) answer; `body` then says why
  std::string body;  // de-chunked
};

HttpResponse ParseHttpResponse(const std::string& raw);

HttpResponse HttpRequest(int port, const std::string& method, const std::string& path,
                         const std::string& body = "", int timeout_s = 60);

std::string HttpGetBody(int port, const std::string& path);

}  // namespace dmoe::testing

#endif  // DMOE_TESTING_HTTP_H_
