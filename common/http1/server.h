// A small, strict HTTP/1.1 server: the gateway's public API and every
// service's /metrics run on it.
//
// Why not cpp-httplib (0.11, Debian's) any more: it dropped pipelined requests
// (only the first of three was answered), sent nothing to a client that
// half-closed after its request (`nc -N`, some proxies), accepted conflicting
// Content-Length headers and header lines without a colon (request smuggling
// behind a proxy), kept a connection open 5 s after a request it could not
// read, and held one thread per open connection, idle or not.
//
// Model: one reactor thread (epoll) accepts connections and reads requests
// with RequestParser (request_parser.h: the strict rules live there); only a
// complete request goes to one of `threads` handler threads, which runs the
// Handler and writes the response itself (blocking, bounded by
// write_timeout), then serves requests already pipelined behind it, in order,
// before handing the connection back. So idle and slow-sending clients hold
// no thread, and a handler may stream for as long as it likes.
//
//   - Keep-alive by default on HTTP/1.1; "Connection: close", HTTP/1.0, a
//     response the handler marks CloseAfter(), a write error and Stop() end
//     the connection after the response. An idle connection is closed after
//     keep_alive_timeout; a request not fully received read_timeout after its
//     first byte gets 408.
//   - A client that half-closes (shuts its sending side) after its request
//     still gets the response; then the connection closes.
//   - Refused requests (parse errors: 400, 413, 414, 417, 431, 501, 505; 408;
//     503 when the handler queue or the connection table is full) are
//     answered with ErrorBody's body and "Connection: close"; the socket is
//     then shut for writing and drained for up to `linger` before close, so
//     the client reads the answer instead of a reset.
//   - "Expect: 100-continue" is answered "100 Continue" once the head is
//     accepted (or with the final error if it is not).
//   - HEAD gets the headers of the GET response without its body.
//
// Thread safety: Start and Stop from one controlling thread. The Handler runs
// on the handler threads, concurrently; a Responder belongs to one handler
// call.
#ifndef DMOE_COMMON_HTTP1_SERVER_H_
#define DMOE_COMMON_HTTP1_SERVER_H_

#include <atomic>
#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/http1/request_parser.h"

namespace dmoe::http1 {

using Headers = std::vector<std::pair<std::string, std::string>>;

struct ServerOptions {
  Limits limits;
  int threads = 16;               // handler threads
  size_t max_queued = 1024;       // complete requests waiting for a handler thread
  size_t max_connections = 4096;  // open connections; more get 503 and close
  absl::Duration keep_alive_timeout = absl::Seconds(5);
  absl::Duration read_timeout = absl::Seconds(30);
  absl::Duration write_timeout = absl::Seconds(30);
  absl::Duration linger = absl::Seconds(2);
};

class Connection;

// One request's response. Exactly one of Send or StartStream (then Write...,
// EndStream); a handler that returns without either gets a 500. Writes return
// false once the client is gone or a write blocked for write_timeout; later
// writes are no-ops.
class Responder {
 public:
  // A whole response with Content-Length (for HEAD: without the body).
  // `headers` must not hold Content-Length, Transfer-Encoding or Connection.
  bool Send(int status, const Headers& headers, std::string_view body);

  // A streamed body: chunked on HTTP/1.1, ended by closing on HTTP/1.0.
  bool StartStream(int status, const Headers& headers);
  bool Write(std::string_view data);
  bool EndStream();

  // Closes the connection after this response (call before sending).
  void CloseAfter() { close_after_ = true; }

  // The client's side of the connection, without reading from it:
  // kHalfClosed when it has sent FIN (it may still read: half-close, or gone
  // entirely: a write tells), kGone when the connection is reset or a write
  // failed.
  enum class Peer { kOpen, kHalfClosed, kGone };
  Peer CheckPeer();

  bool responded() const { return head_sent_; }
  bool streaming() const { return streaming_; }
  bool broken() const { return broken_; }

 private:
  friend class Server;
  Responder(Connection& conn, const Request& request, absl::Duration write_timeout,
            const std::atomic<bool>& stopping)
      : conn_(conn), request_(request), write_timeout_(write_timeout), stopping_(stopping) {}
  bool KeepAlive() const;
  std::string Head(int status, const Headers& headers, const std::string& framing) const;
  bool WriteRaw(std::string_view data);

  Connection& conn_;
  const Request& request_;
  const absl::Duration write_timeout_;
  const std::atomic<bool>& stopping_;  // the server's: Stop() has begun
  bool close_after_ = false;
  bool head_sent_ = false;
  bool streaming_ = false;
  bool stream_ended_ = false;
  bool broken_ = false;
};

using Handler = std::function<void(const Request&, Responder&)>;

// The body of a response the server makes itself (status 400..505 as above).
// `path` is the request's path when its request line was read, else "".
struct ErrorResponse {
  Headers headers;  // e.g. Content-Type
  std::string body;
};
using ErrorBody =
    std::function<ErrorResponse(int status, const std::string& message, const std::string& path)>;

class Server {
 public:
  Server(ServerOptions options, Handler handler, ErrorBody error_body);
  ~Server();  // Stop()

  // Binds host:port (port 0 = any free port; IPv6 hosts like "::1") and starts
  // serving. Returns the bound port; UNAVAILABLE "cannot listen on HOST:PORT:
  // why" when it cannot bind, INVALID_ARGUMENT for a host that is not an
  // address or resolvable name.
  absl::StatusOr<int> Start(const std::string& host, int port);

  // Stops accepting, closes idle connections, lets the handlers finish the
  // requests they hold (and those already queued), then returns.
  void Stop();

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dmoe::http1

#endif  // DMOE_COMMON_HTTP1_SERVER_H_
