#include "common/http1/request_parser.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace dmoe::http1 {
namespace {

constexpr size_t kMaxChunkLine = 4096;  // chunk size + extensions

bool IsTchar(char c) {
  return absl::ascii_isalnum(static_cast<unsigned char>(c)) ||
         std::strchr("!#$%&'*+-.^_`|~", c) != nullptr;
}

bool IsToken(std::string_view s) {
  return !s.empty() &&
         std::all_of(s.begin(), s.end(), [](char c) { return c != '\0' && IsTchar(c); });
}

// A field value's characters (RFC 9110 §5.5): VCHAR, obs-text, SP, HTAB.
bool IsFieldValue(std::string_view s) {
  return std::all_of(s.begin(), s.end(), [](char c) {
    const auto u = static_cast<unsigned char>(c);
    return u == '\t' || (u >= 0x20 && u != 0x7f);
  });
}

std::string_view TrimBlanks(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

// Client bytes for an error message: at most 48 characters, control and
// non-ASCII bytes as \xNN, so that a log line or JSON body stays readable.
std::string Quote(std::string_view s) {
  std::string out = "\"";
  for (size_t i = 0; i < s.size() && i < 48; ++i) {
    const auto u = static_cast<unsigned char>(s[i]);
    if (u >= 0x20 && u < 0x7f && u != '"' && u != '\\') {
      out += s[i];
    } else {
      static constexpr char kHex[] = "0123456789abcdef";
      out += "\\x";
      out += kHex[u >> 4];
      out += kHex[u & 15];
    }
  }
  if (s.size() > 48) out += "...";
  return out + "\"";
}

// Comma-separated list elements, trimmed, lower-cased, empty ones dropped.
std::vector<std::string> ListTokens(std::string_view value) {
  std::vector<std::string> out;
  for (absl::string_view part :
       absl::StrSplit(absl::string_view(value.data(), value.size()), ',')) {
    std::string_view t = TrimBlanks(std::string_view(part.data(), part.size()));
    if (!t.empty()) out.push_back(absl::AsciiStrToLower(absl::string_view(t.data(), t.size())));
  }
  return out;
}

}  // namespace

const std::string* Request::Header(std::string_view lower_name) const {
  for (const auto& [name, value] : headers) {
    if (name == lower_name) return &value;
  }
  return nullptr;
}

void RequestParser::Reset() {
  state_ = State::kNeedMore;
  phase_ = Phase::kHead;
  started_ = false;
  head_.clear();
  head_scan_ = 0;
  line_.clear();
  trailer_bytes_ = 0;
  remaining_ = 0;
  request_ = Request();
  error_status_ = 0;
  error_message_.clear();
}

void RequestParser::Fail(int status, std::string message) {
  state_ = State::kError;
  phase_ = Phase::kDone;
  error_status_ = status;
  error_message_ = std::move(message);
}

void RequestParser::Complete() {
  state_ = State::kComplete;
  phase_ = Phase::kDone;
}

size_t RequestParser::Consume(std::string_view in) {
  size_t used = 0;
  while (state_ == State::kNeedMore && used < in.size()) {
    const std::string_view rest = in.substr(used);
    switch (phase_) {
      case Phase::kHead:
        used += ConsumeHead(rest);
        break;
      case Phase::kBody:
      case Phase::kChunkData: {
        const size_t n = static_cast<size_t>(std::min<uint64_t>(remaining_, rest.size()));
        request_.body.append(rest.data(), n);
        remaining_ -= n;
        used += n;
        if (remaining_ == 0) {
          if (phase_ == Phase::kBody) {
            Complete();
          } else {
            phase_ = Phase::kChunkDataEnd;
          }
        }
        break;
      }
      case Phase::kChunkSize:
      case Phase::kChunkDataEnd:
      case Phase::kTrailers: {
        bool complete = false;
        used += ConsumeLine(rest, &line_, &complete);
        if (state_ != State::kNeedMore || !complete) break;
        std::string line = std::move(line_);
        line_.clear();
        if (phase_ == Phase::kChunkSize) {
          ParseChunkSize(line);
        } else if (phase_ == Phase::kChunkDataEnd) {
          if (!line.empty()) {
            Fail(400, absl::StrCat("chunked body: chunk data longer than its size (", Quote(line),
                                   " after it)"));
          } else {
            phase_ = Phase::kChunkSize;
          }
        } else if (line.empty()) {
          Complete();
        } else {
          // Trailer fields are read and ignored, within the head's limits.
          trailer_bytes_ += line.size();
          if (trailer_bytes_ > limits_.max_head_bytes) {
            Fail(431, absl::StrCat("chunked body: trailer fields over ", limits_.max_head_bytes,
                                   " bytes"));
          } else if (line.find(':') == std::string::npos) {
            Fail(400, absl::StrCat("chunked body: trailer line without a colon: ", Quote(line)));
          }
        }
        break;
      }
      case Phase::kDone:
        return used;
    }
  }
  return used;
}

// Reads up to and including a line end into *line (without the CRLF or LF);
// a bare CR inside the line, or a line over kMaxChunkLine, fails.
size_t RequestParser::ConsumeLine(std::string_view in, std::string* line, bool* complete) {
  const size_t nl = in.find('\n');
  const size_t take = nl == std::string_view::npos ? in.size() : nl + 1;
  line->append(in.data(), nl == std::string_view::npos ? take : nl);
  if (line->size() > kMaxChunkLine) {
    Fail(400,
         absl::StrCat("chunked body: a chunk-size or trailer line over ", kMaxChunkLine, " bytes"));
    return take;
  }
  if (nl == std::string_view::npos) return take;
  if (!line->empty() && line->back() == '\r') line->pop_back();
  if (line->find('\r') != std::string::npos) {
    Fail(400, "chunked body: bare CR in a chunk line");
    return take;
  }
  *complete = true;
  return take;
}

size_t RequestParser::ConsumeHead(std::string_view in) {
  size_t i = 0;
  if (!started_) {
    // RFC 9112 §2.2: blank lines before the request line are ignored.
    while (i < in.size() && (in[i] == '\r' || in[i] == '\n')) ++i;
    if (i == in.size()) return i;
    started_ = true;
  }
  const size_t budget = limits_.max_head_bytes - std::min(head_.size(), limits_.max_head_bytes);
  const std::string_view rest = in.substr(i);
  size_t n = 0;
  while (n < rest.size()) {
    const size_t nl = rest.find('\n', n);
    const size_t end = nl == std::string_view::npos ? rest.size() : nl + 1;
    if (end > budget) {
      const bool first_line = head_.find('\n') == std::string::npos &&
                              rest.substr(0, budget).find('\n') == std::string_view::npos;
      if (first_line) {
        Fail(414, absl::StrCat("request line over ", limits_.max_head_bytes, " bytes"));
      } else {
        Fail(431, absl::StrCat("request head (request line and headers) over ",
                               limits_.max_head_bytes, " bytes"));
      }
      return i + rest.size();
    }
    head_.append(rest.data() + n, end - n);
    n = end;
    if (nl == std::string_view::npos) break;
    // A line ended: is it the blank line that ends the head?
    std::string_view line(head_.data() + head_scan_, head_.size() - head_scan_ - 1);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    head_scan_ = head_.size();
    if (line.empty()) {
      ParseHead();
      return i + n;
    }
  }
  return i + n;
}

bool RequestParser::ParseHead() {
  std::vector<std::string_view> lines;
  for (absl::string_view l : absl::StrSplit(absl::string_view(head_), '\n')) {
    std::string_view line(l.data(), l.size());
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.find('\r') != std::string_view::npos) {
      Fail(400, absl::StrCat("bare CR in the request head: ", Quote(line)));
      return false;
    }
    lines.push_back(line);
  }
  // The head ends with the blank line (and StrSplit's empty tail after it).
  while (!lines.empty() && lines.back().empty()) lines.pop_back();
  if (lines.empty() || !ParseRequestLine(lines[0])) {
    if (state_ != State::kError) Fail(400, "empty request line");
    return false;
  }
  if (lines.size() - 1 > limits_.max_headers) {
    Fail(431,
         absl::StrCat(lines.size() - 1, " header lines, over the limit of ", limits_.max_headers));
    return false;
  }
  for (size_t k = 1; k < lines.size(); ++k) {
    if (!ParseHeaderLine(lines[k])) return false;
  }
  head_.clear();
  head_.shrink_to_fit();
  return FinishHeaders();
}

