#include "expert_service/raw_echo.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <bit>
#include <cstdint>
#include <cstring>
#include <list>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"

namespace dmoe::expert {
namespace {

static_assert(std::endian::native == std::endian::little,
              "the frame header is read as little-endian u64s");

// Reads exactly n bytes; false on EOF, error or shutdown.
bool ReadFull(int fd, void* buf, size_t n) {
  char* p = static_cast<char*>(buf);
  while (n > 0) {
    const ssize_t r = recv(fd, p, n, 0);
    if (r > 0) {
      p += r;
      n -= static_cast<size_t>(r);
    } else if (r < 0 && errno == EINTR) {
      continue;
    } else {
      return false;
    }
  }
  return true;
}

bool WriteFull(int fd, const void* buf, size_t n) {
  const char* p = static_cast<const char*>(buf);
  while (n > 0) {
    // MSG_NOSIGNAL: a client that went away is an error here, not SIGPIPE.
    const ssize_t r = send(fd, p, n, MSG_NOSIGNAL);
    if (r > 0) {
      p += r;
      n -= static_cast<size_t>(r);
    } else if (r < 0 && errno == EINTR) {
      continue;
    } else {
      return false;
    }
  }
  return true;
}

}  // namespace

class RawEchoServer::Impl {
 public:
  Impl(RawEchoOptions options, int listen_fd, int port, int wake_read, int wake_write)
      : options_(std::move(options)),
        listen_fd_(listen_fd),
        port_(port),
        wake_read_(wake_read),
        wake_write_(wake_write) {
    acceptor_ = std::thread([this] { AcceptLoop(); });
  }
  ~Impl() { Stop(); }

  int port() const { return port_; }

  void Stop() {
    {
      absl::MutexLock lock(&mu_);
      if (stopped_) return;
      stopped_ = true;
    }
    const char byte = 0;
    while (write(wake_write_, &byte, 1) < 0 && errno == EINTR) {
    }
    acceptor_.join();
    // No new connections now; unblock every connection thread and join it.
    std::list<Conn> conns;
    {
      absl::MutexLock lock(&mu_);
      conns.swap(conns_);
    }
    for (Conn& c : conns) shutdown(c.fd, SHUT_RDWR);
    for (Conn& c : conns) {
      c.thread.join();
      close(c.fd);
    }
    close(listen_fd_);
    close(wake_read_);
    close(wake_write_);
  }

 private:
  struct Conn {
    int fd = -1;  // closed by whoever joins the thread, never by the thread
    std::thread thread;
    std::atomic<bool> done{false};
  };

  void AcceptLoop() {
    while (true) {
      pollfd fds[2] = {{listen_fd_, POLLIN, 0}, {wake_read_, POLLIN, 0}};
      const int r = poll(fds, 2, -1);
      if (r < 0 && errno == EINTR) continue;
      if (r < 0 || (fds[1].revents & POLLIN)) return;
      if (!(fds[0].revents & POLLIN)) continue;
      const int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) continue;
      const int one = 1;
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      absl::MutexLock lock(&mu_);
      ReapLocked();
      if (stopped_ || conns_.size() >= static_cast<size_t>(options_.max_connections)) {
        close(fd);
        continue;
      }
      Conn& c = conns_.emplace_back();
      c.fd = fd;
      c.thread = std::thread([this, &c] {
        Serve(c.fd);
        c.done.store(true, std::memory_order_release);
      });
    }
  }

  // Joins and closes the connections whose client went away.
  void ReapLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    for (auto it = conns_.begin(); it != conns_.end();) {
      if (it->done.load(std::memory_order_acquire)) {
        it->thread.join();
        close(it->fd);
        it = conns_.erase(it);
      } else {
        ++it;
      }
    }
  }

  void Serve(int fd) const {
    std::vector<char> in, out;  // grown to the largest frame, reused
    while (true) {
      uint64_t header[2];
      if (!ReadFull(fd, header, sizeof(header))) return;
      const uint64_t request_bytes = header[0], reply_bytes = header[1];
      if (request_bytes > options_.max_frame_bytes || reply_bytes > options_.max_frame_bytes) {
        return;
      }
      if (in.size() < request_bytes) in.resize(request_bytes);
      if (!ReadFull(fd, in.data(), request_bytes)) return;
      if (out.size() < reply_bytes) out.resize(reply_bytes);
      if (!WriteFull(fd, out.data(), reply_bytes)) return;
    }
  }

  // Const after construction.
  const RawEchoOptions options_;
  const int listen_fd_;
  const int port_;
  const int wake_read_, wake_write_;  // a pipe that wakes the acceptor to stop
  std::thread acceptor_;

  absl::Mutex mu_;
  bool stopped_ ABSL_GUARDED_BY(mu_) = false;
  std::list<Conn> conns_ ABSL_GUARDED_BY(mu_);  // list: stable addresses
};

absl::StatusOr<std::unique_ptr<RawEchoServer>> RawEchoServer::Start(RawEchoOptions options) {
  if (options.port < 0 || options.port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("raw echo: port must be in [0, 65535], got ", options.port));
  }
  if (options.max_connections < 1 || options.max_frame_bytes == 0) {
    return absl::InvalidArgumentError(
        "raw echo: max_connections and max_frame_bytes must be positive");
  }
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(options.port));
  if (inet_pton(AF_INET, options.host.c_str(), &addr.sin_addr) != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("raw echo: '", options.host, "' is not an IPv4 address"));
  }
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    return absl::UnavailableError(absl::StrCat("raw echo: socket: ", std::strerror(errno)));
  }
  const int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  socklen_t len = sizeof(addr);
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || listen(fd, 16) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    const int err = errno;
    close(fd);
    return absl::UnavailableError(absl::StrCat("raw echo: cannot listen on ", options.host, ":",
                                               options.port, ": ", std::strerror(err)));
  }
  int wake[2];
  if (pipe2(wake, O_CLOEXEC) != 0) {
    const int err = errno;
    close(fd);
    return absl::UnavailableError(absl::StrCat("raw echo: pipe: ", std::strerror(err)));
  }
  const int port = ntohs(addr.sin_port);
  return std::unique_ptr<RawEchoServer>(
      new RawEchoServer(std::make_unique<Impl>(std::move(options), fd, port, wake[0], wake[1])));
}

RawEchoServer::RawEchoServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
RawEchoServer::~RawEchoServer() { Stop(); }
int RawEchoServer::port() const { return impl_->port(); }
void RawEchoServer::Stop() { impl_->Stop(); }

}  // namespace dmoe::expert
