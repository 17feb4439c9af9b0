#include "common/wire.h"

#include <algorithm>
#include <bit>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/dtype.h"
#include "gtest/gtest.h"

namespace dmoe::common {

namespace wire_internal {
// Defined in wire.cc (a test seam, not part of wire.h): 0 scalar, 1 AVX2,
// 2 AVX-512, -1 best available; false when the CPU lacks the level.
bool SetWireKernelsForTesting(int level);
}  // namespace wire_internal

namespace {

std::vector<float> Random(int n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  std::vector<float> v(n);
  for (float& x : v) x = nd(rng);
  return v;
}

TEST(Wire, F32IsExactWithStride) {
  auto x = Random(3 * 8, 1);
  std::string data, scales;
  PackActivations(x.data(), 3, 5, 8, WireDType::kF32, &data, &scales);
  ASSERT_EQ(data.size(), 3u * 5 * 4);
  std::vector<float> y(15);
  ASSERT_TRUE(UnpackActivations(WireDType::kF32, data, scales, 3, 5, y.data()).ok());
  for (int r = 0; r < 3; ++r) {
    for (int c = 0; c < 5; ++c) EXPECT_EQ(y[r * 5 + c], x[r * 8 + c]);
  }
}

TEST(Wire, Bf16RoundsToNearest) {
  auto x = Random(64, 2);
  std::string data, scales;
  PackActivations(x.data(), 4, 16, 0, WireDType::kBF16, &data, &scales);
  std::vector<float> y(64);
  ASSERT_TRUE(UnpackActivations(WireDType::kBF16, data, scales, 4, 16, y.data()).ok());
  for (int i = 0; i < 64; ++i) EXPECT_EQ(y[i], core::BF16ToF32(core::F32ToBF16(x[i])));
}

TEST(Wire, Fp8MatchesExhaustiveRounding) {
  auto x = Random(2 * 300, 3);
  std::string data, scales;
  PackActivations(x.data(), 2, 300, 0, WireDType::kF8E4M3, &data, &scales);
  ASSERT_EQ(scales.size(), 8u);
  std::vector<float> y(600);
  ASSERT_TRUE(UnpackActivations(WireDType::kF8E4M3, data, scales, 2, 300, y.data()).ok());
  for (int r = 0; r < 2; ++r) {
    float mx = 0;
    for (int c = 0; c < 300; ++c) mx = std::max(mx, std::fabs(x[r * 300 + c]));
    const float s = mx / 448.0f;
    for (int c = 0; c < 300; ++c) {
      // Same code as the slow exhaustive search in core/dtype.
      const float want = core::F8E4M3ToF32(core::F32ToF8E4M3(x[r * 300 + c] / s)) * s;
      EXPECT_EQ(y[r * 300 + c], want) << r << "," << c;
    }
  }
}

TEST(Wire, UnpackRejectsBadSizesAndValues) {
  std::vector<float> y(8);
  auto st = UnpackActivations(WireDType::kBF16, std::string(15, '\0'), "", 2, 4, y.data());
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("needs 16 bytes, got 15"), std::string::npos) << st;
  st = UnpackActivations(WireDType::kF8E4M3, std::string(8, '\0'), std::string(4, '\0'), 2, 4,
                         y.data());
  EXPECT_NE(st.message().find("row scales"), std::string::npos) << st;
  const float nan = std::nanf("");
  std::string bytes(reinterpret_cast<const char*>(&nan), 4);
  st = UnpackActivations(WireDType::kF32, bytes, "", 1, 1, y.data());
  EXPECT_NE(st.message().find("not finite"), std::string::npos) << st;
}

// Issue 13.11: a row whose largest magnitude is below 448 * 2^-128 had a
// scale whose inverse was infinite, so zeros packed as NaN (0 * inf) and the
// receiver refused the payload. The scale is now at least FLT_MIN (2^-126),
// whose inverse 2^126 is finite and exact.
TEST(Wire, Fp8RowOfTinyValuesPacksWithTheSmallestNormalScale) {
  const std::vector<float> x = {1e-37f, 0.0f, -1e-38f, 0.0f};
  std::string data, scales;
  PackActivations(x.data(), 1, 4, 0, WireDType::kF8E4M3, &data, &scales);
  float scale;
  ASSERT_EQ(scales.size(), 4u);
  std::memcpy(&scale, scales.data(), 4);
  EXPECT_EQ(scale, FLT_MIN);
  // 1e-37 / 2^-126 = 8.507 rounds to 9 (0 1010 001), -1e-38 / 2^-126 =
  // -0.8507 to -0.875 (1 0110 110); zeros stay 0 (they were 0x7f, NaN).
  ASSERT_EQ(data, std::string({0x51, 0x00, static_cast<char>(0xb6), 0x00}));
  std::vector<float> y(4, 1.0f);
  const absl::Status st = UnpackActivations(WireDType::kF8E4M3, data, scales, 1, 4, y.data());
  ASSERT_TRUE(st.ok()) << st;
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(y[i], core::F8E4M3ToF32(core::F32ToF8E4M3(x[i] / FLT_MIN)) * FLT_MIN) << i;
  }
  EXPECT_EQ(y[1], 0.0f);
  EXPECT_EQ(y[3], 0.0f);
  // Relative error of an e4m3 code in its normal range: at most 2^-4.
  EXPECT_NEAR(y[0], 1e-37f, 1e-37f / 16);
  EXPECT_NEAR(y[2], -1e-38f, 1e-38f / 16);
}

