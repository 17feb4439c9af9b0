// A raw-TCP echo of framed messages: the floor that bench/wire_bench compares
// the gRPC Dispatch round trip with (same bytes, same processes, no gRPC).
// A benchmarking aid only, off unless dmoe-expert is given --raw-echo-port or
// --raw-echo-port-file; it touches nothing of the expert server.
//
// Protocol (little-endian), any number of frames per connection:
//   client: [u64 request_bytes][u64 reply_bytes][request_bytes of payload]
//   server: [reply_bytes of payload]   (once the whole request was read)
// A frame whose request or reply exceeds max_frame_bytes closes the connection,
// as does a client that goes away mid-frame. Sockets are TCP_NODELAY.
//
// Memory: each connection reads into and replies from its own buffers, grown to
// the largest frame it has seen (at most max_frame_bytes each) and reused, so a
// round trip touches the same amount of memory on both sides as a gRPC message
// of that size does, and steady-state frames allocate nothing.
//
// Thread safety: Start and Stop may be called from any thread; Stop (also run
// by the destructor) closes the listener and every connection and joins the
// threads (one acceptor plus one per connection, at most max_connections).
#ifndef DMOE_EXPERT_SERVICE_RAW_ECHO_H_
#define DMOE_EXPERT_SERVICE_RAW_ECHO_H_

#include <cstddef>
#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace dmoe::expert {

struct RawEchoOptions {
  std::string host = "127.0.0.1";             // IPv4 address to listen on
  int port = 0;                               // 0 = any free port (see RawEchoServer::port)
  size_t max_frame_bytes = size_t{64} << 20;  // per request and per reply
  int max_connections = 8;                    // further connections are accepted and closed
};

class RawEchoServer {
 public:
  // Binds, listens and starts the acceptor thread. InvalidArgument for a bad
  // host or option, Unavailable when the address cannot be bound.
  static absl::StatusOr<std::unique_ptr<RawEchoServer>> Start(RawEchoOptions options);
  ~RawEchoServer();
  RawEchoServer(const RawEchoServer&) = delete;
  RawEchoServer& operator=(const RawEchoServer&) = delete;

  int port() const;  // the bound port
  // Idempotent.
  void Stop();

 private:
  class Impl;
  explicit RawEchoServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace dmoe::expert

#endif  // DMOE_EXPERT_SERVICE_RAW_ECHO_H_
