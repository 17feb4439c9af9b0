#include "common/http1/server.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <deque>
#include <exception>
#include <optional>
#include <thread>
#include <unordered_map>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"

namespace dmoe::http1 {

// One client connection. While the reactor reads it, only the reactor touches
// it; once a complete request is handed to a handler thread, only that thread
// does, until it hands the connection back (Impl::Return).
class Connection {
 public:
  explicit Connection(int fd, Limits limits) : fd(fd), parser(limits) {}
  ~Connection() {
    if (fd >= 0) close(fd);
  }

  const int fd;
  std::string in;  // bytes read and not yet parsed (a pipelined request)
  RequestParser parser;
  absl::Time last_active = absl::Now();
  std::optional<absl::Time> request_start;  // first byte of the current request
  bool continue_sent = false;
  bool peer_eof = false;
  bool in_epoll = false;
  bool lingering = false;
  absl::Time linger_deadline;
  size_t drained = 0;
};

namespace {

constexpr size_t kReadChunk = 64 << 10;
constexpr size_t kMaxLingerDrain = 1 << 20;

std::string HttpDate() {
  return absl::FormatTime("%a, %d %b %Y %H:%M:%S GMT", absl::Now(), absl::UTCTimeZone());
}

// Writes all of `data` to the non-blocking `fd`, waiting up to `timeout` each
// time the socket is full. False on an error or timeout.
bool WriteAll(int fd, std::string_view data, absl::Duration timeout) {
  while (!data.empty()) {
    const ssize_t n = send(fd, data.data(), data.size(), MSG_NOSIGNAL);
    if (n > 0) {
      data.remove_prefix(static_cast<size_t>(n));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      pollfd p{fd, POLLOUT, 0};
      const int ms = static_cast<int>(absl::ToInt64Milliseconds(timeout));
      const int r = poll(&p, 1, ms);
      if (r > 0 && (p.revents & POLLOUT) != 0) continue;
      if (r < 0 && errno == EINTR) continue;
      return false;
    }
    return false;
  }
  return true;
}

}  // namespace

bool Responder::KeepAlive() const {
  return request_.keep_alive && !close_after_ && !stopping_.load() && !broken_;
}

std::string Responder::Head(int status, const Headers& headers, const std::string& framing) const {
  std::string h = absl::StrCat("HTTP/1.1 ", status, " ", ReasonPhrase(status),
                               "\r\nDate: ", HttpDate(), "\r\n");
  for (const auto& [name, value] : headers) absl::StrAppend(&h, name, ": ", value, "\r\n");
  absl::StrAppend(&h, framing, KeepAlive() ? "" : "Connection: close\r\n", "\r\n");
  return h;
}

bool Responder::WriteRaw(std::string_view data) {
  if (broken_) return false;
  if (!WriteAll(conn_.fd, data, write_timeout_)) broken_ = true;
  return !broken_;
}

bool Responder::Send(int status, const Headers& headers, std::string_view body) {
  if (head_sent_) return false;
  head_sent_ = true;
  std::string out = Head(status, headers, absl::StrCat("Content-Length: ", body.size(), "\r\n"));
  if (request_.method != "HEAD") out.append(body);
  return WriteRaw(out);
}

bool Responder::StartStream(int status, const Headers& headers) {
  if (head_sent_) return false;
  head_sent_ = true;
  streaming_ = true;
  // HTTP/1.0 has no chunked coding: the body ends when the connection does.
  if (request_.minor_version == 0) close_after_ = true;
  return WriteRaw(
      Head(status, headers, request_.minor_version == 0 ? "" : "Transfer-Encoding: chunked\r\n"));
}

bool Responder::Write(std::string_view data) {
  if (!streaming_ || stream_ended_) return false;
  if (data.empty() || request_.method == "HEAD") return !broken_;
  if (request_.minor_version == 0) return WriteRaw(data);
  std::string chunk;
  chunk.reserve(data.size() + 16);
  static constexpr char kHex[] = "0123456789abcdef";
  std::string size;
  for (size_t n = data.size(); n > 0; n >>= 4) size.insert(size.begin(), kHex[n & 15]);
  absl::StrAppend(&chunk, size, "\r\n", absl::string_view(data.data(), data.size()), "\r\n");
  return WriteRaw(chunk);
}

bool Responder::EndStream() {
  if (!streaming_ || stream_ended_) return false;
  stream_ended_ = true;
  if (request_.minor_version == 0 || request_.method == "HEAD") return !broken_;
  return WriteRaw("0\r\n\r\n");
}

Responder::Peer Responder::CheckPeer() {
  if (broken_) return Peer::kGone;
  pollfd p{conn_.fd, POLLIN | POLLRDHUP, 0};
  if (poll(&p, 1, 0) <= 0) return Peer::kOpen;
  if ((p.revents & (POLLERR | POLLHUP | POLLNVAL)) != 0) return Peer::kGone;
  if ((p.revents & POLLRDHUP) != 0) return Peer::kHalfClosed;
  return Peer::kOpen;  // readable: a pipelined request, served after this one
}

class Server::Impl {
 public:
  Impl(ServerOptions options, Handler handler, ErrorBody error_body)
      : options_(std::move(options)),
        handler_(std::move(handler)),
        error_body_(std::move(error_body)) {}

