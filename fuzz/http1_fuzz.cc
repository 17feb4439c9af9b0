// The gateway's HTTP/1.1 request parser (common/http1/request_parser.h) on
// arbitrary bytes: every request on the "connection" is parsed twice, in one
// piece and split into pieces of a size the input picks, and both parses must
// agree (the reactor feeds whatever each read() brought). No crash, no read
// past the input, limits honoured.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "common/http1/request_parser.h"

namespace {

using dmoe::http1::Limits;
using dmoe::http1::Request;
using dmoe::http1::RequestParser;

void Check(bool ok) {
  if (!ok) std::abort();
}

bool Same(const Request& a, const Request& b) {
  return a.method == b.method && a.target == b.target && a.path == b.path && a.query == b.query &&
         a.minor_version == b.minor_version && a.headers == b.headers && a.body == b.body &&
         a.keep_alive == b.keep_alive && a.expect_continue == b.expect_continue;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const size_t piece = 1 + data[0] % 7;
  std::string_view in(reinterpret_cast<const char*>(data) + 1, size - 1);
  Limits limits;
  limits.max_head_bytes = 2048;  // small limits: reached by fuzzed inputs
  limits.max_headers = 16;
  limits.max_body_bytes = 4096;
  RequestParser whole(limits), split(limits);
  for (int requests = 0; requests < 8 && !in.empty(); ++requests) {
    const size_t used = whole.Consume(in);
    Check(used <= in.size());
    size_t used_split = 0;
    while (used_split < in.size() && split.state() == RequestParser::State::kNeedMore) {
      const size_t n = split.Consume(in.substr(used_split, piece));
      Check(n <= piece);
      used_split += n;
      if (n == 0) break;
    }
    Check(whole.state() == split.state());
    if (whole.state() == RequestParser::State::kError) {
      // How much of the input an error consumed does not matter: the
      // connection is answered and closed. The verdict must agree.
      Check(whole.error_status() == split.error_status());
      Check(whole.error_status() >= 400 && whole.error_status() <= 505);
      Check(!whole.error_message().empty());
      Check(dmoe::http1::ReasonPhrase(whole.error_status()) != std::string("Unknown"));
      return 0;
    }
    Check(used == used_split);
    if (whole.state() == RequestParser::State::kNeedMore) return 0;
    const Request a = whole.TakeRequest();
    const Request b = split.TakeRequest();
    Check(Same(a, b));
    Check(a.body.size() <= limits.max_body_bytes);
    Check(a.headers.size() <= limits.max_headers);
    Check(!a.path.empty());
    std::string decoded;
    dmoe::http1::PercentDecode(a.path, &decoded);
    whole.Reset();
    split.Reset();
    in.remove_prefix(used);
  }
  return 0;
}
