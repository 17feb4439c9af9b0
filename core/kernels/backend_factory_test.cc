#include "core/kernels/backend_factory.h"

#include <memory>

#include "absl/strings/match.h"
#include "core/kernels/cuda/device_info.h"
#include "gtest/gtest.h"

namespace dmoe::core {
namespace {

TEST(BackendFactoryTest, ParsesKindNames) {
  EXPECT_EQ(*ParseBackendKind("cpu"), BackendKind::kCpu);
  EXPECT_EQ(*ParseBackendKind("cuda"), BackendKind::kCuda);
  EXPECT_EQ(*ParseBackendKind("auto"), BackendKind::kAuto);
  const auto bad = ParseBackendKind("gpu");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(bad.status().message(), "backend must be cpu, cuda or auto, got 'gpu'");
  EXPECT_EQ(BackendKindName(BackendKind::kCuda), "cuda");
}

TEST(BackendFactoryTest, CpuBackendWorks) {
  for (ComputeType type : {ComputeType::kBF16, ComputeType::kF32, ComputeType::kInt8}) {
    auto b = MakeExpertBackend(BackendKind::kCpu, {.compute = type});
    ASSERT_TRUE(b.ok()) << b.status();
    ASSERT_NE(*b, nullptr);
    EXPECT_EQ((*b)->WeightBytes(), 0u);
    EXPECT_FALSE((*b)->HasFfn(0, 0));
    EXPECT_EQ((*b)->Name(), MakeCpuExpertBackend(type)->Name());
  }
}

TEST(BackendFactoryTest, ParsesExpertWeights) {
  EXPECT_EQ(*ParseExpertWeights("auto", ComputeType::kF32), ComputeType::kF32);
  EXPECT_EQ(*ParseExpertWeights("auto", ComputeType::kBF16), ComputeType::kBF16);
  EXPECT_EQ(*ParseExpertWeights("int8", ComputeType::kBF16), ComputeType::kInt8);
  EXPECT_EQ(*ParseExpertWeights("bf16", ComputeType::kF32), ComputeType::kBF16);
  EXPECT_EQ(*ParseExpertWeights("f32", ComputeType::kBF16), ComputeType::kF32);
  EXPECT_EQ(ParseExpertWeights("fp8", ComputeType::kBF16).status().code(),
            absl::StatusCode::kUnimplemented);
  const auto bad = ParseExpertWeights("int4", ComputeType::kBF16);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(bad.status().message(), "expert-weights must be auto, f32, bf16 or int8, got 'int4'");
}

TEST(BackendFactoryTest, Int8IsCpuOnlyForNow) {
  EXPECT_EQ(MakeCpuExpertBackend(ComputeType::kInt8)->Name(), "cpu-int8");
  auto b = MakeExpertBackend(BackendKind::kCuda, {.compute = ComputeType::kInt8});
  ASSERT_FALSE(b.ok());
  EXPECT_TRUE(absl::StrContains(b.status().message(), "int8")) << b.status();
}

TEST(BackendFactoryTest, CudaAnswersPerBuildAndMachine) {
  auto b = MakeExpertBackend(BackendKind::kCuda);
  if (!CudaBuilt()) {
    EXPECT_EQ(cuda::DeviceCount(), 0);
    ASSERT_FALSE(b.ok());
    EXPECT_EQ(b.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_EQ(b.status().message(),
              "CUDA expert backend: this build has no CUDA support (configure where nvcc is "
              "found, or with -DDMOE_CUDA=ON)");
  } else if (cuda::DeviceCount() == 0) {
    // cuda_expert_backend.h: FailedPrecondition "no CUDA device" without a GPU.
    ASSERT_FALSE(b.ok());
    EXPECT_EQ(b.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_EQ(b.status().message(),
              "CUDA expert backend: no CUDA device (none visible, or no CUDA driver)");
  } else {
    ASSERT_TRUE(b.ok()) << b.status();
    EXPECT_NE(dynamic_cast<CudaExpertBackend*>(b->get()), nullptr);
  }
}

TEST(BackendFactoryTest, CudaDeviceOutOfRangeIsAnError) {
  auto b = MakeExpertBackend(BackendKind::kCuda, {.cuda = {.devices = {1000}}});
  ASSERT_FALSE(b.ok());
  EXPECT_TRUE(b.status().code() == absl::StatusCode::kFailedPrecondition ||
              b.status().code() == absl::StatusCode::kInvalidArgument)
      << b.status();
  EXPECT_TRUE(absl::StartsWith(b.status().message(), "CUDA expert backend: ")) << b.status();
}

TEST(BackendFactoryTest, AutoIsCpuWithoutAGpu) {
  auto b = MakeExpertBackend(BackendKind::kAuto, {.compute = ComputeType::kF32});
  ASSERT_TRUE(b.ok()) << b.status();
  const bool gpu = CudaBuilt() && cuda::DeviceCount() > 0;
  EXPECT_EQ(dynamic_cast<CudaExpertBackend*>(b->get()) != nullptr, gpu);
  if (!gpu) EXPECT_EQ((*b)->Name(), MakeCpuExpertBackend(ComputeType::kF32)->Name());
}

}  // namespace
}  // namespace dmoe::core