  ~Impl() { Stop(); }

  absl::StatusOr<int> Start(const std::string& host, int port) {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    addrinfo* res = nullptr;
    const std::string service = std::to_string(port);
    if (const int rc =
            getaddrinfo(host.empty() ? nullptr : host.c_str(), service.c_str(), &hints, &res);
        rc != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("cannot listen on ", host, ":", port, ": ", gai_strerror(rc)));
    }
    std::string why = "no address";
    for (addrinfo* a = res; a != nullptr && listen_fd_ < 0; a = a->ai_next) {
      const int fd =
          socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
      if (fd < 0) continue;
      const int one = 1;
      setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
      if (bind(fd, a->ai_addr, a->ai_addrlen) == 0 && listen(fd, 1024) == 0) {
        listen_fd_ = fd;
        break;
      }
      why = std::strerror(errno);
      close(fd);
    }
    freeaddrinfo(res);
    if (listen_fd_ < 0) {
      return absl::UnavailableError(absl::StrCat("cannot listen on ", host, ":", port, ": ", why));
    }
    sockaddr_storage bound{};
    socklen_t len = sizeof(bound);
    getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&bound), &len);
    const int bound_port = bound.ss_family == AF_INET6
                               ? ntohs(reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port)
                               : ntohs(reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
    epoll_fd_ = epoll_create1(EPOLL_CLOEXEC);
    wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = listen_fd_;
    epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, listen_fd_, &ev);
    ev.data.fd = wake_fd_;
    epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, wake_fd_, &ev);
    for (int i = 0; i < std::max(1, options_.threads); ++i) {
      workers_.emplace_back([this] { WorkerLoop(); });
    }
    reactor_ = std::thread([this] { ReactorLoop(); });
    return bound_port;
  }

  void Stop() {
    if (!reactor_.joinable()) return;
    {
      absl::MutexLock lock(&mu_);
      stopping_ = true;
    }
    stopping_flag_ = true;
    Wake();
    reactor_.join();
    for (std::thread& t : workers_) t.join();
    workers_.clear();
    conns_.clear();
    for (int* fd : {&listen_fd_, &epoll_fd_, &wake_fd_}) {
      if (*fd >= 0) close(*fd);
      *fd = -1;
    }
  }

 private:
  enum class After { kKeep, kLinger, kClose };

  void Wake() {
    const uint64_t one = 1;
    [[maybe_unused]] ssize_t n = write(wake_fd_, &one, sizeof(one));
  }

  bool Stopping() {
    absl::MutexLock lock(&mu_);
    return stopping_;
  }

  // ---- reactor thread ----

  void ReactorLoop() {
    epoll_event events[256];
    bool listening = true;
    absl::Time last_sweep = absl::Now();
    while (true) {
      const int n = epoll_wait(epoll_fd_, events, 256, 100);
      for (int i = 0; i < n; ++i) {
        const int fd = events[i].data.fd;
        if (fd == listen_fd_) {
          Accept();
        } else if (fd == wake_fd_) {
          uint64_t v;
          [[maybe_unused]] ssize_t r = read(wake_fd_, &v, sizeof(v));
        } else if (auto it = conns_.find(fd); it != conns_.end()) {
          std::shared_ptr<Connection> c = it->second;
          if (c->lingering) {
            Drain(c);
          } else {
            OnReadable(c);
          }
        }
      }
      TakeReturns();
      const bool stopping = Stopping();
      if (stopping && listening) {
        epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, listen_fd_, nullptr);
        close(listen_fd_);
        listen_fd_ = -1;
        listening = false;
      }
      if (stopping || absl::Now() - last_sweep > absl::Milliseconds(100)) {
        last_sweep = absl::Now();
        Sweep(stopping);
      }
      if (stopping) {
        absl::MutexLock lock(&mu_);
        if (handling_ == 0 && returns_.empty() && conns_.empty()) {
          workers_done_ = true;
          return;
        }
      }
    }
  }

  void Accept() {
    while (true) {
      const int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) return;  // EAGAIN, or a transient error (EMFILE...): next readiness
      const int one = 1;
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      auto c = std::make_shared<Connection>(fd, options_.limits);
      conns_.emplace(fd, c);
      if (conns_.size() > options_.max_connections) {
        Refuse(c, 503,
               absl::StrCat("server busy: ", options_.max_connections,
                            " connections open; retry later"));
        continue;
      }
      Arm(c);
    }
  }

  void Arm(const std::shared_ptr<Connection>& c) {
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLRDHUP;
    ev.data.fd = c->fd;
    epoll_ctl(epoll_fd_, c->in_epoll ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, c->fd, &ev);
    c->in_epoll = true;
  }

  void Disarm(const std::shared_ptr<Connection>& c) {
    if (!c->in_epoll) return;
    epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, c->fd, nullptr);
    c->in_epoll = false;
  }

  void CloseConn(const std::shared_ptr<Connection>& c) {
    Disarm(c);
    conns_.erase(c->fd);  // the destructor closes the socket
  }

  // Reads what the client sent (at most up to the end of one request, plus
  // what one read brought beyond it) and acts on the parser's state.
  void OnReadable(const std::shared_ptr<Connection>& c) {
    char buf[kReadChunk];
    while (c->parser.state() == RequestParser::State::kNeedMore && !c->peer_eof) {
      const ssize_t n = recv(c->fd, buf, sizeof(buf), 0);
      if (n > 0) {
        c->in.append(buf, static_cast<size_t>(n));
        c->last_active = absl::Now();
        Parse(c);
        continue;
      }
      if (n == 0) {
        c->peer_eof = true;
        break;
      }
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) break;
      CloseConn(c);  // reset by the client
      return;
    }
    Advance(c);
  }

  void Parse(const std::shared_ptr<Connection>& c) {
    if (c->parser.state() != RequestParser::State::kNeedMore || c->in.empty()) return;
    const size_t used = c->parser.Consume(c->in);
    c->in.erase(0, used);
    if (c->parser.started() && !c->request_start) c->request_start = absl::Now();
  }

  void Advance(const std::shared_ptr<Connection>& c) {
    RequestParser& p = c->parser;
    switch (p.state()) {
      case RequestParser::State::kError:
        Refuse(c, p.error_status(), p.error_message());
        return;
      case RequestParser::State::kComplete:
        Dispatch(c);
        return;
      case RequestParser::State::kNeedMore:
        break;
    }
    if (c->peer_eof) {
      // Nothing more will come: a partial request cannot complete.
      CloseConn(c);
      return;
    }
    if (p.head_complete() && p.expects_body() && p.request().expect_continue && !c->continue_sent) {
      c->continue_sent = true;
      WriteAll(c->fd, "HTTP/1.1 100 Continue\r\n\r\n", absl::ZeroDuration());
    }
    Arm(c);
  }

  void Dispatch(const std::shared_ptr<Connection>& c) {
    Disarm(c);
    {
      absl::MutexLock lock(&mu_);
      if (queue_.size() < options_.max_queued) {
        queue_.push_back(c);
        ++handling_;
        return;
      }
    }
    Refuse(c, 503,
           absl::StrCat("server busy: ", options_.max_queued,
                        " requests waiting for a handler; retry later"));
  }

  // Answers `status` with "Connection: close", then lingers.
  void Refuse(const std::shared_ptr<Connection>& c, int status, const std::string& message) {
    const std::string path =
        c->parser.head_complete() || c->parser.state() == RequestParser::State::kComplete
            ? c->parser.request().path
            : std::string();
    // Best effort without waiting: the reactor must not block, and a socket
    // that was only read from has room for a short answer.
    WriteAll(c->fd, ErrorText(status, message, path, /*head_only=*/false), absl::ZeroDuration());
    Linger(c);
  }

  std::string ErrorText(int status, const std::string& message, const std::string& path,
                        bool head_only) const {
    ErrorResponse r = error_body_ ? error_body_(status, message, path) : ErrorResponse();
    if (r.body.empty() && !error_body_) r.body = message + "\n";
    std::string h = absl::StrCat("HTTP/1.1 ", status, " ", ReasonPhrase(status),
                                 "\r\nDate: ", HttpDate(), "\r\n");
    for (const auto& [name, value] : r.headers) absl::StrAppend(&h, name, ": ", value, "\r\n");
    absl::StrAppend(&h, "Content-Length: ", r.body.size(), "\r\nConnection: close\r\n\r\n");
    if (!head_only) h += r.body;
    return h;
  }

  // Shuts the sending side and reads (discarding) until the client closes or
  // `linger` passes: closing with unread input would reset the connection and
  // could destroy the answer before the client reads it.
  void Linger(const std::shared_ptr<Connection>& c) {
    shutdown(c->fd, SHUT_WR);
    if (c->peer_eof) {
      CloseConn(c);
      return;
    }
    c->lingering = true;
    c->linger_deadline = absl::Now() + options_.linger;
    Arm(c);
  }

  void Drain(const std::shared_ptr<Connection>& c) {
    char buf[kReadChunk];
    while (true) {
      const ssize_t n = recv(c->fd, buf, sizeof(buf), 0);
      if (n > 0) {
        c->drained += static_cast<size_t>(n);
        if (c->drained > kMaxLingerDrain) return CloseConn(c);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
      return CloseConn(c);  // EOF or reset
    }
  }

  // Idle, slow and lingering connections past their time; all idle ones
  // while stopping.
  void Sweep(bool stopping) {
    const absl::Time now = absl::Now();
    std::vector<std::shared_ptr<Connection>> expired;
    for (const auto& [fd, c] : conns_) {
      if (!c->in_epoll) continue;  // with a handler (or being handed back)
      if (c->lingering) {
        if (now > c->linger_deadline || stopping) expired.push_back(c);
      } else if (!c->parser.started() && c->in.empty()) {
        if (stopping || now - c->last_active > options_.keep_alive_timeout) expired.push_back(c);
      } else if (stopping ||
                 (c->request_start && now - *c->request_start > options_.read_timeout)) {
        expired.push_back(c);
      }
    }
    for (const auto& c : expired) {
      if (c->lingering || !c->parser.started()) {
        CloseConn(c);
      } else if (stopping) {
        Refuse(c, 503, "server is shutting down");
        CloseConn(c);
      } else {
        Refuse(c, 408,
               absl::StrCat("request not received within ",
                            absl::FormatDuration(options_.read_timeout)));
      }
    }
  }

  void TakeReturns() {
    std::vector<std::pair<std::shared_ptr<Connection>, After>> returns;
    {
      absl::MutexLock lock(&mu_);
      returns.swap(returns_);
      handling_ -= static_cast<int>(returns.size());
    }
    for (auto& [c, after] : returns) {
      switch (after) {
        case After::kClose:
          CloseConn(c);
          break;
        case After::kLinger:
          Linger(c);
          break;
        case After::kKeep:
          c->last_active = absl::Now();
          Arm(c);
          if (!c->in.empty()) OnReadable(c);  // a partial pipelined request
          break;
      }
    }
  }

  // ---- handler threads ----

  void WorkerLoop() {
    while (true) {
      std::shared_ptr<Connection> c;
      {
        absl::MutexLock lock(&mu_);
        mu_.Await(absl::Condition(
            +[](Impl* self) ABSL_EXCLUSIVE_LOCKS_REQUIRED(self->mu_) {
              return !self->queue_.empty() || self->workers_done_;
            },
            this));
        if (queue_.empty()) return;
        c = std::move(queue_.front());
        queue_.pop_front();
      }
      const After after = Serve(*c);
      {
        absl::MutexLock lock(&mu_);
        returns_.emplace_back(std::move(c), after);
      }
      Wake();
    }
  }

  // Serves the complete request and those pipelined behind it.
  After Serve(Connection& c) {
    while (true) {
      const Request request = c.parser.TakeRequest();
      Responder r(c, request, options_.write_timeout, stopping_flag_);
      try {
        handler_(request, r);
      } catch (const std::exception& e) {
        if (!r.responded()) {
          r.CloseAfter();
          r.Send(500, {{"Content-Type", "text/plain"}}, absl::StrCat("internal error: ", e.what()));
        }
      } catch (...) {
        if (!r.responded()) {
          r.CloseAfter();
          r.Send(500, {{"Content-Type", "text/plain"}}, "internal error");
        }
      }
      if (!r.responded()) {
        r.CloseAfter();
        r.Send(500, {{"Content-Type", "text/plain"}}, "the handler sent no response");
      }
      if (r.broken()) return After::kClose;
      if (r.streaming() && !r.stream_ended_) return After::kClose;  // the body is unfinished
      if (!r.KeepAlive()) return After::kLinger;
      c.parser.Reset();
      c.request_start.reset();
      c.continue_sent = false;
      if (c.in.empty()) return After::kKeep;
      const size_t used = c.parser.Consume(c.in);
      c.in.erase(0, used);
      if (c.parser.started()) c.request_start = absl::Now();
      if (c.parser.state() == RequestParser::State::kNeedMore) return After::kKeep;
      if (c.parser.state() == RequestParser::State::kError) {
        WriteAll(c.fd,
                 ErrorText(c.parser.error_status(), c.parser.error_message(),
                           c.parser.head_complete() ? c.parser.request().path : "", false),
                 options_.write_timeout);
        return After::kLinger;
      }
    }
  }

  const ServerOptions options_;
  const Handler handler_;
  const ErrorBody error_body_;

  // Reactor thread only (after Start).
  int listen_fd_ = -1;
  int epoll_fd_ = -1;
  int wake_fd_ = -1;
  std::unordered_map<int, std::shared_ptr<Connection>> conns_;
  std::thread reactor_;
  std::vector<std::thread> workers_;

  std::atomic<bool> stopping_flag_{false};  // stopping_, for the Responders
  absl::Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool workers_done_ ABSL_GUARDED_BY(mu_) = false;
  std::deque<std::shared_ptr<Connection>> queue_ ABSL_GUARDED_BY(mu_);
  int handling_ ABSL_GUARDED_BY(mu_) = 0;  // queued or with a handler
  std::vector<std::pair<std::shared_ptr<Connection>, After>> returns_ ABSL_GUARDED_BY(mu_);
};

Server::Server(ServerOptions options, Handler handler, ErrorBody error_body)
    : impl_(std::make_unique<Impl>(std::move(options), std::move(handler), std::move(error_body))) {
}

Server::~Server() { Stop(); }

absl::StatusOr<int> Server::Start(const std::string& host, int port) {
  return impl_->Start(host, port);
}

void Server::Stop() { impl_->Stop(); }

}  // namespace dmoe::http1
