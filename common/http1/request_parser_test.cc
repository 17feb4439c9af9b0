#include "common/http1/request_parser.h"

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace dmoe::http1 {
namespace {

using ::testing::HasSubstr;

struct Parsed {
  RequestParser::State state;
  size_t used;
  int status;
  std::string message;
  Request request;
};

Parsed ParseAll(const std::string& bytes, Limits limits = Limits()) {
  RequestParser p(limits);
  const size_t used = p.Consume(bytes);
  return {p.state(), used, p.error_status(), p.error_message(), p.TakeRequest()};
}

// Feeding one byte at a time must give the same request as one write.
Parsed ParseBytewise(const std::string& bytes, Limits limits = Limits()) {
  RequestParser p(limits);
  size_t used = 0;
  while (used < bytes.size() && p.state() == RequestParser::State::kNeedMore) {
    used += p.Consume(std::string_view(bytes).substr(used, 1));
  }
  return {p.state(), used, p.error_status(), p.error_message(), p.TakeRequest()};
}

void ExpectError(const std::string& bytes, int status, const std::string& message) {
  SCOPED_TRACE(bytes);
  for (const Parsed& r : {ParseAll(bytes), ParseBytewise(bytes)}) {
    EXPECT_EQ(r.state, RequestParser::State::kError);
    EXPECT_EQ(r.status, status);
    EXPECT_THAT(r.message, HasSubstr(message));
  }
}

TEST(RequestParser, GetWithHeaders_ParsesLineHeadersAndStopsAtTheEnd) {
  const std::string req = "GET /v1/models/a%2Fb?x=1 HTTP/1.1\r\nHost: h\r\nX-Thing:  v 1 \r\n\r\n";
  for (const Parsed& r : {ParseAll(req + "GET /next"), ParseBytewise(req + "GET /next")}) {
    ASSERT_EQ(r.state, RequestParser::State::kComplete);
    EXPECT_EQ(r.used, req.size());  // the pipelined request is left alone
    EXPECT_EQ(r.request.method, "GET");
    EXPECT_EQ(r.request.path, "/v1/models/a%2Fb");
    EXPECT_EQ(r.request.query, "x=1");
    EXPECT_EQ(r.request.minor_version, 1);
    EXPECT_TRUE(r.request.keep_alive);
    ASSERT_NE(r.request.Header("x-thing"), nullptr);
    EXPECT_EQ(*r.request.Header("x-thing"), "v 1");
    EXPECT_EQ(r.request.Header("absent"), nullptr);
  }
}

TEST(RequestParser, ContentLengthBody_IsReadExactly) {
  const std::string req = "POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhelloEXTRA";
  for (const Parsed& r : {ParseAll(req), ParseBytewise(req)}) {
    ASSERT_EQ(r.state, RequestParser::State::kComplete);
    EXPECT_EQ(r.request.body, "hello");
    EXPECT_EQ(r.used, req.size() - 5);
  }
}

TEST(RequestParser, ChunkedBody_IsDecodedWithExtensionsAndTrailers) {
  const std::string req =
      "POST /p HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
      "5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\n";
  for (const Parsed& r : {ParseAll(req), ParseBytewise(req)}) {
    ASSERT_EQ(r.state, RequestParser::State::kComplete) << r.message;
    EXPECT_EQ(r.request.body, "hello world");
    EXPECT_EQ(r.used, req.size());
  }
}

TEST(RequestParser, BareLineFeedsAndLeadingBlankLines_AreAccepted) {
  const Parsed r = ParseAll("\r\n\nGET / HTTP/1.1\nHost: h\n\n");
  ASSERT_EQ(r.state, RequestParser::State::kComplete) << r.message;
  EXPECT_EQ(r.request.path, "/");
}

TEST(RequestParser, ConnectionCloseAndHttp10_AreNotKeepAlive) {
  EXPECT_FALSE(ParseAll("GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, Close\r\n\r\n")
                   .request.keep_alive);
  const Parsed r = ParseAll("GET / HTTP/1.0\r\n\r\n");  // no Host needed on 1.0
  ASSERT_EQ(r.state, RequestParser::State::kComplete);
  EXPECT_EQ(r.request.minor_version, 0);
  EXPECT_FALSE(r.request.keep_alive);
}

TEST(RequestParser, AbsoluteFormTarget_GivesItsPath) {
  const Parsed r = ParseAll("GET http://example.com:80/health?q HTTP/1.1\r\nHost: h\r\n\r\n");
  ASSERT_EQ(r.state, RequestParser::State::kComplete);
  EXPECT_EQ(r.request.path, "/health");
  EXPECT_EQ(r.request.query, "q");
}

TEST(RequestParser, ExpectContinue_IsSeenWhenTheHeadIsComplete) {
  RequestParser p;
  p.Consume("POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n");
  EXPECT_EQ(p.state(), RequestParser::State::kNeedMore);
  EXPECT_TRUE(p.head_complete());
  EXPECT_TRUE(p.expects_body());
  EXPECT_TRUE(p.request().expect_continue);
  p.Consume("abc");
  EXPECT_EQ(p.state(), RequestParser::State::kComplete);
}

// Issue 13.4: conflicting lengths were "first wins" (request smuggling).
TEST(RequestParser, ConflictingContentLengths_Are400) {
  ExpectError("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400,
              "conflicting Content-Length");
  // Repeated equal values are one length (RFC 9110 §8.6).
  const Parsed same =
      ParseAll("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok");
  EXPECT_EQ(same.state, RequestParser::State::kComplete);
  EXPECT_EQ(same.request.body, "ok");
}

TEST(RequestParser, NonNumericContentLength_Is400NotZero) {
  ExpectError("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: abc\r\n\r\n", 400,
              "invalid Content-Length \"abc\"");
  ExpectError("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n", 400,
              "invalid Content-Length");
  ExpectError("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1,1\r\n\r\n", 400,
              "invalid Content-Length");
  ExpectError("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: \r\n\r\n", 400,
              "invalid Content-Length");
}

TEST(RequestParser, HeaderLineWithoutColon_Is400) {
  ExpectError("GET / HTTP/1.1\r\nHost: h\r\nNoColonHere\r\n\r\n", 400,
              "header line without a colon: \"NoColonHere\"");
  ExpectError("GET / HTTP/1.1\r\nHost: h\r\nName : v\r\n\r\n", 400, "malformed header name");
  ExpectError("GET / HTTP/1.1\r\nHost: h\r\nA: b\r\n folded\r\n\r\n", 400, "line folding");
  ExpectError("GET / HTTP/1.1\r\nHost: h\r\nA: b\x01\r\n\r\n", 400, "control character");
  ExpectError("GET / HTTP/1.1\r\nHost: h\r\nA: b\rc\r\n\r\n", 400, "bare CR");
}

TEST(RequestParser, UnreadableRequestLines_AreRefused) {
  ExpectError("GET /\r\n\r\n", 400, "HTTP/0.9 is not supported");
  ExpectError("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505, "HTTP/2 with prior knowledge");
  ExpectError("GET / HTTP/3.0\r\nHost: h\r\n\r\n", 505, "not supported");
  ExpectError("\x16\x03\x01 x y\r\n\r\n", 400, "malformed method");  // a TLS hello
  ExpectError("GET  / HTTP/1.1\r\nHost: h\r\n\r\n", 400, "malformed request line");
  ExpectError("G(T / HTTP/1.1\r\nHost: h\r\n\r\n", 400, "malformed method");
  ExpectError("GET nopath HTTP/1.1\r\nHost: h\r\n\r\n", 400, "request target must be a path");
  ExpectError("GET * HTTP/1.1\r\nHost: h\r\n\r\n", 400, "only for OPTIONS");
}

TEST(RequestParser, HostIsRequiredOnceOnHttp11) {
  ExpectError("GET / HTTP/1.1\r\n\r\n", 400, "without a Host header");
  ExpectError("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "more than one Host");
}

TEST(RequestParser, TransferEncodings_AreCheckedStrictly) {
  ExpectError("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501,
              "not implemented");
  ExpectError(
      "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", 400,
      "both Transfer-Encoding and Content-Length");
  ExpectError("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "HTTP/1.0");
  ExpectError("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400,
              "malformed chunk size");
  ExpectError("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n", 400,
              "longer than its size");
  ExpectError("POST / HTTP/1.1\r\nHost: h\r\nExpect: something\r\n\r\n", 417, "unsupported");
}

TEST(RequestParser, Limits_AreCheckedAsBytesArrive) {
  Limits small;
  small.max_head_bytes = 64;
  small.max_headers = 2;
  small.max_body_bytes = 10;
  // A request line that never ends: refused at the limit, not buffered.
  const Parsed line = ParseAll("GET /" + std::string(1000, 'a'), small);
  EXPECT_EQ(line.state, RequestParser::State::kError);
  EXPECT_EQ(line.status, 414);
  const Parsed head = ParseAll("GET / HTTP/1.1\r\nHost: h\r\nA: " + std::string(100, 'b'), small);
  EXPECT_EQ(head.status, 431);
  const Parsed many = ParseAll("GET / HTTP/1.1\r\nHost: h\r\nA: 1\r\nB: 2\r\n\r\n", small);
  EXPECT_EQ(many.status, 431);
  EXPECT_THAT(many.message, HasSubstr("3 header lines"));
  const Parsed body = ParseAll("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\n", small);
  EXPECT_EQ(body.status, 413);
  Limits small_body;
  small_body.max_body_bytes = 10;
  const Parsed huge = ParseAll(
      "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999999999999999999\r\n\r\n", small_body);
  EXPECT_EQ(huge.status, 413);
  const Parsed chunks = ParseAll(
      "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n8\r\n",
      small_body);
  EXPECT_EQ(chunks.status, 413);
  const Parsed hexhuge = ParseAll(
      "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n",
      small_body);
  EXPECT_EQ(hexhuge.status, 413);
}

TEST(RequestParser, Reset_ParsesTheNextPipelinedRequest) {
  const std::string two = "GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n";
  RequestParser p;
  const size_t first = p.Consume(two);
  ASSERT_EQ(p.state(), RequestParser::State::kComplete);
  EXPECT_EQ(p.TakeRequest().path, "/a");
  p.Reset();
  EXPECT_EQ(p.Consume(std::string_view(two).substr(first)), two.size() - first);
  ASSERT_EQ(p.state(), RequestParser::State::kComplete);
  EXPECT_EQ(p.request().path, "/b");
}

TEST(PercentDecode, DecodesAndRejectsMalformedEscapes) {
  std::string out;
  EXPECT_TRUE(PercentDecode("a%2Fb%20c", &out));
  EXPECT_EQ(out, "a/b c");
  EXPECT_FALSE(PercentDecode("a%2", &out));
  EXPECT_FALSE(PercentDecode("a%zz", &out));
  EXPECT_FALSE(PercentDecode("%", &out));
}

}  // namespace
}  // namespace dmoe::http1
