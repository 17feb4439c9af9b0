// The GPU expert backend: FFN weights resident on one or more CUDA devices,
// the MoE layer computed with cuBLAS and a few fused kernels. Plain C++ (no
// CUDA headers). Reach it through core::MakeExpertBackend
// (core/kernels/backend_factory.h); in builds without CUDA, dmoe_backends
// defines MakeCudaExpertBackend as a stub answering FailedPrecondition.
//
// Weights. LoadFfn uploads an FFN once, as bf16 (ComputeType::kBF16, converted
// on the device with round to nearest even, like the CPU backend) or fp32
// (kF32): gate and up fused into one [2 * inter, hidden] matrix, down
// [hidden, inter]. FFNs are spread over the backend's devices round-robin by
// (layer, ffn id): shard (layer + ffn_id + 1) mod #devices. UnloadFfn frees
// them. FP8 e4m3 checkpoints arrive here already dequantised to fp32 by the
// checkpoint reader (FfnWeights carries fp32), so they are held as bf16 too.
//
// A batch (Compute, or Submit + Await):
//   1. the host stages x, offsets, ids and weights in pinned buffers and copies
//      them up (x on a second stream, in chunks, overlapping the routing);
//   2. on the first device: counts, offsets and a stable permutation by FFN
//      (moe_permute.cuh), then the gather of x into that order (in the
//      compute type);
//   3. the host reads back the rows per FFN and the first error (O(FFNs) of
//      data, one synchronisation: cuBLAS needs the GEMM shapes on the host);
//      an error returns here, before anything is written to `out`;
//   4. per device, on its own stream: gate|up GEMMs, fused SwiGLU, down GEMMs
//      (expert_gemm.cuh); other devices get their rows of the gathered x by a
//      peer copy and send their outputs back the same way;
//   5. on the first device: the weighted combine back to token order, in
//      assignment order (moe_combine.cuh), copied down in chunks overlapping
//      the combine; Await copies the pinned result into `out`.
// The host's work per batch is O(1) plus O(FFNs of the layer) plus memcpy of
// the activations through pinned memory; nothing per token or per assignment.
//
// Numerics: fp32 accumulation everywhere. kF32 uses fp32 GEMMs
// (CUBLAS_COMPUTE_32F, no TF32). kBF16 rounds x, the weights and h to bf16;
// with CudaGemmMode::kGrouped the GEMM outputs (gate|up and the FFN output)
// are bf16 too (the grouped call's type combinations), with kPerExpert they
// are fp32 as on the CPU. The combine is the CPU backend's exact sequence of
// fp32 operations. Results are bitwise reproducible for the same batch on the
// same GPU model; unlike the CPU backend a token's result may differ in the
// last bits with the batch it shares (cuBLAS picks GEMM kernels, split-K
// included, by shape).
//
// Thread safety: Compute/Submit/Await from one thread at a time. LoadFfn and
// UnloadFfn may run concurrently with them (LoadsConcurrently() is true): the
// upload happens outside the backend's lock, and an FFN replaced or unloaded
// is freed only after its device finished the work already queued. Queries
// (HasFfn, WeightBytes, MemoryPerDevice, LastTimings) are thread-safe.
#ifndef DMOE_CORE_KERNELS_CUDA_CUDA_EXPERT_BACKEND_H_
#define DMOE_CORE_KERNELS_CUDA_CUDA_EXPERT_BACKEND_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "core/expert_backend.h"

namespace dmoe::core {

// How the per-expert GEMMs of a batch are issued (expert_gemm.cuh).
enum class CudaGemmMode {
  kGrouped,    // one cublasGemmGroupedBatchedEx per projection
  kPerExpert,  // one cublasGemmEx per expert and projection
};

struct CudaBackendOptions {
  // CUDA device ordinals; empty = every visible device. An ordinal may repeat:
  // each entry is one shard (a testing aid for the multi-device path on one
  // GPU). The first entry does the routing and the combine.
  std::vector<int> devices;
  CudaGemmMode gemm = CudaGemmMode::kGrouped;
  // Record CUDA events around each batch and its GEMMs (LastTimings).
  bool record_timings = false;
};

class CudaExpertBackend : public ExpertBackend {
 public:
  struct DeviceMemory {
    int device = 0;              // CUDA ordinal
    size_t weight_bytes = 0;     // resident FFN weights on this shard
    size_t workspace_bytes = 0;  // batch workspaces (grow-only)
    size_t free_bytes = 0;       // cudaMemGetInfo
    size_t total_bytes = 0;
  };
  // One entry per shard (options.devices order).
  virtual std::vector<DeviceMemory> MemoryPerDevice() const = 0;

  struct Timings {
    double batch_ms = 0;  // first upload to last download, on the devices
    double gemm_ms = 0;   // gate|up GEMMs + SwiGLU + down GEMMs (slowest shard)
    int64_t rows = 0;     // assignments computed
  };
  // Of the last batch awaited, with record_timings; zeros otherwise.
  virtual Timings LastTimings() const = 0;
  // The shard index that holds or would hold (layer, ffn_id).
  virtual int ShardOf(int32_t layer, int32_t ffn_id) const = 0;
  virtual int num_shards() const = 0;
};

// FailedPrecondition "no CUDA device" when none is visible (or no driver),
// InvalidArgument for a device ordinal out of range; CUDA/cuBLAS errors while
// creating streams and handles otherwise.
absl::StatusOr<std::unique_ptr<CudaExpertBackend>> MakeCudaExpertBackend(
    ComputeType type, CudaBackendOptions options = {});

}  // namespace dmoe::core

#endif  // DMOE_CORE_KERNELS_CUDA_CUDA_EXPERT_BACKEND_H_
