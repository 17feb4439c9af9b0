#include "core/kernels/cpu/linear.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_format.h"
#include "core/dtype.h"
#include "core/isa.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace dmoe::core {
namespace {

using ::testing::HasSubstr;

std::vector<float> RandomVector(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (float& f : v) f = dist(rng);
  return v;
}

float RoundBF16(float f) { return BF16ToF32(F32ToBF16(f)); }

// The weights an int8 layer computes with, quantised independently of the
// kernels' code: per row scale = max |w| / 127, q = round(w / scale).
std::vector<double> DequantInt8(const std::vector<float>& w, int64_t n, int64_t k) {
  std::vector<double> out(n * k);
  for (int64_t r = 0; r < n; ++r) {
    float amax = 0;
    for (int64_t c = 0; c < k; ++c) amax = std::max(amax, std::fabs(w[r * k + c]));
    const float s = amax > 0 ? amax / 127.0f : 1.0f;
    for (int64_t c = 0; c < k; ++c) out[r * k + c] = double{std::round(w[r * k + c] / s)} * s;
  }
  return out;
}

// Float64 reference y[m, n] = x[m, k] · W[n, k]^T on the values the kernel sees
// (x bf16-rounded for kBF16 and kInt8; W bf16-rounded for kBF16, dequantised
// for kInt8), and per output the scale sum_k |x_k w_k| that bounds the
// accumulation error.
void Reference(const std::vector<float>& x, int64_t ldx, const std::vector<float>& w, int64_t m,
               int64_t n, int64_t k, ComputeType type, std::vector<double>* y,
               std::vector<double>* scale) {
  const std::vector<double> wq =
      type == ComputeType::kInt8 ? DequantInt8(w, n, k) : std::vector<double>();
  auto xval = [&](float f) { return double{type == ComputeType::kF32 ? f : RoundBF16(f)}; };
  auto wval = [&](int64_t i) {
    return type == ComputeType::kInt8   ? wq[i]
           : type == ComputeType::kBF16 ? double{RoundBF16(w[i])}
                                        : double{w[i]};
  };
  y->assign(m * n, 0.0);
  scale->assign(m * n, 0.0);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double acc = 0, abs_acc = 0;
      for (int64_t p = 0; p < k; ++p) {
        const double prod = xval(x[i * ldx + p]) * wval(j * k + p);
        acc += prod;
        abs_acc += std::fabs(prod);
      }
      (*y)[i * n + j] = acc;
      (*scale)[i * n + j] = abs_acc;
    }
  }
}

struct Shape {
  int64_t m, n, k;
};

std::string TypeName(ComputeType t) {
  return t == ComputeType::kBF16 ? "BF16" : t == ComputeType::kInt8 ? "INT8" : "F32";
}

// Tolerance: |y - ref| <= 1e-5 * sum_k |x_k w_k|.
// - kF32: inputs are used exactly; the only error is fp32 accumulation of k
//   terms, typically ~sqrt(k) * 2^-24 of sum |x w| (3e-6 for k = 2048).
// - kBF16: the reference uses the same bf16-rounded inputs and a product of two
//   bf16 values (8-bit significands) is exact in fp32, so again only the fp32
//   accumulation differs and the same bound holds. (Without rounding the
//   reference's inputs the error would be ~2^-9, which this bound would catch.)
// - kInt8: bf16 x times int8 q is exact too; the scale multiplies the finished
//   chain (one more rounding, 2^-24 of |y| <= sum |x w|).
constexpr double kRelTol = 1e-5;

class PackedLinearTest : public ::testing::TestWithParam<ComputeType> {
 protected:
  void TearDown() override { SetComputeThreads(0); }
};

void ExpectClose(const std::vector<float>& y, int64_t ldy, const std::vector<double>& ref,
                 const std::vector<double>& scale, int64_t m, int64_t n) {
  int bad = 0;
  for (int64_t i = 0; i < m && bad < 5; ++i) {
    for (int64_t j = 0; j < n && bad < 5; ++j) {
      const double r = ref[i * n + j];
      const double tol = kRelTol * scale[i * n + j] + 1e-30;
      if (!(std::fabs(y[i * ldy + j] - r) <= tol)) {
        ADD_FAILURE() << "y[" << i << "," << j << "] = " << y[i * ldy + j] << ", expected " << r
                      << " +- " << tol;
        ++bad;
      }
    }
  }
}