bool RequestParser::ParseRequestLine(std::string_view line) {
  const std::vector<absl::string_view> parts =
      absl::StrSplit(absl::string_view(line.data(), line.size()), ' ');
  if (parts.size() == 2 && IsToken(std::string_view(parts[0].data(), parts[0].size()))) {
    Fail(400, absl::StrCat("request line without an HTTP version (HTTP/0.9 is not supported): ",
                           Quote(line)));
    return false;
  }
  if (parts.size() != 3 || parts[0].empty() || parts[1].empty() || parts[2].empty()) {
    Fail(400, absl::StrCat("malformed request line (expected METHOD SP target SP HTTP/1.1): ",
                           Quote(line)));
    return false;
  }
  const std::string_view method(parts[0].data(), parts[0].size());
  const std::string_view target(parts[1].data(), parts[1].size());
  const std::string_view version(parts[2].data(), parts[2].size());
  if (!IsToken(method)) {
    Fail(400, absl::StrCat("malformed method ", Quote(method)));
    return false;
  }
  if (version == "HTTP/1.1") {
    request_.minor_version = 1;
  } else if (version == "HTTP/1.0") {
    request_.minor_version = 0;
  } else if (absl::StartsWith(absl::string_view(version.data(), version.size()), "HTTP/")) {
    Fail(505, absl::StrCat("HTTP version ", Quote(version),
                           " is not supported: this server speaks HTTP/1.1 (and 1.0)",
                           method == "PRI" ? "; HTTP/2 with prior knowledge is not served" : ""));
    return false;
  } else {
    Fail(400, absl::StrCat("malformed HTTP version ", Quote(version)));
    return false;
  }
  for (const char c : target) {
    const auto u = static_cast<unsigned char>(c);
    if (u <= 0x20 || u == 0x7f || c == '#') {
      Fail(400, absl::StrCat("invalid character in the request target ", Quote(target)));
      return false;
    }
  }
  std::string_view path = target;
  if (target == "*") {
    if (method != "OPTIONS") {
      Fail(400, "request target * is only for OPTIONS");
      return false;
    }
  } else if (target.front() != '/') {
    // absolute-form (RFC 9112 §3.2.2): scheme://authority[/path][?query]
    const size_t scheme_end = target.find("://");
    const std::string scheme =
        scheme_end == std::string_view::npos
            ? std::string()
            : absl::AsciiStrToLower(absl::string_view(target.data(), scheme_end));
    if (scheme != "http" && scheme != "https") {
      Fail(400, absl::StrCat("request target must be a path (\"/...\") or an absolute URI: ",
                             Quote(target)));
      return false;
    }
    path = target.substr(scheme_end + 3);
    const size_t slash = path.find_first_of("/?");
    path = slash == std::string_view::npos ? std::string_view() : path.substr(slash);
  }
  request_.method.assign(method);
  request_.target.assign(target);
  const size_t q = path.find('?');
  if (q != std::string_view::npos) {
    request_.query.assign(path.substr(q + 1));
    path = path.substr(0, q);
  }
  request_.path = path.empty() ? "/" : std::string(path);
  return true;
}

