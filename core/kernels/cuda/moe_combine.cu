#include "core/kernels/cuda/moe_combine.cuh"

namespace dmoe::core::cuda {
namespace {

__device__ float ToFloat(float f) { return f; }
__device__ float ToFloat(__nv_bfloat16 f) { return __bfloat162float(f); }

template <typename T>
__global__ void CombineKernel(const T* yp, const int32_t* token_offsets,
                              const int32_t* assignment_to_permuted, const float* weights,
                              int64_t token_begin, int64_t hidden, float* out) {
  const int64_t t = token_begin + blockIdx.x;
  const int32_t begin = token_offsets[t], end = token_offsets[t + 1];
  float* o = out + t * hidden;
  for (int64_t j = threadIdx.x; j < hidden; j += blockDim.x) {
    float acc = 0.0f;
    if (begin < end) {
      // __fmul_rn / __fadd_rn: never contracted into an FMA.
      acc = __fmul_rn(weights[begin],
                      ToFloat(yp[int64_t{assignment_to_permuted[begin]} * hidden + j]));
      for (int32_t a = begin + 1; a < end; ++a) {
        acc = __fadd_rn(
            acc,
            __fmul_rn(weights[a], ToFloat(yp[int64_t{assignment_to_permuted[a]} * hidden + j])));
      }
    }
    o[j] = acc;
  }
}

}  // namespace

template <typename T>
cudaError_t LaunchMoeCombine(const T* yp, const int32_t* token_offsets,
                             const int32_t* assignment_to_permuted, const float* weights,
                             int64_t token_begin, int64_t token_end, int64_t hidden, float* out,
                             cudaStream_t stream) {
  if (token_end <= token_begin) return cudaSuccess;
  const int threads = hidden >= 1024 ? 256 : 128;
  CombineKernel<T><<<static_cast<unsigned>(token_end - token_begin), threads, 0, stream>>>(
      yp, token_offsets, assignment_to_permuted, weights, token_begin, hidden, out);
  return cudaGetLastError();
}

template cudaError_t LaunchMoeCombine<float>(const float*, const int32_t*, const int32_t*,
                                             const float*, int64_t, int64_t, int64_t, float*,
                                             cudaStream_t);
template cudaError_t LaunchMoeCombine<__nv_bfloat16>(const __nv_bfloat16*, const int32_t*,
                                                     const int32_t*, const float*, int64_t, int64_t,
                                                     int64_t, float*, cudaStream_t);

}  // namespace dmoe::core::cuda