// Every row maximum from the smallest denormal up to where mx / 448 is a
// normal float round-trips without a refusal, on every kernel level (the
// scale is computed once per row outside the kernels).
TEST(Wire, Fp8RowsWithMaximaAcrossTheDenormalRangeRoundTrip) {
  std::vector<float> x;
  constexpr int64_t kCols = 37;  // a SIMD body and a tail on every level
  for (float mx = std::bit_cast<float>(uint32_t{1}); mx < 1e-33f; mx *= 1.7f) {
    for (int64_t c = 0; c < kCols; ++c) {
      x.push_back(c % 5 == 0 ? 0.0f : mx * (c % 2 ? -1 : 1) / c);
    }
    x[x.size() - kCols + 1] = mx;
  }
  const int64_t rows = static_cast<int64_t>(x.size()) / kCols;
  for (const int level : {0, 1, 2}) {
    if (!wire_internal::SetWireKernelsForTesting(level)) continue;
    std::string data, scales;
    PackActivations(x.data(), rows, kCols, 0, WireDType::kF8E4M3, &data, &scales);
    std::vector<float> y(x.size());
    const absl::Status st =
        UnpackActivations(WireDType::kF8E4M3, data, scales, rows, kCols, y.data());
    ASSERT_TRUE(st.ok()) << "level " << level << ": " << st;
    for (int64_t r = 0; r < rows; ++r) {
      float s;
      std::memcpy(&s, scales.data() + 4 * r, 4);
      EXPECT_TRUE(std::isnormal(s)) << r << ": scale " << s;
      EXPECT_EQ(s, std::max(x[r * kCols + 1] / 448.0f, FLT_MIN)) << r;
      for (int64_t c = 0; c < kCols; ++c) {
        const float v = x[r * kCols + c];
        ASSERT_EQ(y[r * kCols + c], core::F8E4M3ToF32(core::F32ToF8E4M3(v * (1.0f / s))) * s)
            << "level " << level << " row " << r << " col " << c << " value " << v;
      }
    }
  }
  wire_internal::SetWireKernelsForTesting(-1);
}

// One rule for scales: the encoder only writes positive normal floats (1 for
// an all-zero row), and the decoder refuses anything else.
TEST(Wire, UnpackRefusesScalesTheEncoderNeverWrites) {
  // e4m3 codes of 0, 1, -1 and 2^-4.
  const std::string codes = {0x00, 0x38, static_cast<char>(0xb8), 0x10};
  std::vector<float> y(4);
  for (const float s : {0.0f, -0.0f, -1.0f, std::bit_cast<float>(uint32_t{1}),
                        std::bit_cast<float>(uint32_t{0x00400000}), std::nextafter(FLT_MIN, 0.0f),
                        float(NAN), float(INFINITY), -float(INFINITY)}) {
    const std::string scale(reinterpret_cast<const char*>(&s), 4);
    const absl::Status st = UnpackActivations(WireDType::kF8E4M3, codes, scale, 1, 4, y.data());
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_NE(st.message().find("row 0 scale"), std::string::npos) << st;
    EXPECT_NE(st.message().find("not a positive normal float"), std::string::npos) << st;
  }
  const float s = FLT_MIN;
  const std::string scale(reinterpret_cast<const char*>(&s), 4);
  EXPECT_TRUE(UnpackActivations(WireDType::kF8E4M3, codes, scale, 1, 4, y.data()).ok());
  EXPECT_EQ(y[1], FLT_MIN);
  EXPECT_EQ(y[2], -FLT_MIN);
}