TEST_P(PackedLinearTest, MatchesFloat64ReferenceForManyShapes) {
  const ComputeType type = GetParam();
  const std::vector<Shape> shapes = {{1, 1, 1},       {1, 64, 64},    {1, 2816, 2048},
                                     {3, 7, 13},      {5, 33, 17},    {37, 100, 129},
                                     {64, 160, 1408}, {130, 65, 257}, {2, 2048, 1408}};
  uint32_t seed = 1;
  for (const Shape& s : shapes) {
    SCOPED_TRACE(absl::StrFormat("m=%d n=%d k=%d", s.m, s.n, s.k));
    const auto w = RandomVector(s.n * s.k, seed++);
    const auto x = RandomVector(s.m * s.k, seed++);
    auto lin = PackedLinear::Create(w.data(), s.n, s.k, type);
    ASSERT_TRUE(lin.ok()) << lin.status();
    EXPECT_EQ(lin->n(), s.n);
    EXPECT_EQ(lin->k(), s.k);
    EXPECT_EQ(lin->type(), type);
    std::vector<float> y(s.m * s.n, std::nanf(""));
    lin->Forward(x.data(), s.m, y.data());
    std::vector<double> ref, scale;
    Reference(x, s.k, w, s.m, s.n, s.k, type, &ref, &scale);
    ExpectClose(y, s.n, ref, scale, s.m, s.n);
  }
}

// m = 2 takes the small-M bf16 kernel (which writes y with its stride), m = 9
// oneDNN (which stages strided x and y through dense buffers).
TEST_P(PackedLinearTest, StridedInputAndOutput) {
  const ComputeType type = GetParam();
  const int64_t n = 70, k = 45, ldx = 52, ldy = 75;
  const auto w = RandomVector(n * k, 11);
  auto lin = PackedLinear::Create(w.data(), n, k, type);
  ASSERT_TRUE(lin.ok()) << lin.status();
  for (int64_t m : {2, 9}) {
    SCOPED_TRACE(absl::StrFormat("m=%d", m));
    const auto x = RandomVector(m * ldx, 12);
    const float kSentinel = 12345.0f;
    std::vector<float> y(m * ldy, kSentinel);
    lin->Forward(x.data(), m, y.data(), ldx, ldy);
    std::vector<double> ref, scale;
    Reference(x, ldx, w, m, n, k, type, &ref, &scale);
    ExpectClose(y, ldy, ref, scale, m, n);
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = n; j < ldy; ++j) {
        EXPECT_EQ(y[i * ldy + j], kSentinel) << i << "," << j;
      }
    }
  }
}

TEST_P(PackedLinearTest, ZeroRowsIsANoOp) {
  const auto w = RandomVector(8 * 4, 1);
  auto lin = PackedLinear::Create(w.data(), 8, 4, GetParam());
  ASSERT_TRUE(lin.ok());
  lin->Forward(nullptr, 0, nullptr);
}

// The expert backend's determinism rests on this: a row's result does not
// depend on how many rows are computed with it, nor on the thread count.
// Rows computed alone or a few at a time (the register-block decode path) and
// in a batch of 37 (the panel-group path), with one and two threads, are
// bitwise equal;
// (300, 257) has K and N tails.
TEST_P(PackedLinearTest, RowResultIsBitwiseIndependentOfBatchAndThreads) {
  for (const auto& [n, k] : {std::pair<int64_t, int64_t>{2816, 2048}, {300, 257}}) {
    SCOPED_TRACE(absl::StrFormat("n=%d k=%d", n, k));
    const int64_t m = 37;
    const auto w = RandomVector(n * k, 21);
    const auto x = RandomVector(m * k, 22);
    auto lin = PackedLinear::Create(w.data(), n, k, GetParam());
    ASSERT_TRUE(lin.ok());
    SetComputeThreads(2);
    std::vector<float> batched(m * n);
    lin->Forward(x.data(), m, batched.data());
    for (int threads : {1, 2}) {
      SetComputeThreads(threads);
      for (int64_t rows : {1, 2, 3, 4, 5, 6, 7, 9, 13, 20}) {
        for (int64_t i : {int64_t{0}, int64_t{11}, m - rows}) {
          std::vector<float> few(rows * n);
          lin->Forward(x.data() + i * k, rows, few.data());
          EXPECT_EQ(0, std::memcmp(few.data(), batched.data() + i * n, few.size() * sizeof(float)))
              << "rows " << i << ".." << i + rows - 1 << " threads " << threads;
        }
      }
      std::vector<float> again(m * n);
      lin->Forward(x.data(), m, again.data());
      EXPECT_EQ(0, std::memcmp(again.data(), batched.data(), again.size() * sizeof(float)))
          << "threads " << threads;
    }
  }
}

TEST_P(PackedLinearTest, EveryLayerIsBatchInvariantAndNamesItsKernel) {
  const auto w = RandomVector(64 * 48, 5);
  auto lin = PackedLinear::Create(w.data(), 64, 48, GetParam());
  ASSERT_TRUE(lin.ok());
  EXPECT_TRUE(lin->batch_invariant()) << lin->KernelName();
  const std::string kernel = lin->KernelName();
  if (GetParam() == ComputeType::kBF16 && IsaAtLeast(IsaLevel::kAvx512Bf16)) {
    EXPECT_EQ(kernel, "dmoe-avx512-bf16") << IsaSummary();
  } else {
    EXPECT_EQ(kernel, IsaAtLeast(IsaLevel::kAvx512) ? "dmoe-avx512"
                      : IsaAtLeast(IsaLevel::kAvx2) ? "dmoe-avx2"
                                                    : "dmoe-generic")
        << IsaSummary();
  }
}