bool RequestParser::ParseHeaderLine(std::string_view line) {
  if (line.front() == ' ' || line.front() == '\t') {
    Fail(400, absl::StrCat("obsolete line folding in the headers: ", Quote(line)));
    return false;
  }
  const size_t colon = line.find(':');
  if (colon == std::string_view::npos) {
    Fail(400, absl::StrCat("header line without a colon: ", Quote(line)));
    return false;
  }
  const std::string_view name = line.substr(0, colon);
  if (!IsToken(name)) {
    Fail(400, absl::StrCat("malformed header name ", Quote(name),
                           " (no whitespace is allowed before the colon)"));
    return false;
  }
  const std::string_view value = TrimBlanks(line.substr(colon + 1));
  if (!IsFieldValue(value)) {
    Fail(400, absl::StrCat("control character in the value of header ", Quote(name)));
    return false;
  }
  request_.headers.emplace_back(absl::AsciiStrToLower(absl::string_view(name.data(), name.size())),
                                std::string(value));
  return true;
}

bool RequestParser::FinishHeaders() {
  int hosts = 0;
  bool has_length = false;
  uint64_t length = 0;
  std::string length_text;
  std::vector<std::string> codings;
  for (const auto& [name, value] : request_.headers) {
    if (name == "host") {
      ++hosts;
    } else if (name == "content-length") {
      const bool digits = !value.empty() && std::all_of(value.begin(), value.end(), [](char c) {
        return c >= '0' && c <= '9';
      });
      if (!digits) {
        Fail(400, absl::StrCat("invalid Content-Length ", Quote(value),
                               " (must be a decimal number of bytes)"));
        return false;
      }
      if (value.size() > 19) {  // would overflow 64 bits
        Fail(413, absl::StrCat("Content-Length ", Quote(value), " is over the limit of ",
                               limits_.max_body_bytes, " bytes"));
        return false;
      }
      uint64_t v = 0;
      for (char c : value) v = v * 10 + static_cast<uint64_t>(c - '0');
      if (has_length && v != length) {
        Fail(400, absl::StrCat("conflicting Content-Length headers: ", Quote(length_text), " and ",
                               Quote(value)));
        return false;
      }
      has_length = true;
      length = v;
      length_text = value;
    } else if (name == "transfer-encoding") {
      for (std::string& t : ListTokens(value)) codings.push_back(std::move(t));
      if (codings.empty()) {
        Fail(400, "empty Transfer-Encoding header");
        return false;
      }
    } else if (name == "connection") {
      for (const std::string& t : ListTokens(value)) {
        if (t == "close") request_.keep_alive = false;
      }
    } else if (name == "expect") {
      if (absl::AsciiStrToLower(value) != "100-continue") {
        Fail(417,
             absl::StrCat("unsupported expectation ", Quote(value), " (only 100-continue is)"));
        return false;
      }
      request_.expect_continue = true;
    }
  }
  if (request_.minor_version == 0) request_.keep_alive = false;
  if (request_.minor_version == 1 && hosts != 1) {
    Fail(400, hosts == 0 ? "HTTP/1.1 request without a Host header" : "more than one Host header");
    return false;
  }
  if (hosts > 1) {
    Fail(400, "more than one Host header");
    return false;
  }
  if (!codings.empty()) {
    if (request_.minor_version == 0) {
      Fail(400, "Transfer-Encoding in an HTTP/1.0 request");
      return false;
    }
    if (has_length) {
      Fail(400, "both Transfer-Encoding and Content-Length: the body's length is ambiguous");
      return false;
    }
    if (codings.size() != 1 || codings[0] != "chunked") {
      Fail(501, absl::StrCat("Transfer-Encoding ", Quote(absl::StrJoin(codings, ", ")),
                             " is not implemented (only chunked is)"));
      return false;
    }
    phase_ = Phase::kChunkSize;
    return true;
  }
  if (length > limits_.max_body_bytes) {
    Fail(413, absl::StrCat("request body of ", length, " bytes is over the limit of ",
                           limits_.max_body_bytes, " bytes"));
    return false;
  }
  if (length == 0) {
    request_.expect_continue = false;  // nothing to wait for
    Complete();
    return true;
  }
  remaining_ = length;
  phase_ = Phase::kBody;
  return true;
}

