// MoE unpermute: weighted combine of the permuted FFN outputs back to token
// order,
//   out[t, :] = sum over t's assignments a, in assignment order, of
//               weights[a] * yp[assignment_to_permuted[a], :],
// in float32, multiply then add (no FMA), the same sequence of operations as
// the CPU backend's combine. One thread block per token, so no atomics: the
// result is bitwise a function of the token's own rows. A token without
// assignments gets zeros.
#ifndef DMOE_CORE_KERNELS_CUDA_MOE_COMBINE_CUH_
#define DMOE_CORE_KERNELS_CUDA_MOE_COMBINE_CUH_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace dmoe::core::cuda {

// Tokens [token_begin, token_end) of out [N, hidden]. yp: [A, hidden], T is
// float or __nv_bfloat16; token_offsets [N + 1], assignment_to_permuted and
// weights [A], all on the device.
template <typename T>
cudaError_t LaunchMoeCombine(const T* yp, const int32_t* token_offsets,
                             const int32_t* assignment_to_permuted, const float* weights,
                             int64_t token_begin, int64_t token_end, int64_t hidden, float* out,
                             cudaStream_t stream);

}  // namespace dmoe::core::cuda

#endif  // DMOE_CORE_KERNELS_CUDA_MOE_COMBINE_CUH_
