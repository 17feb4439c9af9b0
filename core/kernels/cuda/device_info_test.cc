#include "core/kernels/cuda/device_info.h"

#include "gtest/gtest.h"

namespace dmoe::core::cuda {
namespace {

TEST(CudaDeviceInfo, DescribesEveryDeviceOrSkips) {
  const int n = DeviceCount();
  if (n == 0) GTEST_SKIP() << "no CUDA device on this machine";
  for (int d = 0; d < n; ++d) {
    const std::string desc = DeviceDescription(d);
    EXPECT_NE(desc.find("sm_"), std::string::npos) << desc;
  }
}

}  // namespace
}  // namespace dmoe::core::cuda
