#include "bench/serve/http_stream.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "absl/strings/ascii.h"

namespace dmoe::bench::serve {
namespace {

constexpr size_t kMaxHead = 64 << 10;
constexpr size_t kMaxBody = size_t{64} << 20;

double Since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

bool ResponseParser::Fail(std::string why) {
  state_ = State::kFailed;
  error_ = std::move(why);
  return false;
}

bool ResponseParser::ParseHead(std::string_view head) {
  // Status line: HTTP/1.x NNN reason
  const size_t eol = head.find("\r\n");
  const std::string_view line = head.substr(0, eol);
  if (line.size() < 12 || line.substr(0, 7) != "HTTP/1." || line[8] != ' ' ||
      !std::isdigit(static_cast<unsigned char>(line[9])) ||
      !std::isdigit(static_cast<unsigned char>(line[10])) ||
      !std::isdigit(static_cast<unsigned char>(line[11]))) {
    return Fail("bad status line: " + std::string(line.substr(0, 80)));
  }
  status_ = (line[9] - '0') * 100 + (line[10] - '0') * 10 + (line[11] - '0');
  keep_alive_ = line[7] == '1';  // HTTP/1.1 keeps alive unless told otherwise
  size_t pos = eol == std::string_view::npos ? head.size() : eol + 2;
  while (pos < head.size()) {
    size_t end = head.find("\r\n", pos);
    if (end == std::string_view::npos) end = head.size();
    const std::string_view h = head.substr(pos, end - pos);
    pos = end + 2;
    if (h.empty()) continue;
    const size_t colon = h.find(':');
    if (colon == std::string_view::npos || colon == 0) {
      return Fail("bad header line: " + std::string(h.substr(0, 80)));
    }
    const absl::string_view line_view(h.data(), h.size());
    const std::string name =
        absl::AsciiStrToLower(absl::StripAsciiWhitespace(line_view.substr(0, colon)));
    const std::string value =
        absl::AsciiStrToLower(absl::StripAsciiWhitespace(line_view.substr(colon + 1)));
    if (name == "content-length") {
      char* endp = nullptr;
      const long long n = std::strtoll(value.c_str(), &endp, 10);
      if (value.empty() || *endp != '\0' || n < 0) return Fail("bad Content-Length: " + value);
      content_length_ = n;
    } else if (name == "transfer-encoding") {
      chunked_ = value.find("chunked") != std::string::npos;
    } else if (name == "connection") {
      if (value.find("close") != std::string::npos) keep_alive_ = false;
      if (value.find("keep-alive") != std::string::npos) keep_alive_ = true;
    } else if (name == "content-type") {
      sse_ = value.find("text/event-stream") != std::string::npos;
    }
  }
  if (chunked_) {
    state_ = State::kChunkSize;
  } else if (content_length_ >= 0) {
    remaining_ = content_length_;
    state_ = State::kBody;
  } else {
    keep_alive_ = false;  // close-delimited
    state_ = State::kBody;
  }
  return true;
}

void ResponseParser::Body(std::string_view bytes, double t) {
  if (!sse_) {
    body_.append(bytes);
    return;
  }
  for (char c : bytes) {
    if (c != '\n') {
      body_.push_back(c);
      continue;
    }
    std::string_view line(body_);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.substr(0, 5) == "data:") {
      line.remove_prefix(5);
      if (!line.empty() && line.front() == ' ') line.remove_prefix(1);
      events_.push_back({t, std::string(line)});
    }
    body_.clear();
  }
}

void ResponseParser::Finish(double t) {
  state_ = State::kDone;
  done_t_ = t;
}

bool ResponseParser::Feed(std::string_view bytes, double t) {
  if (state_ == State::kFailed) return false;
  if (state_ == State::kDone) return bytes.empty() || Fail("bytes after the end of the response");
  if (first_byte_t_ < 0 && !bytes.empty()) first_byte_t_ = t;
  pending_.append(bytes);
  size_t pos = 0;
  while (state_ != State::kDone && state_ != State::kFailed) {
    const std::string_view rest = std::string_view(pending_).substr(pos);
    if (state_ == State::kHead) {
      const size_t end = rest.find("\r\n\r\n");
      if (end == std::string_view::npos) {
        if (rest.size() > kMaxHead) return Fail("response head over 64 KiB");
        break;
      }
      if (!ParseHead(rest.substr(0, end + 2))) return false;
      pos += end + 4;
      // 1xx, 204 and 304 answers have no body.
      if (status_ / 100 == 1 || status_ == 204 || status_ == 304) Finish(t);
      if (state_ == State::kBody && content_length_ == 0) Finish(t);
    } else if (state_ == State::kBody) {
      const size_t take =
          content_length_ >= 0 ? std::min<size_t>(rest.size(), remaining_) : rest.size();
      Body(rest.substr(0, take), t);
      pos += take;
      if (content_length_ >= 0) {
        remaining_ -= static_cast<int64_t>(take);
        if (remaining_ == 0) Finish(t);
      }
      if (body_.size() > kMaxBody) return Fail("response body over 64 MiB");
      if (take == rest.size() && state_ == State::kBody) break;
    } else if (state_ == State::kChunkSize) {
      const size_t eol = rest.find("\r\n");
      if (eol == std::string_view::npos) {
        if (rest.size() > 1024) return Fail("chunk size line over 1 KiB");
        break;
      }
      std::string_view size = rest.substr(0, eol);
      if (const size_t semi = size.find(';'); semi != std::string_view::npos) {
        size = size.substr(0, semi);
      }
      const absl::string_view stripped =
          absl::StripAsciiWhitespace(absl::string_view(size.data(), size.size()));
      size = std::string_view(stripped.data(), stripped.size());
      if (size.empty() || size.size() > 15) return Fail("bad chunk size: " + std::string(size));
      int64_t n = 0;
      for (char c : size) {
        if (!std::isxdigit(static_cast<unsigned char>(c))) {
          return Fail("bad chunk size: " + std::string(size));
        }
        n = n * 16 +
            (std::isdigit(static_cast<unsigned char>(c)) ? c - '0' : (c | 0x20) - 'a' + 10);
      }
      pos += eol + 2;
      remaining_ = n;
      state_ = n == 0 ? State::kTrailer : State::kChunkData;
    } else if (state_ == State::kChunkData) {
      if (rest.empty()) break;
      const size_t take = std::min<size_t>(rest.size(), remaining_);
      Body(rest.substr(0, take), t);
      pos += take;
      remaining_ -= static_cast<int64_t>(take);
      if (body_.size() > kMaxBody) return Fail("response body over 64 MiB");
      if (remaining_ == 0) state_ = State::kChunkEnd;
    } else if (state_ == State::kChunkEnd) {
      if (!rest.empty() && rest[0] != '\r') return Fail("chunk not followed by CRLF");
      if (rest.size() < 2) break;
      if (rest[1] != '\n') return Fail("chunk not followed by CRLF");
      pos += 2;
      state_ = State::kChunkSize;
    } else if (state_ == State::kTrailer) {
      const size_t eol = rest.find("\r\n");
      if (eol == std::string_view::npos) {
        if (rest.size() > kMaxHead) return Fail("trailer over 64 KiB");
        break;
      }
      pos += eol + 2;
      if (eol == 0) Finish(t);  // the blank line ends the trailer
    }
  }
  pending_.erase(0, pos);
  if (state_ == State::kDone && !pending_.empty())
    return Fail("bytes after the end of the response");
  return state_ != State::kFailed;
}

bool ResponseParser::FinishAtEof(double t) {
  if (state_ == State::kDone) return true;
  if (state_ == State::kBody && content_length_ < 0) {
    Finish(t);
    return true;
  }
  if (state_ == State::kFailed) return false;
  return Fail(state_ == State::kHead && pending_.empty() && first_byte_t_ < 0
                  ? "connection closed before an answer"
                  : "connection closed mid-response");
}

HttpStreamClient::HttpStreamClient(std::string host, int port, double timeout_s)
    : host_(std::move(host)), port_(port), timeout_s_(timeout_s) {}

HttpStreamClient::~HttpStreamClient() { Close(); }

void HttpStreamClient::Close() {
  if (fd_ >= 0) close(fd_);
  fd_ = -1;
}

bool HttpStreamClient::Connect(std::string* error) {
  Close();
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  const int rc = getaddrinfo(host_.c_str(), std::to_string(port_).c_str(), &hints, &res);
  if (rc != 0) {
    *error = "cannot resolve " + host_ + ": " + gai_strerror(rc);
    return false;
  }
  for (addrinfo* a = res; a != nullptr; a = a->ai_next) {
    const int fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    timeval tv{};
    tv.tv_sec = static_cast<time_t>(timeout_s_);
    tv.tv_usec = static_cast<suseconds_t>((timeout_s_ - static_cast<double>(tv.tv_sec)) * 1e6);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    const int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (connect(fd, a->ai_addr, a->ai_addrlen) == 0) {
      fd_ = fd;
      break;
    }
    *error = "connect to " + host_ + ":" + std::to_string(port_) + ": " + std::strerror(errno);
    close(fd);
  }
  freeaddrinfo(res);
  return fd_ >= 0;
}

HttpResult HttpStreamClient::Attempt(const std::string& request, bool reused, const StopFn& stop,
                                     bool* retry) {
  HttpResult r;
  *retry = false;
  last_send_ = std::chrono::steady_clock::now();
  for (size_t sent = 0; sent < request.size();) {
    const ssize_t n = send(fd_, request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) {
      *retry = reused;
      r.error = std::string("send: ") + std::strerror(errno);
      Close();
      return r;
    }
    sent += static_cast<size_t>(n);
  }
  ResponseParser p;
  char buf[16384];
  size_t seen = 0;  // events passed to `stop`
  while (!p.done()) {
    const ssize_t n = recv(fd_, buf, sizeof(buf), 0);
    const double t = Since(last_send_);
    if (n < 0) {
      r.error = errno == EAGAIN || errno == EWOULDBLOCK
                    ? "no byte for " + std::to_string(timeout_s_) + " s"
                    : std::string("recv: ") + std::strerror(errno);
      *retry = reused && p.first_byte_t() < 0 && errno != EAGAIN && errno != EWOULDBLOCK;
      Close();
      return r;
    }
    if (n == 0) {
      if (!p.FinishAtEof(t)) {
        *retry = reused && p.first_byte_t() < 0;
        r.error = p.error();
        Close();
        return r;
      }
      Close();
      break;
    }
    if (!p.Feed(std::string_view(buf, static_cast<size_t>(n)), t)) {
      r.error = p.error();
      Close();
      return r;
    }
    if (stop) {
      bool enough = false;
      for (; seen < p.events().size() && !enough; ++seen) enough = stop(p.events()[seen]);
      if (enough && !p.done()) {
        // The user stops reading: the server sees the connection close.
        Close();
        r.status = p.status();
        r.events.assign(p.events().begin(), p.events().begin() + static_cast<ptrdiff_t>(seen));
        r.first_byte_t = p.first_byte_t();
        r.done_t = r.events.empty() ? t : r.events.back().t;
        r.client_closed = true;
        return r;
      }
    }
  }
  if (!p.keep_alive()) Close();
  r.status = p.status();
  r.body = p.body();
  r.events = p.events();
  r.first_byte_t = p.first_byte_t();
  r.done_t = p.done_t();
  return r;
}

HttpResult HttpStreamClient::Post(const std::string& path, const std::string& json_body,
                                  StopFn stop) {
  const std::string request = "POST " + path + " HTTP/1.1\r\nHost: " + host_ + ":" +
                              std::to_string(port_) +
                              "\r\nContent-Type: application/json\r\nAccept: text/event-stream, "
                              "application/json\r\nContent-Length: " +
                              std::to_string(json_body.size()) + "\r\n\r\n" + json_body;
  return Request(request, stop);
}

HttpResult HttpStreamClient::Get(const std::string& path) {
  return Request("GET " + path + " HTTP/1.1\r\nHost: " + host_ + ":" + std::to_string(port_) +
                 "\r\n\r\n");
}

HttpResult HttpStreamClient::Request(const std::string& request, const StopFn& stop) {
  for (int attempt = 0; attempt < 2; ++attempt) {
    const bool reused = fd_ >= 0;
    if (!reused) {
      std::string error;
      if (!Connect(&error)) {
        HttpResult r;
        r.error = error;
        return r;
      }
    }
    bool retry = false;
    HttpResult r = Attempt(request, reused, stop, &retry);
    if (!retry) return r;
  }
  HttpResult r;
  r.error = "the connection closed twice before an answer";
  return r;
}

}  // namespace dmoe::bench::serve
