// The CUDA expert backend against the CPU backend (itself checked against a
// float64 reference in cpu_expert_backend_test.cc), on random inputs, for both
// compute types and both GEMM modes. Every test but the factory's skips
// without a CUDA device.
//
// Tolerance, per token: max_j |gpu_j - cpu_j| <= tol * max_j |cpu_j|.
//   kF32, 5e-5: both accumulate in fp32 in different orders (K <= 256 terms,
//     ~sqrt(K) 2^-24 relative to the sum of |terms|, which is ~10x the row
//     maximum for random data) and compute exp differently (<= 2 ulp); 5e-5
//     leaves a margin yet fails on any bf16-sized (2^-9) error.
//   kBF16 + kPerExpert, 1e-2: both round x, W and h to bf16 and accumulate in
//     fp32; where the two fp32 values of h straddle a bf16 rounding boundary,
//     h_i moves by one bf16 ulp (2^-8 relative) on one side only.
//   kBF16 + kGrouped, 2e-2: the grouped GEMM also stores gate|up and the FFN
//     outputs in bf16 (two more roundings of 2^-9 relative each).
#include "core/kernels/cuda/cuda_expert_backend.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "core/expert_backend.h"
#include "core/kernels/cuda/device_info.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "testing/expert_backend_conformance.h"
#include "testing/expert_batch.h"

namespace dmoe::core {
namespace {

using testing::ExpertBackendConformance;
using ::testing::HasSubstr;
using testing::HostBatch;
using testing::HostFfn;
using testing::RandomFfn;
using testing::Uniform;

constexpr int32_t kLayer = 3;

struct Param {
  ComputeType type;
  CudaGemmMode gemm;
};

std::string ParamName(const ::testing::TestParamInfo<Param>& p) {
  return std::string(p.param.type == ComputeType::kF32 ? "F32" : "BF16") +
         (p.param.gemm == CudaGemmMode::kGrouped ? "Grouped" : "PerExpert");
}

class CudaExpertBackendTest : public ::testing::TestWithParam<Param> {
 protected:
  static constexpr int64_t kHidden = 256, kInter = 96, kSharedInter = 192;
  static constexpr int kExperts = 8;

  void SetUp() override {
    if (cuda::DeviceCount() == 0) GTEST_SKIP() << "no CUDA device on this machine";
  }

  double Tolerance() const {
    if (GetParam().type == ComputeType::kF32) return 5e-5;
    return GetParam().gemm == CudaGemmMode::kGrouped ? 2e-2 : 1e-2;
  }

  std::unique_ptr<CudaExpertBackend> MakeGpu(std::vector<int> devices = {}, bool timings = false) {
    auto b = MakeCudaExpertBackend(
        GetParam().type, {.devices = devices, .gemm = GetParam().gemm, .record_timings = timings});
    EXPECT_TRUE(b.ok()) << b.status();
    return b.ok() ? *std::move(b) : nullptr;
  }

  // The same FFNs into the GPU backend and a CPU reference backend.
  void LoadLayer(ExpertBackend& gpu) {
    if (cpu_ == nullptr) {
      cpu_ = MakeCpuExpertBackend(GetParam().type);
      for (int e = 0; e < kExperts; ++e) ffns_[e] = RandomFfn(kHidden, kInter, 100 + e);
      ffns_[kSharedFfn] = RandomFfn(kHidden, kSharedInter, 99);
      for (const auto& [id, f] : ffns_) ASSERT_TRUE(cpu_->LoadFfn(kLayer, id, f.View()).ok());
    }
    for (const auto& [id, f] : ffns_) {
      const absl::Status s = gpu.LoadFfn(kLayer, id, f.View());
      ASSERT_TRUE(s.ok()) << s;
    }
  }

  // Tokens with 0..3 distinct routed experts among the first `used` (so
  // experts [used, kExperts) get no rows) and, mostly, the shared FFN.
  HostBatch RandomBatch(int64_t tokens, int used, uint32_t seed) {
    return testing::RandomBatch({.layer = kLayer,
                                 .hidden = kHidden,
                                 .num_experts = used,
                                 .top_k = 3,
                                 .variable_k = true,
                                 .shared = testing::SharedFfn::kMostly},
                                tokens, seed);
  }