// And one rule for values: NaN or Inf never come out of Unpack, whatever the
// dtype (the encoder does not check; such a payload is refused here).
TEST(Wire, UnpackRefusesNonFiniteValuesInEveryDType) {
  std::vector<float> y(2);
  for (const float v : {float(NAN), float(INFINITY), -float(INFINITY)}) {
    const float pair[2] = {1.0f, v};
    std::string data, scales;
    for (WireDType t : {WireDType::kF32, WireDType::kBF16, WireDType::kF8E4M3}) {
      PackActivations(pair, 1, 2, 0, t, &data, &scales);
      const absl::Status st = UnpackActivations(t, data, scales, 1, 2, y.data());
      EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << v << " " << static_cast<int>(t);
      EXPECT_TRUE(st.message().find("not finite") != std::string::npos ||
                  st.message().find("scale inf") != std::string::npos)
          << st;
    }
  }
  // Raw NaN codes: bf16 0x7fc0, fp8 0x7f and 0xff.
  const std::string bf16_nan = {0x00, 0x00, static_cast<char>(0xc0), 0x7f};
  EXPECT_NE(UnpackActivations(WireDType::kBF16, bf16_nan, "", 1, 2, y.data())
                .message()
                .find("element 1 is not finite"),
            std::string::npos);
  const float one = 1.0f;
  const std::string scale(reinterpret_cast<const char*>(&one), 4);
  for (const char code : {'\x7f', '\xff'}) {
    const std::string f8 = {0x38, code};
    EXPECT_NE(UnpackActivations(WireDType::kF8E4M3, f8, scale, 1, 2, y.data())
                  .message()
                  .find("element 1 is not finite"),
              std::string::npos);
  }
}

// Shapes whose byte counts overflow 64 bits used to wrap: [2^62, 4] bf16 needs
// 2^65 bytes, which wrapped to 0 and matched an empty payload.
TEST(Wire, UnpackRefusesShapesWhoseSizeOverflows) {
  float y[1];
  const int64_t big = int64_t{1} << 62;
  absl::Status st = UnpackActivations(WireDType::kBF16, "", "", big, 4, y);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("too large"), std::string::npos) << st;
  EXPECT_NE(st.message().find("[4611686018427387904, 4]"), std::string::npos) << st;
  // 2^30 x 2^40 fp8 elements wrap to 0 bytes as well.
  st = UnpackActivations(WireDType::kF8E4M3, "", "", int64_t{1} << 30, int64_t{1} << 40, y);
  EXPECT_NE(st.message().find("too large"), std::string::npos) << st;
  st = UnpackActivations(WireDType::kF32, "", "", std::numeric_limits<int64_t>::max(), 2, y);
  EXPECT_NE(st.message().find("too large"), std::string::npos) << st;
}

// fp8 with cols = 0: no data bytes, but 4 * 2^62 bytes of scales wrapped to 0,
// so the row loop read past the (empty) scales buffer; the message computed
// rows * 4 in int64 (overflow).
TEST(Wire, UnpackRefusesFp8RowCountsWhoseScaleBytesOverflow) {
  float y[1];
  for (const int64_t rows : {int64_t{1} << 62, std::numeric_limits<int64_t>::max()}) {
    const absl::Status st = UnpackActivations(WireDType::kF8E4M3, "", "", rows, 0, y);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(st.message().find("too large"), std::string::npos) << st;
  }
  // A large but representable count is named exactly.
  const absl::Status st = UnpackActivations(WireDType::kF8E4M3, "", "", int64_t{1} << 40, 0, y);
  EXPECT_NE(st.message().find("fp8 needs 4398046511104 bytes of row scales, got 0"),
            std::string::npos)
      << st;
}

