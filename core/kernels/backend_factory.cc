#include "core/kernels/backend_factory.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "core/kernels/cuda/device_info.h"

namespace dmoe::core {

absl::StatusOr<BackendKind> ParseBackendKind(std::string_view name) {
  if (name == "cpu") return BackendKind::kCpu;
  if (name == "cuda") return BackendKind::kCuda;
  if (name == "auto") return BackendKind::kAuto;
  return absl::InvalidArgumentError(absl::StrCat("backend must be cpu, cuda or auto, got '",
                                                 absl::string_view(name.data(), name.size()), "'"));
}

std::string_view BackendKindName(BackendKind kind) {
  switch (kind) {
    case BackendKind::kCpu:
      return "cpu";
    case BackendKind::kCuda:
      return "cuda";
    case BackendKind::kAuto:
      return "auto";
  }
  return "?";
}

bool CudaBuilt() {
#ifdef DMOE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

absl::StatusOr<std::unique_ptr<ExpertBackend>> MakeExpertBackend(BackendKind kind,
                                                                 const BackendOptions& options) {
  const bool cuda = kind == BackendKind::kCuda ||
                    (kind == BackendKind::kAuto && CudaBuilt() && cuda::DeviceCount() > 0);
  if (!cuda) return MakeCpuExpertBackend(options.compute);
  if (options.compute == ComputeType::kInt8) {
    return absl::UnimplementedError(
        "CUDA expert backend: int8 expert weights run on the CPU backend only (for now)");
  }
  // Without CUDA this is the stub of cuda_stubs.cc (FailedPrecondition naming
  // the build flag).
  auto gpu = MakeCudaExpertBackend(options.compute, options.cuda);
  if (!gpu.ok()) {
    return absl::Status(gpu.status().code(),
                        absl::StrCat("CUDA expert backend: ", gpu.status().message()));
  }
  return std::unique_ptr<ExpertBackend>(*std::move(gpu));
}

}  // namespace dmoe::core
