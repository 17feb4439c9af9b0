#include "testing/http.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace dmoe::testing {
LoopbackClient::LoopbackClient(int port, absl::Duration io_timeout) {
  fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd_ < 0) return;
  const timeval tv = absl::ToTimeval(io_timeout);
  setsockopt(fd_, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  connected_ = connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  // Reads poll in short slices so that ReadToClose / ReadUntil keep their deadlines.
  const timeval slice{0, 50000};
  setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &slice, sizeof(slice));
}

LoopbackClient::~LoopbackClient() { Close(); }

bool LoopbackClient::Send(std::string_view bytes) {
  if (!connected_) return false;
  for (size_t sent = 0; sent < bytes.size();) {
    const ssize_t n = send(fd_, bytes.data() + sent, bytes.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) return false;
    sent += static_cast<size_t>(n);
  }
  return true;
}

void LoopbackClient::ShutdownWrite() {
  if (fd_ >= 0) shutdown(fd_, SHUT_WR);
}

void LoopbackClient::Close() {
  if (fd_ >= 0) close(fd_);
  fd_ = -1;
}

int LoopbackClient::ReadSome() {
  if (fd_ < 0 || !connected_) return 0;
  char buf[16384];
  const ssize_t n = read(fd_, buf, sizeof(buf));
  if (n > 0) {
    got_.append(buf, static_cast<size_t>(n));
    return 1;
  }
  if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) return 0;
  return -1;
}

std::string LoopbackClient::ReadToClose(absl::Duration timeout, bool* closed) {
  const absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    if (ReadSome() == 0) {
      if (closed != nullptr) *closed = true;
      return got_;
    }
  }
  if (closed != nullptr) *closed = false;
  return got_;
}

std::string LoopbackClient::ReadUntil(std::string_view what, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline && got_.find(what) == std::string::npos) {
    if (ReadSome() == 0) break;
  }
  return got_;
}

std::string LoopbackClient::ReadToCloseWhileActive(absl::Duration idle, bool* closed) {
  absl::Time deadline = absl::Now() + idle;
  while (absl::Now() < deadline) {
    const int r = ReadSome();
    if (r == 0) {
      if (closed != nullptr) *closed = true;
      return got_;
    }
    if (r > 0) deadline = absl::Now() + idle;
  }
  if (closed != nullptr) *closed = false;
  return got_;
}

HttpResponse ParseHttpResponse(const std::string& raw) {
  HttpResponse res;
  const size_t head_end = raw.find("\r\n\r\n");
  if (raw.compare(0, 9, "HTTP/1.1 ") != 0 || head_end == std::string::npos) {
    return {0, "not an HTTP answer:\n" + raw};
  }
  res.status = std::atoi(raw.c_str() + 9);
  std::string head = raw.substr(0, head_end);
  for (char& ch : head) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  std::string rest = raw.substr(head_end + 4);
  if (head.find("\r\ntransfer-encoding: chunked") == std::string::npos) {
    res.body = std::move(rest);
    return res;
  }
  // Chunked: HEX-SIZE[;ext]\r\nDATA\r\n ... 0\r\n\r\n
  for (size_t pos = 0;;) {
    const size_t eol = rest.find("\r\n", pos);
    if (eol == std::string::npos) return {0, "truncated chunked body:\n" + rest};
    const size_t size = std::strtoul(rest.c_str() + pos, nullptr, 16);
    if (size == 0) break;
    if (eol + 2 + size > rest.size()) return {0, "truncated chunk:\n" + rest};
    res.body.append(rest, eol + 2, size);
    pos = eol + 2 + size + 2;
  }
  return res;
}

HttpResponse HttpRequest(int port, const std::string& method, const std::string& path,
                         const std::string& body, int timeout_s) {
  LoopbackClient c(port, absl::Seconds(timeout_s));
  if (!c.connected()) return {0, absl::StrCat("connect to port ", port, " failed")};
  std::string req = absl::StrCat(method, " ", path, " HTTP/1.1\r\nHost: 127.0.0.1:", port,
                                 "\r\nConnection: close\r\n");
  if (method == "POST") {
    absl::StrAppend(&req, "Content-Type: application/json\r\nContent-Length: ", body.size(),
                    "\r\n");
  }
  absl::StrAppend(&req, "\r\n", body);
  if (!c.Send(req)) return {0, "send failed"};
  bool closed = false;
  const std::string raw = c.ReadToCloseWhileActive(absl::Seconds(timeout_s), &closed);
  if (!closed) {
    return {0, absl::StrCat("recv timed out (", timeout_s, " s without a byte) after ", raw.size(),
                            " bytes:\n", raw)};
  }
  return ParseHttpResponse(raw);
}

std::string HttpGetBody(int port, const std::string& path) {
  const HttpResponse r = HttpRequest(port, "GET", path, "", 10);
  return r.status == 0 ? "" : r.body;
}

}  // namespace dmoe::testing