TEST_P(PackedLinearTest, ConcurrentForwardFromSeveralThreads) {
  const int64_t n = 300, k = 257;
  const auto w = RandomVector(n * k, 31);
  auto lin = PackedLinear::Create(w.data(), n, k, GetParam());
  ASSERT_TRUE(lin.ok());
  std::vector<std::vector<float>> xs, expected;
  for (int t = 0; t < 4; ++t) {
    const int64_t m = 1 + 5 * t;
    xs.push_back(RandomVector(m * k, 40 + t));
    expected.emplace_back(m * n);
    lin->Forward(xs[t].data(), m, expected[t].data());
  }
  std::vector<std::vector<float>> got(4);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      const int64_t m = 1 + 5 * t;
      got[t].resize(m * n);
      for (int rep = 0; rep < 20; ++rep) lin->Forward(xs[t].data(), m, got[t].data());
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < 4; ++t) EXPECT_EQ(got[t], expected[t]) << "thread " << t;
}

TEST_P(PackedLinearTest, WeightBytesCoverThePackedMatrixAndMoveLeavesEmpty) {
  const ComputeType type = GetParam();
  const int64_t n = 128, k = 64;
  const auto w = RandomVector(n * k, 5);
  auto lin = PackedLinear::Create(w.data(), n, k, type);
  ASSERT_TRUE(lin.ok());
  const size_t elem = type == ComputeType::kBF16 ? 2 : type == ComputeType::kInt8 ? 1 : 4;
  EXPECT_GE(lin->weight_bytes(), n * k * elem);
  EXPECT_LE(lin->weight_bytes(),
            2 * n * k * 4);  // padding, or f32 emulation of bf16
  PackedLinear moved = *std::move(lin);
  EXPECT_FALSE(moved.empty());
  EXPECT_EQ(moved.n(), n);
  PackedLinear empty;
  EXPECT_TRUE(empty.empty());
  EXPECT_EQ(empty.weight_bytes(), 0u);
}

INSTANTIATE_TEST_SUITE_P(Types, PackedLinearTest,
                         ::testing::Values(ComputeType::kF32, ComputeType::kBF16,
                                           ComputeType::kInt8),
                         [](const auto& info) { return TypeName(info.param); });

TEST(PackedLinearCreateTest, RejectsBadShapes) {
  const float w[4] = {1, 2, 3, 4};
  auto zero = PackedLinear::Create(w, 0, 4, ComputeType::kF32);
  EXPECT_EQ(zero.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(zero.status().message(), HasSubstr("[0,4]"));
  auto null = PackedLinear::Create(nullptr, 2, 2, ComputeType::kBF16);
  EXPECT_EQ(null.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(null.status().message(), HasSubstr("null weights"));
}

TEST(PackedLinearCreateTest, Int8RejectsNonFiniteWeightsAndStaysCloseToF32) {
  std::vector<float> w = RandomVector(40 * 64, 3);
  w[7 * 64 + 5] = std::numeric_limits<float>::infinity();
  auto bad = PackedLinear::Create(w.data(), 40, 64, ComputeType::kInt8);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("non-finite"));

  // Quantisation error, not a broken kernel: int8 within ~1% (relative L2) of
  // f32 on random weights, and an all-zero row gives zeros.
  const int64_t n = 300, k = 1024, m = 5;
  w = RandomVector(n * k, 4);
  for (int64_t c = 0; c < k; ++c) w[17 * k + c] = 0.0f;
  const auto x = RandomVector(m * k, 5);
  auto f32 = PackedLinear::Create(w.data(), n, k, ComputeType::kF32);
  auto i8 = PackedLinear::Create(w.data(), n, k, ComputeType::kInt8);
  ASSERT_TRUE(f32.ok() && i8.ok());
  EXPECT_LT(i8->weight_bytes(), f32->weight_bytes() / 3);
  std::vector<float> a(m * n), b(m * n);
  f32->Forward(x.data(), m, a.data());
  i8->Forward(x.data(), m, b.data());
  double err = 0, norm = 0;
  for (int64_t i = 0; i < m * n; ++i) {
    err += (double{a[i]} - b[i]) * (double{a[i]} - b[i]);
    norm += double{a[i]} * a[i];
  }
  EXPECT_LT(std::sqrt(err / norm), 0.01);
  EXPECT_GT(std::sqrt(err / norm), 1e-5);  // it did quantise
  for (int64_t r = 0; r < m; ++r) EXPECT_EQ(b[r * n + 17], 0.0f);
}

TEST(ComputeThreadsTest, SetAndRestore) {
  SetComputeThreads(1);
  EXPECT_EQ(ComputeThreads(), 1);
  // Applies to threads other than the one that set it.
  int other = 0;
  std::thread([&] { other = ComputeThreads(); }).join();
  EXPECT_EQ(other, 1);
  SetComputeThreads(2);
  EXPECT_EQ(ComputeThreads(), 2);
  SetComputeThreads(0);
  EXPECT_GE(ComputeThreads(), 1);
}

}  // namespace
}  // namespace dmoe::core