bool RequestParser::ParseChunkSize(std::string_view line) {
  // chunk-size [ BWS ; chunk-ext ]: extensions are ignored.
  size_t n = 0;
  uint64_t size = 0;
  while (n < line.size() && absl::ascii_isxdigit(static_cast<unsigned char>(line[n]))) {
    if (n >= 15) {
      Fail(413, absl::StrCat("chunked body: chunk size ", Quote(line), " is too large"));
      return false;
    }
    const char c = line[n];
    size = size * 16 + static_cast<uint64_t>(c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10);
    ++n;
  }
  const std::string_view rest = TrimBlanks(line.substr(n));
  if (n == 0 || (!rest.empty() && rest.front() != ';')) {
    Fail(400, absl::StrCat("chunked body: malformed chunk size ", Quote(line)));
    return false;
  }
  if (size == 0) {
    phase_ = Phase::kTrailers;
    return true;
  }
  if (size > limits_.max_body_bytes - std::min(limits_.max_body_bytes, request_.body.size())) {
    Fail(413,
         absl::StrCat("chunked request body over the limit of ", limits_.max_body_bytes, " bytes"));
    return false;
  }
  remaining_ = size;
  phase_ = Phase::kChunkData;
  return true;
}

const char* ReasonPhrase(int status) {
  switch (status) {
    case 100:
      return "Continue";
    case 200:
      return "OK";
    case 204:
      return "No Content";
    case 400:
      return "Bad Request";
    case 401:
      return "Unauthorized";
    case 403:
      return "Forbidden";
    case 404:
      return "Not Found";
    case 405:
      return "Method Not Allowed";
    case 408:
      return "Request Timeout";
    case 411:
      return "Length Required";
    case 413:
      return "Content Too Large";
    case 414:
      return "URI Too Long";
    case 415:
      return "Unsupported Media Type";
    case 417:
      return "Expectation Failed";
    case 422:
      return "Unprocessable Content";
    case 429:
      return "Too Many Requests";
    case 431:
      return "Request Header Fields Too Large";
    case 499:
      return "Client Closed Request";
    case 500:
      return "Internal Server Error";
    case 501:
      return "Not Implemented";
    case 502:
      return "Bad Gateway";
    case 503:
      return "Service Unavailable";
    case 504:
      return "Gateway Timeout";
    case 505:
      return "HTTP Version Not Supported";
    default:
      return "Unknown";
  }
}

bool PercentDecode(std::string_view in, std::string* out) {
  out->clear();
  for (size_t i = 0; i < in.size(); ++i) {
    if (in[i] != '%') {
      out->push_back(in[i]);
      continue;
    }
    if (i + 2 >= in.size()) return false;
    const auto hex = [](char c) -> int {
      if (c >= '0' && c <= '9') return c - '0';
      if ((c | 0x20) >= 'a' && (c | 0x20) <= 'f') return (c | 0x20) - 'a' + 10;
      return -1;
    };
    const int hi = hex(in[i + 1]), lo = hex(in[i + 2]);
    if (hi < 0 || lo < 0) return false;
    out->push_back(static_cast<char>(hi * 16 + lo));
    i += 2;
  }
  return true;
}

}  // namespace dmoe::http1
