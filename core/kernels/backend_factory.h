// The one place that chooses an expert compute backend: the CPU backend, or
// the CUDA backend when this build has it. Services and benchmarks call
// MakeExpertBackend instead of testing DMOE_WITH_CUDA themselves; only this
// library (dmoe_backends) knows whether dmoe_cuda was built and linked.
//
// The CUDA headers (core/kernels/cuda/*.h) are plain C++ and may be included
// everywhere: in a build without CUDA, dmoe_backends defines their functions
// as stubs (no device; MakeCudaExpertBackend and the ceilings answer
// FailedPrecondition naming the build flag), so code that needs the
// CUDA-specific interface (the benchmark's timings) compiles and links in
// both builds and asks CudaBuilt() first.
#ifndef DMOE_CORE_KERNELS_BACKEND_FACTORY_H_
#define DMOE_CORE_KERNELS_BACKEND_FACTORY_H_

#include <memory>
#include <string_view>

#include "absl/status/statusor.h"
#include "core/expert_backend.h"
#include "core/kernels/cuda/cuda_expert_backend.h"

namespace dmoe::core {

enum class BackendKind {
  kCpu,   // MakeCpuExpertBackend
  kCuda,  // CUDA on options.cuda.devices (every visible GPU by default)
  kAuto,  // kCuda when this build has CUDA and a GPU is visible, else kCpu
};

// "cpu", "cuda" or "auto"; InvalidArgument otherwise.
absl::StatusOr<BackendKind> ParseBackendKind(std::string_view name);
std::string_view BackendKindName(BackendKind kind);

struct BackendOptions {
  ComputeType compute = ComputeType::kBF16;
  CudaBackendOptions cuda;  // kCuda / kAuto on a GPU only
};

// kCuda errors carry the prefix "CUDA expert backend: ": FailedPrecondition
// "this build has no CUDA support (configure where nvcc is found, or with
// -DDMOE_CUDA=ON)" in a build without CUDA; in a CUDA build, the errors of
// MakeCudaExpertBackend (FailedPrecondition "no CUDA device ..." without a
// GPU, InvalidArgument for a device ordinal out of range).
absl::StatusOr<std::unique_ptr<ExpertBackend>> MakeExpertBackend(
    BackendKind kind, const BackendOptions& options = {});

// Whether this build has the CUDA backend (dmoe_cuda linked).
bool CudaBuilt();

}  // namespace dmoe::core

#endif  // DMOE_CORE_KERNELS_BACKEND_FACTORY_H_