// ---- The fast kernels against the original scalar codec ----

// The codec as it was before it had SIMD kernels, kept as the reference:
// every kernel set must give the same bytes, floats and statuses. Changed
// since only by the scale rules of wire.h (issue 13.11: the FLT_MIN floor on
// the scale, only positive normal scales accepted).
void RefPack(const float* x, int64_t rows, int64_t cols, int64_t ld, WireDType type,
             std::string* data, std::string* scales) {
  if (ld == 0) ld = cols;
  data->resize(static_cast<size_t>(rows * cols) * WireElementSize(type));
  scales->clear();
  char* out = data->data();
  switch (type) {
    case WireDType::kF32:
      for (int64_t r = 0; r < rows; ++r) std::memcpy(out + r * cols * 4, x + r * ld, cols * 4);
      return;
    case WireDType::kBF16: {
      auto* o = reinterpret_cast<uint16_t*>(out);
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < cols; ++c) o[r * cols + c] = core::F32ToBF16(x[r * ld + c]);
      }
      return;
    }
    case WireDType::kF8E4M3: {
      scales->resize(static_cast<size_t>(rows) * 4);
      auto* o = reinterpret_cast<uint8_t*>(out);
      for (int64_t r = 0; r < rows; ++r) {
        float mx = 0;
        for (int64_t c = 0; c < cols; ++c) mx = std::max(mx, std::fabs(x[r * ld + c]));
        const float scale = mx > 0 ? std::max(mx / 448.0f, FLT_MIN) : 1.0f;
        std::memcpy(scales->data() + r * 4, &scale, 4);
        const float inv = 1.0f / scale;
        for (int64_t c = 0; c < cols; ++c)
          o[r * cols + c] = core::F32ToF8E4M3Fast(x[r * ld + c] * inv);
      }
      return;
    }
  }
}

absl::Status RefUnpack(WireDType type, std::string_view data, std::string_view scales, int64_t rows,
                       int64_t cols, float* out) {
  if (rows < 0 || cols < 0) return absl::InvalidArgumentError("activations: negative shape");
  const size_t want = static_cast<size_t>(rows) * cols * WireElementSize(type);
  if (data.size() != want) {
    return absl::InvalidArgumentError(absl::StrCat("activations: [", rows, ", ", cols, "] needs ",
                                                   want, " bytes, got ", data.size()));
  }
  const size_t n = static_cast<size_t>(rows) * cols;
  switch (type) {
    case WireDType::kF32:
      if (n) std::memcpy(out, data.data(), n * 4);
      break;
    case WireDType::kBF16:
      for (size_t i = 0; i < n; ++i) {
        uint16_t v;
        std::memcpy(&v, data.data() + 2 * i, 2);
        out[i] = core::BF16ToF32(v);
      }
      break;
    case WireDType::kF8E4M3: {
      if (scales.size() != static_cast<size_t>(rows) * 4) {
        return absl::InvalidArgumentError(absl::StrCat(
            "activations: fp8 needs ", rows * 4, " bytes of row scales, got ", scales.size()));
      }
      for (int64_t r = 0; r < rows; ++r) {
        float s;
        std::memcpy(&s, scales.data() + r * 4, 4);
        if (!std::isfinite(s) || s < FLT_MIN) {
          return absl::InvalidArgumentError(
              absl::StrCat("activations: row ", r, " scale ", s,
                           " is not a positive normal float (PackActivations "
                           "writes >= 2^-126)"));
        }
        for (int64_t c = 0; c < cols; ++c) {
          out[r * cols + c] = core::F8E4M3ToF32(static_cast<uint8_t>(data[r * cols + c])) * s;
        }
      }
      break;
    }
  }
  for (size_t i = 0; i < n; ++i) {
    if (!std::isfinite(out[i])) {
      return absl::InvalidArgumentError(
          absl::StrCat("activations: element ", i, " is not finite (", out[i], ")"));
    }
  }
  return absl::OkStatus();
}

