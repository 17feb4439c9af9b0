#include "core/kernels/cuda/swiglu.cuh"

namespace dmoe::core::cuda {
namespace {

__device__ float ToFloat(float f) { return f; }
__device__ float ToFloat(__nv_bfloat16 f) { return __bfloat162float(f); }

template <typename T>
__device__ T FromFloat(float f);
template <>
__device__ float FromFloat<float>(float f) {
  return f;
}
template <>
__device__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float f) {
  return __float2bfloat16_rn(f);
}

// One block per row; the row's group by binary search over group_first_row.
template <typename In, typename Out>
__global__ void SwiGluKernel(const In* gu, int64_t ld_gu, Out* h, int64_t ld_h,
                             const int32_t* group_first_row, const int32_t* group_inter,
                             int32_t groups) {
  const int32_t r = blockIdx.x;
  int32_t lo = 0, hi = groups - 1;  // last group with first row <= r
  while (lo < hi) {
    const int32_t mid = lo + (hi - lo + 1) / 2;
    if (group_first_row[mid] <= r) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int64_t inter = group_inter[lo];
  const In* row = gu + int64_t{r} * ld_gu;
  Out* out = h + int64_t{r} * ld_h;
  for (int64_t j = threadIdx.x; j < inter; j += blockDim.x) {
    const float g = ToFloat(row[j]);
    const float u = ToFloat(row[inter + j]);
    // Same expression as the CPU backend: g / (1 + exp(-g)) * u.
    out[j] = FromFloat<Out>(g / (1.0f + expf(-g)) * u);
  }
}

}  // namespace

template <typename In, typename Out>
cudaError_t LaunchSwiGlu(const In* gu, int64_t ld_gu, Out* h, int64_t ld_h, int32_t rows,
                         const int32_t* group_first_row, const int32_t* group_inter, int32_t groups,
                         cudaStream_t stream) {
  if (rows <= 0 || groups <= 0) return cudaSuccess;
  SwiGluKernel<In, Out>
      <<<rows, 256, 0, stream>>>(gu, ld_gu, h, ld_h, group_first_row, group_inter, groups);
  return cudaGetLastError();
}

#define DMOE_INSTANTIATE_SWIGLU(In, Out)                                                 \
  template cudaError_t LaunchSwiGlu<In, Out>(const In*, int64_t, Out*, int64_t, int32_t, \
                                             const int32_t*, const int32_t*, int32_t,    \
                                             cudaStream_t);
DMOE_INSTANTIATE_SWIGLU(float, float)
DMOE_INSTANTIATE_SWIGLU(float, __nv_bfloat16)
DMOE_INSTANTIATE_SWIGLU(__nv_bfloat16, __nv_bfloat16)
#undef DMOE_INSTANTIATE_SWIGLU

}  // namespace dmoe::core::cuda