  void ExpectMatchesCpu(const HostBatch& b, const std::vector<float>& got) {
    std::vector<float> want(b.tokens() * kHidden);
    ASSERT_TRUE(cpu_->Compute(b.View(), want.data()).ok());
    int bad = 0;
    for (int64_t t = 0; t < b.tokens() && bad < 5; ++t) {
      double scale = 0, err = 0;
      int64_t worst = 0;
      for (int64_t j = 0; j < kHidden; ++j) {
        const double w = want[t * kHidden + j], g = got[t * kHidden + j];
        scale = std::max(scale, std::fabs(w));
        if (!(std::fabs(g - w) <= err)) {  // NaN counts as worst
          err = std::isnan(g) ? INFINITY : std::fabs(g - w);
          worst = j;
        }
      }
      if (b.offsets[t] == b.offsets[t + 1]) scale = 0;  // must be exact zeros
      if (!(err <= Tolerance() * scale)) {
        ADD_FAILURE() << "token " << t << " out[" << worst << "] = " << got[t * kHidden + worst]
                      << ", CPU " << want[t * kHidden + worst] << ", max error " << err << " > "
                      << Tolerance() << " x row max " << scale;
        ++bad;
      }
    }
  }

  std::unique_ptr<ExpertBackend> cpu_;
  std::map<int32_t, HostFfn> ffns_;
};

TEST_P(CudaExpertBackendTest, MatchesCpuOnRandomBatches) {
  auto gpu = MakeGpu();
  ASSERT_NE(gpu, nullptr);
  LoadLayer(*gpu);
  // 1100 tokens: several routing tiles of 1024 assignments.
  for (int64_t tokens : {1, 2, 7, 64, 300, 1100}) {
    const HostBatch b = RandomBatch(tokens, /*used=*/5, 1000 + tokens);
    std::vector<float> out(b.tokens() * kHidden, std::nanf(""));
    const absl::Status s = gpu->Compute(b.View(), out.data());
    ASSERT_TRUE(s.ok()) << s;
    SCOPED_TRACE(tokens);
    ExpectMatchesCpu(b, out);
  }
}

TEST_P(CudaExpertBackendTest, SharedOnlyEmptyTokensAndRepeatedExpert) {
  auto gpu = MakeGpu();
  ASSERT_NE(gpu, nullptr);
  LoadLayer(*gpu);
  std::mt19937 rng(7);
  HostBatch b{.layer = kLayer, .hidden = kHidden};
  b.AddToken(Uniform(kHidden, 1, &rng), {}, {});  // no work: zeros
  b.AddToken(Uniform(kHidden, 1, &rng), {kSharedFfn}, {1.0f});
  b.AddToken(Uniform(kHidden, 1, &rng), {7}, {2.0f});
  // More than 8 assignments, one expert twice (allowed: two rows).
  b.AddToken(Uniform(kHidden, 1, &rng), {0, 1, 2, 3, 4, 5, 6, 7, kSharedFfn, 3},
             {0.1f, -0.2f, 0.3f, 0.4f, 0.5f, 0.6f, 0.7f, 0.8f, 1.0f, -0.9f});
  b.AddToken(Uniform(kHidden, 1, &rng), {}, {});
  std::vector<float> out(b.tokens() * kHidden, std::nanf(""));
  ASSERT_TRUE(gpu->Compute(b.View(), out.data()).ok());
  ExpectMatchesCpu(b, out);
  for (int64_t j = 0; j < kHidden; ++j) {
    EXPECT_EQ(out[j], 0.0f);
    EXPECT_EQ(out[4 * kHidden + j], 0.0f);
  }
}

TEST_P(CudaExpertBackendTest, EmptyBatchesAndNoAssignments) {
  auto gpu = MakeGpu();
  ASSERT_NE(gpu, nullptr);
  LoadLayer(*gpu);
  HostBatch none{.layer = kLayer, .hidden = kHidden};
  EXPECT_TRUE(gpu->Compute(none.View(), nullptr).ok());
  HostBatch idle{.layer = kLayer, .hidden = kHidden};
  for (int t = 0; t < 3; ++t) idle.AddToken(std::vector<float>(kHidden, 1.0f), {}, {});
  std::vector<float> out(3 * kHidden, 5.0f);
  ASSERT_TRUE(gpu->Compute(idle.View(), out.data()).ok());
  EXPECT_THAT(out, ::testing::Each(0.0f));
}

TEST_P(CudaExpertBackendTest, BitwiseReproducibleRunToRun) {
  auto gpu = MakeGpu();
  ASSERT_NE(gpu, nullptr);
  LoadLayer(*gpu);
  const HostBatch b = RandomBatch(200, kExperts, 5);
  std::vector<float> first(b.tokens() * kHidden), again(first.size());
  ASSERT_TRUE(gpu->Compute(b.View(), first.data()).ok());
  ASSERT_TRUE(gpu->Compute(b.View(), again.data()).ok());
  EXPECT_EQ(0, std::memcmp(first.data(), again.data(), first.size() * sizeof(float)));
}

TEST_P(CudaExpertBackendTest, SeveralTicketsOutstanding) {
  auto gpu = MakeGpu();
  ASSERT_NE(gpu, nullptr);
  LoadLayer(*gpu);
  std::vector<HostBatch> batches;
  std::vector<std::vector<float>> outs;
  for (int i = 0; i < 3; ++i) {
    batches.push_back(RandomBatch(50 + 100 * i, kExperts, 40 + i));
    outs.emplace_back(batches.back().tokens() * kHidden);
  }
  std::vector<uint64_t> tickets;
  for (int i = 0; i < 3; ++i) {
    auto t = gpu->Submit(batches[i].View(), outs[i].data());
    ASSERT_TRUE(t.ok()) << t.status();
    tickets.push_back(*t);
  }
  for (int i = 2; i >= 0; --i) ASSERT_TRUE(gpu->Await(tickets[i]).ok()) << i;
  for (int i = 0; i < 3; ++i) {
    std::vector<float> alone(outs[i].size());
    ASSERT_TRUE(gpu->Compute(batches[i].View(), alone.data()).ok());
    EXPECT_EQ(0, std::memcmp(alone.data(), outs[i].data(), alone.size() * sizeof(float))) << i;
  }
  EXPECT_EQ(gpu->Await(tickets[0]).code(), absl::StatusCode::kNotFound);
  auto t = gpu->Submit(batches[0].View(), outs[0].data());
  ASSERT_TRUE(t.ok());
  gpu->Cancel(*t);
  EXPECT_TRUE(gpu->Compute(batches[1].View(), outs[1].data()).ok());
}

TEST_P(CudaExpertBackendTest, ErrorsNameTheProblemAndLeaveOutUntouched) {
  auto gpu = MakeGpu();
  ASSERT_NE(gpu, nullptr);
  LoadLayer(*gpu);
  // An FFN of another hidden size in the same layer.
  ASSERT_TRUE(gpu->LoadFfn(kLayer, 20, RandomFfn(64, 32, 5).View()).ok());
  std::mt19937 rng(3);
  // ids [0, S, 1, 2, S, 3], offsets [0, 2, 5, 5, 6]
  HostBatch good{.layer = kLayer, .hidden = kHidden};
  good.AddToken(Uniform(kHidden, 1, &rng), {0, kSharedFfn}, {0.5f, 1.0f});
  good.AddToken(Uniform(kHidden, 1, &rng), {1, 2, kSharedFfn}, {0.2f, 0.3f, 1.0f});
  good.AddToken(Uniform(kHidden, 1, &rng), {}, {});
  good.AddToken(Uniform(kHidden, 1, &rng), {3}, {0.9f});
  std::vector<float> out(good.tokens() * kHidden, 42.0f);
  auto expect_error = [&](HostBatch b, absl::StatusCode code, const std::string& msg) {
    const absl::Status s = gpu->Compute(b.View(), out.data());
    EXPECT_EQ(s.code(), code) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr(msg));
    EXPECT_THAT(out, ::testing::Each(42.0f)) << msg;
  };
  HostBatch b = good;
  b.ids[1] = 9;  // not loaded
  expect_error(b, absl::StatusCode::kFailedPrecondition,
               "layer 3: expert 9 is not loaded on this backend");
  b = good;
  b.ids[2] = -2;
  expect_error(b, absl::StatusCode::kInvalidArgument, "invalid FFN id -2 at assignment 2");
  b = good;
  b.ids[0] = 20;
  expect_error(b, absl::StatusCode::kInvalidArgument,
               "layer 3 expert 20: hidden 64 != batch hidden 256");
  b = good;
  std::swap(b.offsets[1], b.offsets[2]);  // [0, 5, 2, 5, 6]
  expect_error(b, absl::StatusCode::kInvalidArgument,
               "layer 3: token_offsets decrease at token 1 (5 -> 2)");
  b = good;
  b.offsets.back() += 1;
  expect_error(b, absl::StatusCode::kInvalidArgument, "token_offsets end at");
  b = good;
  b.weights.pop_back();
  expect_error(b, absl::StatusCode::kInvalidArgument, "weights for");
  const absl::Status other_layer = gpu->Compute(good.View(kLayer + 1), out.data());
  EXPECT_EQ(other_layer.code(), absl::StatusCode::kFailedPrecondition) << other_layer;
  // And the backend still works.
  ASSERT_TRUE(gpu->Compute(good.View(), out.data()).ok());
  ExpectMatchesCpu(good, out);
}

TEST_P(CudaExpertBackendTest, UnloadReloadAndMemoryAccounting) {
  auto gpu = MakeGpu();
  ASSERT_NE(gpu, nullptr);
  LoadLayer(*gpu);
  const size_t elem = GetParam().type == ComputeType::kBF16 ? 2 : 4;
  const size_t expect = 3 * elem * kHidden * (kExperts * kInter + kSharedInter);
  EXPECT_EQ(gpu->WeightBytes(), expect);
  size_t per_device = 0;
  for (const auto& m : gpu->MemoryPerDevice()) {
    per_device += m.weight_bytes;
    EXPECT_GT(m.total_bytes, 0u);
  }
  EXPECT_EQ(per_device, expect);

  ASSERT_TRUE(gpu->UnloadFfn(kLayer, 4).ok());
  EXPECT_FALSE(gpu->HasFfn(kLayer, 4));
  EXPECT_EQ(gpu->WeightBytes(), expect - 3 * elem * kHidden * kInter);
  EXPECT_EQ(gpu->UnloadFfn(kLayer, 4).code(), absl::StatusCode::kNotFound);
  HostBatch b = RandomBatch(16, kExperts, 9);
  b.ids[0] = 4;
  std::vector<float> out(b.tokens() * kHidden);
  EXPECT_EQ(gpu->Compute(b.View(), out.data()).code(), absl::StatusCode::kFailedPrecondition);

  // Reload with other weights, in the CPU reference too: replaced, not added.
  ffns_[4] = RandomFfn(kHidden, kInter, 555);
  ASSERT_TRUE(gpu->LoadFfn(kLayer, 4, ffns_[4].View()).ok());
  ASSERT_TRUE(gpu->LoadFfn(kLayer, 4, ffns_[4].View()).ok());
  ASSERT_TRUE(cpu_->LoadFfn(kLayer, 4, ffns_[4].View()).ok());
  EXPECT_EQ(gpu->WeightBytes(), expect);
  ASSERT_TRUE(gpu->Compute(b.View(), out.data()).ok());
  ExpectMatchesCpu(b, out);

  HostFfn bad = ffns_[1];
  bad.gate.pop_back();
  const absl::Status s = gpu->LoadFfn(kLayer, 1, bad.View());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("layer 3 expert 1: gate_proj has"));
  EXPECT_EQ(gpu->LoadFfn(kLayer, -2, ffns_[1].View()).code(), absl::StatusCode::kInvalidArgument);
}