constexpr WireDType kTypes[] = {WireDType::kBF16, WireDType::kF32, WireDType::kF8E4M3};

const char* Name(WireDType t) {
  return t == WireDType::kBF16 ? "bf16" : t == WireDType::kF32 ? "f32" : "fp8";
}

// Runs the test body once per kernel set this CPU has (scalar, AVX2, AVX-512),
// then restores the automatic choice.
class WireKernels : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override {
    if (!wire_internal::SetWireKernelsForTesting(GetParam())) {
      GTEST_SKIP() << "this CPU lacks kernel level " << GetParam();
    }
  }
  void TearDown() override { wire_internal::SetWireKernelsForTesting(-1); }
};

std::string LevelName(const ::testing::TestParamInfo<int>& info) {
  return info.param == 0 ? "Scalar" : info.param == 1 ? "Avx2" : "Avx512";
}

INSTANTIATE_TEST_SUITE_P(Levels, WireKernels, ::testing::Values(0, 1, 2), LevelName);

float FromBits(uint32_t u) { return std::bit_cast<float>(u); }

// Every upper half (sign, exponent, 7 mantissa bits: every bf16 value, so
// every rounding neighbourhood, NaN, Inf and denormal) times lower halves that
// hit the rounding cases: exact, just above/below the tie, the tie with either
// parity of the kept bit, all ones (rounds up into the next binade or to Inf).
std::vector<float> UpperHalvesTimesLowerBits() {
  const uint32_t lows[] = {0x0000, 0x0001, 0x3fff, 0x7fff, 0x8000, 0x8001, 0xc000, 0xffff};
  std::vector<float> v;
  v.reserve(65536 * std::size(lows));
  for (uint32_t lo : lows) {
    for (uint32_t hi = 0; hi < 65536; ++hi) v.push_back(FromBits(hi << 16 | lo));
  }
  return v;
}

std::vector<float> RandomBits(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<float> v(n);
  for (float& x : v) x = FromBits(rng());
  return v;
}

// Packs x as rows of `cols` (row stride cols + 3, odd so every tail length
// shows up) with the fast path and the reference; expects identical bytes.
void ExpectPackLikeReference(const std::vector<float>& x, int64_t cols, WireDType type,
                             const std::string& what) {
  const int64_t ld = cols + 3;
  const int64_t rows = static_cast<int64_t>(x.size()) / cols;
  std::vector<float> strided(rows * ld, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    std::copy(x.begin() + r * cols, x.begin() + (r + 1) * cols, strided.begin() + r * ld);
  }
  for (const int64_t stride : {int64_t{0}, ld}) {
    const float* src = stride ? strided.data() : x.data();
    std::string data, scales, want_data, want_scales;
    PackActivations(src, rows, cols, stride, type, &data, &scales);
    RefPack(src, rows, cols, stride, type, &want_data, &want_scales);
    ASSERT_EQ(data.size(), want_data.size());
    ASSERT_EQ(scales, want_scales) << what << " " << Name(type) << " ld " << stride;
    if (data != want_data) {
      const size_t es = WireElementSize(type);
      for (size_t i = 0; i < data.size(); i += es) {
        if (data.compare(i, es, want_data, i, es) != 0) {
          const size_t e = i / es;
          const float in = src[(e / cols) * (stride ? stride : cols) + e % cols];
          FAIL() << what << " " << Name(type) << " ld " << stride << ": element " << e << " (0x"
                 << std::hex << std::bit_cast<uint32_t>(in) << ") packs differently";
        }
      }
    }
  }
}

// Unpacks `data` (and `scales`) with the fast path and the reference; expects
// the same status and the same float bits.
void ExpectUnpackLikeReference(WireDType type, const std::string& data, const std::string& scales,
                               int64_t rows, int64_t cols, const std::string& what) {
  std::vector<float> got(rows * cols, 1.0f), want(rows * cols, 1.0f);
  const absl::Status st = UnpackActivations(type, data, scales, rows, cols, got.data());
  const absl::Status want_st = RefUnpack(type, data, scales, rows, cols, want.data());
  EXPECT_EQ(st, want_st) << what << " " << Name(type);
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::bit_cast<uint32_t>(got[i]) != std::bit_cast<uint32_t>(want[i])) {
      FAIL() << what << " " << Name(type) << ": element " << i << " unpacks to 0x" << std::hex
             << std::bit_cast<uint32_t>(got[i]) << ", want 0x" << std::bit_cast<uint32_t>(want[i]);
    }
  }
}

