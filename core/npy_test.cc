#include "core/npy.h"

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace dmoe::core {
namespace {

using ::testing::HasSubstr;

// A .npy file's bytes with header dict `dict` and `data` after it.
std::string Npy(const std::string& dict, const std::string& data) {
  std::string header = dict + "\n";
  std::string out("\x93NUMPY\x01\x00", 8);
  out.push_back(static_cast<char>(header.size() & 0xff));
  out.push_back(static_cast<char>(header.size() >> 8));
  return out + header + data;
}

std::string Floats(const std::vector<float>& v) {
  std::string s(v.size() * 4, '\0');
  if (!v.empty()) std::memcpy(s.data(), v.data(), s.size());
  return s;
}

TEST(NpyTest, ParsesShapeAndData) {
  auto a = ParseNpyF32(
      Npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 1), }", Floats({1.5f, -2})));
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->shape, (std::vector<int64_t>{2, 1}));
  EXPECT_EQ(a->data, (std::vector<float>{1.5f, -2}));
  auto empty = ParseNpyF32(Npy("{'descr': '<f4', 'fortran_order': False, 'shape': (0, 3), }", ""));
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_TRUE(empty->data.empty());
}

// Found writing fuzz/npy_fuzz: dims were multiplied unchecked in int64, so
// shape (2^62,) with no data wrapped n * 4 to 0 (UBSan: signed overflow), the
// size check passed and resize(2^62) threw: the process aborted.
TEST(NpyTest, NegativeAndOverflowingDimsAreInvalid) {
  const std::string data = Floats({1, 2, 3, 4});
  auto wrap = ParseNpyF32(
      Npy("{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904,), }", ""));
  EXPECT_EQ(wrap.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(wrap.status().message(), HasSubstr("data size mismatch"));
  auto neg =
      ParseNpyF32(Npy("{'descr': '<f4', 'fortran_order': False, 'shape': (-1, 2), }", Floats({})));
  EXPECT_EQ(neg.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(neg.status().message(), HasSubstr("negative dim -1"));
  auto huge = ParseNpyF32(Npy(
      "{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904, 4, 0), }", data));
  EXPECT_EQ(huge.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(huge.status().message(), HasSubstr("data size mismatch"));
  auto zero = ParseNpyF32(
      Npy("{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904, 0), }", ""));
  ASSERT_TRUE(zero.ok()) << zero.status();
  EXPECT_TRUE(zero->data.empty());
  auto swapped = ParseNpyF32(Npy("{'descr': '<f4', 'fortran_order': False, 'shape': )4(, }", data));
  EXPECT_THAT(swapped.status().message(), HasSubstr("no shape"));
}

}  // namespace
}  // namespace dmoe::core
