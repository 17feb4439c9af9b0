// Builds without CUDA (dmoe_cuda not built): the functions of the plain-C++
// CUDA headers, answering "no CUDA here". Compiled into dmoe_backends only
// when DMOE_WITH_CUDA is off (core/CMakeLists.txt), so callers need no #ifdef.
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "core/kernels/cuda/ceilings.h"
#include "core/kernels/cuda/cuda_expert_backend.h"
#include "core/kernels/cuda/device_info.h"

namespace dmoe::core {
namespace {

absl::Status NoCuda() {
  return absl::FailedPreconditionError(
      "this build has no CUDA support (configure where nvcc is found, or with "
      "-DDMOE_CUDA=ON)");
}

}  // namespace

absl::StatusOr<std::unique_ptr<CudaExpertBackend>> MakeCudaExpertBackend(ComputeType,
                                                                         CudaBackendOptions) {
  return NoCuda();
}

namespace cuda {

int DeviceCount() { return 0; }

std::string DeviceDescription(int device) {
  return "no CUDA device " + std::to_string(device) + " (this build has no CUDA support)";
}

absl::StatusOr<double> DenseGemmSeconds(int, bool, bool, int64_t, int64_t, int64_t, int) {
  return NoCuda();
}

absl::StatusOr<double> DeviceCopyGBs(int, size_t, int) { return NoCuda(); }

}  // namespace cuda
}  // namespace dmoe::core
