#include "core/wire.h"

#include <cmath>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "gtest/gtest.h"

namespace dmoe::core {
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
  for (int i = 0; i < 64; ++i) EXPECT_EQ(y[i], BF16ToF32(F32ToBF16(x[i])));
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
      const float want = F8E4M3ToF32(F32ToF8E4M3(x[r * 300 + c] / s)) * s;
      EXPECT_EQ(y[r * 300 + c], want) << r << "," << c;
    }
  }
}

TEST(Wire, UnpackRejectsBadSizesAndValues) {
  std::vector<float> y(8);
  auto st = UnpackActivations(WireDType::kBF16, std::string(15, '\0'), "", 2, 4, y.data());
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("needs 16 bytes, got 15"), std::string::npos) << st;
  st = UnpackActivations(WireDType::kF8E4M3, std::string(8, '\0'), std::string(4, '\0'), 2, 4, y.data());
  EXPECT_NE(st.message().find("row scales"), std::string::npos) << st;
  const float nan = std::nanf("");
  std::string bytes(reinterpret_cast<const char*>(&nan), 4);
  st = UnpackActivations(WireDType::kF32, bytes, "", 1, 1, y.data());
  EXPECT_NE(st.message().find("not finite"), std::string::npos) << st;
}

}  // namespace
}  // namespace dmoe::core