TEST_P(CudaExpertBackendTest, LoadsAndUnloadsWhileComputing) {
  auto gpu = MakeGpu();
  ASSERT_NE(gpu, nullptr);
  EXPECT_TRUE(gpu->LoadsConcurrently());
  LoadLayer(*gpu);
  std::atomic<bool> stop{false};
  std::thread loader([&] {
    const HostFfn other = RandomFfn(kHidden, kInter, 777);
    for (int i = 0; !stop.load(); ++i) {  // experts 6 and 7: not in the batches
      EXPECT_TRUE(gpu->LoadFfn(kLayer, 6 + i % 2, other.View()).ok());
      EXPECT_TRUE(gpu->UnloadFfn(kLayer, 6 + i % 2).ok());
    }
  });
  for (int i = 0; i < 20; ++i) {
    const HostBatch b = RandomBatch(40, /*used=*/5, 300 + i);
    std::vector<float> out(b.tokens() * kHidden);
    ASSERT_TRUE(gpu->Compute(b.View(), out.data()).ok());
    ExpectMatchesCpu(b, out);
  }
  stop = true;
  loader.join();
}

// Two shards: on two GPUs when there are, else both on device 0 (the same
// peer copies and cross-stream waits, through one device).
TEST_P(CudaExpertBackendTest, SplitsWorkAcrossShards) {
  const std::vector<int> devices =
      cuda::DeviceCount() >= 2 ? std::vector<int>{0, 1} : std::vector<int>{0, 0};
  auto gpu = MakeGpu(devices);
  ASSERT_NE(gpu, nullptr);
  EXPECT_EQ(gpu->num_shards(), 2);
  EXPECT_NE(gpu->ShardOf(kLayer, 0), gpu->ShardOf(kLayer, 1));
  LoadLayer(*gpu);
  const auto mem = gpu->MemoryPerDevice();
  ASSERT_EQ(mem.size(), 2u);
  EXPECT_GT(mem[0].weight_bytes, 0u);
  EXPECT_GT(mem[1].weight_bytes, 0u);
  for (int64_t tokens : {1, 5, 333}) {
    const HostBatch b = RandomBatch(tokens, kExperts, 70 + tokens);
    std::vector<float> out(b.tokens() * kHidden, std::nanf(""));
    ASSERT_TRUE(gpu->Compute(b.View(), out.data()).ok());
    SCOPED_TRACE(tokens);
    ExpectMatchesCpu(b, out);
  }
}