TEST_P(WireKernels, PackEqualsScalarOnAllUpperHalvesAndRandomBits) {
  const std::vector<float> all = UpperHalvesTimesLowerBits();
  const std::vector<float> random = RandomBits(1 << 18, 7);
  for (WireDType t : kTypes) {
    for (const int64_t cols : {int64_t{1021}, int64_t{2048}, int64_t{37}}) {
      ExpectPackLikeReference(all, cols, t, "all upper halves, cols " + std::to_string(cols));
      ExpectPackLikeReference(random, cols, t, "random bits, cols " + std::to_string(cols));
    }
  }
}

// fp8 rows whose max is 448 have scale 1 and inv 1, so every other element
// reaches the e4m3 encoder unchanged: the encoder sees every pattern of
// magnitude up to 448 (and NaN), including the ties, subnormals and those that
// round up to 448. Larger ones set the scale: covered by the test above.
TEST_P(WireKernels, Fp8EncoderEqualsScalarOnEveryPatternUpTo448) {
  std::vector<float> x;
  constexpr int64_t kCols = 509;
  for (float v : UpperHalvesTimesLowerBits()) {
    if (!(std::fabs(v) > 448.0f)) {
      if (x.size() % kCols == 0) x.push_back(x.size() / kCols % 2 ? -448.0f : 448.0f);
      x.push_back(v);
    }
  }
  while (x.size() % kCols) x.push_back(0.0f);
  ExpectPackLikeReference(x, kCols, WireDType::kF8E4M3, "scale-1 rows");
}

TEST_P(WireKernels, Fp8PackEqualsScalarOnSpecialRows) {
  const float inf = INFINITY, nan = NAN, den = FromBits(1), max = FromBits(0x7f7fffff);
  const std::vector<std::vector<float>> rows = {{0, 0, 0, 0, 0},
                                                {-0.0f, 0, -0.0f, 0, 0},
                                                {nan, 0, 1, -2, nan},
                                                {nan, nan, nan, nan, nan},
                                                {inf, 1, -1, nan, 0},
                                                {-inf, 3, 2, 1, 0},
                                                {den, -den, 0, den, den},
                                                {1e-40f, 3e-39f, 0, -1e-39f, den},
                                                {max, -max, 1, 0, 1e30f},
                                                {448, 447.99f, 464, 480, 0.001f},
                                                {1e-37f, 0, -1e-38f, 0, 0},
                                                {5e-36f, -5.3e-36f, 1e-45f, 0, 2e-36f}};
  for (const auto& row : rows) {
    std::vector<float> x;
    // Repeated, so the SIMD bodies and the tails both see the row.
    for (int k = 0; k < 13; ++k) x.insert(x.end(), row.begin(), row.end());
    ExpectPackLikeReference(x, static_cast<int64_t>(x.size()), WireDType::kF8E4M3, "special row");
  }
}

