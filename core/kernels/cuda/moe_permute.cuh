// MoE permute on the GPU: from a batch's token-major ("CSR") assignments to
// the permuted order (rows grouped by FFN), and the gather of the activations
// into that order. Host launchers only; the kernels are in moe_permute.cu.
//
// Names (TensorRT-LLM style): A = assignments, N = tokens, S = FFN slots of the
// layer (slot = ffn id + 1, slot 0 = shared FFN), G = groups (the FFNs the
// host numbered for this batch). Group G is the bucket of invalid assignments
// (id out of range, FFN not loaded, hidden mismatch): they get permuted rows
// too, after every valid row, so every index the kernels write stays in range
// whatever the input, and the host reports the first of them as the error.
//
// Determinism: counts come from integer atomics (order-free), ranks inside a
// group follow assignment order (a stable counting sort), so the permutation
// is a function of the batch alone.
#ifndef DMOE_CORE_KERNELS_CUDA_MOE_PERMUTE_CUH_
#define DMOE_CORE_KERNELS_CUDA_MOE_PERMUTE_CUH_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace dmoe::core::cuda {

// Value of an error field of the summary when there is no error (a memset
// byte pattern, larger than any index).
inline constexpr int32_t kNoError = 0x7f7f7f7f;

// Summary layout, [kSummaryCounts + G] int32, copied to the host after routing:
inline constexpr int kSummaryBadToken = 0;       // first t with off[t+1] < off[t]
inline constexpr int kSummaryBadAssignment = 1;  // first a in the invalid bucket
inline constexpr int kSummaryCounts = 2;         // then rows of each group [G]

struct MoeRoutingBuffers {
  const int32_t* token_offsets = nullptr;  // [N + 1]
  const int32_t* ffn_ids = nullptr;        // [A]
  // [S] group of the FFN in slot s, or < 0 when it cannot take assignments
  const int32_t* slot_to_group = nullptr;
  int32_t* assignment_to_group = nullptr;  // [A] in [0, G]
  // [tiles, G + 1] rows per (tile, group), then the first permuted row of each
  int32_t* tile_group_offset = nullptr;
  int32_t* expert_first_offset = nullptr;     // [G + 2]; [G + 1] = A
  int32_t* permuted_to_token = nullptr;       // [A]
  int32_t* assignment_to_permuted = nullptr;  // [A]
  int32_t* summary = nullptr;                 // [kSummaryCounts + G]
};

// Number of tiles (of the kernels' 1024 assignments) for A assignments, >= 1.
int64_t MoeRoutingTiles(int64_t num_assignments);

// Counts, offsets and the stable permutation (3 kernels + a memset). Needs
// N >= 1 and 0 <= A < 2^31 - 1; token_offsets[0] == 0 and token_offsets[N] == A
// are the host's to check (they are O(1)); monotonicity is checked here.
cudaError_t LaunchMoeRouting(const MoeRoutingBuffers& b, int64_t num_tokens,
                             int32_t num_assignments, int32_t num_slots, int32_t num_groups,
                             cudaStream_t stream);

// xp[p, :] = T(x[permuted_to_token[p], :]) for p in [0, rows): x [N, hidden]
// float32, xp [rows, hidden]. T is float or __nv_bfloat16 (round to nearest
// even).
template <typename T>
cudaError_t LaunchMoeGather(const float* x, int64_t hidden, const int32_t* permuted_to_token,
                            int32_t rows, T* xp, cudaStream_t stream);

}  // namespace dmoe::core::cuda

#endif  // DMOE_CORE_KERNELS_CUDA_MOE_PERMUTE_CUH_