TEST_P(CudaExpertBackendTest, RecordsTimings) {
  auto gpu = MakeGpu({}, /*timings=*/true);
  ASSERT_NE(gpu, nullptr);
  LoadLayer(*gpu);
  const HostBatch b = RandomBatch(128, kExperts, 1);
  std::vector<float> out(b.tokens() * kHidden);
  ASSERT_TRUE(gpu->Compute(b.View(), out.data()).ok());
  const CudaExpertBackend::Timings t = gpu->LastTimings();
  EXPECT_GT(t.gemm_ms, 0);
  EXPECT_GE(t.batch_ms, t.gemm_ms);
  EXPECT_EQ(t.rows, static_cast<int64_t>(b.ids.size()));
}

INSTANTIATE_TEST_SUITE_P(Types, CudaExpertBackendTest,
                         ::testing::Values(Param{ComputeType::kF32, CudaGemmMode::kGrouped},
                                           Param{ComputeType::kF32, CudaGemmMode::kPerExpert},
                                           Param{ComputeType::kBF16, CudaGemmMode::kGrouped},
                                           Param{ComputeType::kBF16, CudaGemmMode::kPerExpert}),
                         ParamName);

// Runs everywhere: the factory's answer without a GPU is the one the expert
// server and the benchmark report.
TEST(CudaExpertBackendFactory, NoDeviceIsFailedPreconditionElseBadOrdinal) {
  const int n = cuda::DeviceCount();
  if (n == 0) {
    auto b = MakeCudaExpertBackend(ComputeType::kBF16);
    EXPECT_EQ(b.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_THAT(std::string(b.status().message()), HasSubstr("no CUDA device"));
    return;
  }
  auto b = MakeCudaExpertBackend(ComputeType::kBF16, {.devices = {n}});
  EXPECT_EQ(b.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(b.status().message()), HasSubstr("does not exist"));
  auto ok = MakeCudaExpertBackend(ComputeType::kF32);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ((*ok)->Name(), "cuda-f32");
  EXPECT_EQ((*ok)->num_shards(), n);
}

// ---- the conformance suite every ExpertBackend runs ----------------------------

// Against the float64 reference, with the extra rounding each mode has over
// the CPU backend (the tolerances above); cuBLAS picks kernels by shape, so a
// token's result is checked per batch against the reference, not across
// batches bit for bit.
testing::ConformanceParam CudaConformance(ComputeType type, CudaGemmMode gemm) {
  const Param p{type, gemm};
  return {
      .name = ParamName(::testing::TestParamInfo<Param>(p, 0)),
      .make = [p](const testing::ConformanceModel& m) -> absl::StatusOr<testing::BackendUnderTest> {
        if (cuda::DeviceCount() == 0) {
          return absl::UnavailableError("no CUDA device on this machine");
        }
        auto b = MakeCudaExpertBackend(p.type, {.devices = {}, .gemm = p.gemm});
        if (!b.ok()) return b.status();
        testing::BackendUnderTest out;
        out.backend = *std::move(b);
        const absl::Status st = m.LoadInto(*out.backend);
        if (!st.ok()) return st;
        return out;
      },
      .reference_type = type,
      .extra_rel_error = type == ComputeType::kF32        ? 5e-5
                         : gemm == CudaGemmMode::kGrouped ? 2e-2
                                                          : 1e-2,
      .batch_invariant = false};
}

INSTANTIATE_TEST_SUITE_P(
    Cuda, ExpertBackendConformance,
    ::testing::Values(CudaConformance(ComputeType::kF32, CudaGemmMode::kPerExpert),
                      CudaConformance(ComputeType::kF32, CudaGemmMode::kGrouped),
                      CudaConformance(ComputeType::kBF16, CudaGemmMode::kPerExpert),
                      CudaConformance(ComputeType::kBF16, CudaGemmMode::kGrouped)),
    testing::ConformanceName);

}  // namespace
}  // namespace dmoe::core