TEST_P(WireKernels, UnpackEqualsScalarOnEveryCodeAndScale) {
  // bf16: all 65536 codes (NaN and Inf among them: the status must also match),
  // and the finite ones alone.
  std::string all16(65536 * 2, '\0'), finite16;
  for (uint32_t v = 0; v < 65536; ++v) {
    std::memcpy(&all16[v * 2], &v, 2);
    if ((v & 0x7f80) != 0x7f80) finite16.append(&all16[v * 2], 2);
  }
  ExpectUnpackLikeReference(WireDType::kBF16, all16, "", 256, 256, "all bf16 codes");
  ExpectUnpackLikeReference(WireDType::kBF16, finite16, "", 1, finite16.size() / 2,
                            "finite bf16 codes");
  ExpectUnpackLikeReference(WireDType::kBF16, finite16.substr(2 * 999), "", 1,
                            finite16.size() / 2 - 999, "finite bf16 codes, odd count");

  // f32: every upper half x lower bits (the first non-finite one is named).
  std::vector<float> f = UpperHalvesTimesLowerBits();
  std::string all32(reinterpret_cast<const char*>(f.data()), f.size() * 4), finite32;
  for (float v : f) {
    if (std::isfinite(v)) finite32.append(reinterpret_cast<const char*>(&v), 4);
  }
  ExpectUnpackLikeReference(WireDType::kF32, all32, "", 1, f.size(), "all f32 patterns");
  ExpectUnpackLikeReference(WireDType::kF32, finite32, "", 1, finite32.size() / 4,
                            "finite f32 patterns");
  ExpectUnpackLikeReference(WireDType::kF32, finite32.substr(4 * 5), "", 1, finite32.size() / 4 - 5,
                            "finite f32 patterns, odd count");

  // fp8: every code (0x7f/0xff are NaN) and every code but those, under
  // scales that keep, round to denormals or overflow the products (the
  // smallest valid scale, FLT_MIN, makes every subnormal code denormal).
  std::string all8, finite8;
  for (int rep = 0; rep < 3; ++rep) {
    for (int c = 0; c < 256; ++c) {
      all8.push_back(static_cast<char>(c));
      if ((c & 0x7f) != 0x7f) finite8.push_back(static_cast<char>(c));
    }
  }
  finite8.resize(finite8.size() - 5);  // a tail for every kernel width
  for (const float s : {1.0f, 0.5f, 3.7f, 1.0f / 448, 1e-30f, FLT_MIN, FromBits(0x00800001),
                        3 * FLT_MIN, 1e36f, FromBits(0x7f7fffff)}) {
    const std::string scale(reinterpret_cast<const char*>(&s), 4);
    const std::string what = absl::StrCat("fp8 codes, scale ", s);
    ExpectUnpackLikeReference(WireDType::kF8E4M3, all8, scale, 1, all8.size(), what);
    ExpectUnpackLikeReference(WireDType::kF8E4M3, finite8, scale, 1, finite8.size(), what);
    ExpectUnpackLikeReference(WireDType::kF8E4M3, finite8 + finite8, scale + scale, 2,
                              finite8.size(), what + " x2 rows");
  }
  // Bad scales are refused the same way, at the same row.
  for (const float s : {0.0f, -1.0f, float(NAN), float(INFINITY), FromBits(1), FromBits(0x00400000),
                        FromBits(0x007fffff)}) {
    const float good = 2.0f;
    std::string scales(reinterpret_cast<const char*>(&good), 4);
    scales.append(reinterpret_cast<const char*>(&s), 4);
    ExpectUnpackLikeReference(WireDType::kF8E4M3, finite8 + finite8, scales, 2, finite8.size(),
                              absl::StrCat("bad scale ", s));
  }

  // Random bytes, every type.
  std::mt19937 rng(11);
  std::string bytes(4 * 4099, '\0');
  for (char& b : bytes) b = static_cast<char>(rng());
  ExpectUnpackLikeReference(WireDType::kBF16, bytes, "", 2, 4099, "random bytes");
  ExpectUnpackLikeReference(WireDType::kF32, bytes, "", 1, 4099, "random bytes");
  const float s = 0.01f;
  ExpectUnpackLikeReference(WireDType::kF8E4M3, bytes,
                            std::string(reinterpret_cast<const char*>(&s), 4) +
                                std::string(reinterpret_cast<const char*>(&s), 4) +
                                std::string(reinterpret_cast<const char*>(&s), 4) +
                                std::string(reinterpret_cast<const char*>(&s), 4),
                            4, 4099, "random bytes");
}

TEST_P(WireKernels, RoundTripOfActivationsStaysBitExact) {
  // Realistic rows through pack and unpack, against the reference codec.
  auto x = Random(256 * 2048, 5);
  for (WireDType t : kTypes) {
    std::string data, scales, want_data, want_scales;
    PackActivations(x.data(), 256, 2048, 0, t, &data, &scales);
    RefPack(x.data(), 256, 2048, 0, t, &want_data, &want_scales);
    ASSERT_TRUE(data == want_data && scales == want_scales) << Name(t);
    ExpectUnpackLikeReference(t, data, scales, 256, 2048, "round trip");
  }
}

}  // namespace
}  // namespace dmoe::common
