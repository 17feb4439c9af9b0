// cuBLAS is column-major. W, stored row-major [out, in], is column-major an
// [in, out] matrix with ld = in; x row-major [rows, ldx] is column-major
// [in, rows] with ld = ldx; y likewise [out, rows] with ld = ldy. So
//   y = op_T(W) · op_N(x):  m = out, n = rows, k = in.
#include "core/kernels/cuda/expert_gemm.cuh"

namespace dmoe::core::cuda {

void ExpertGemmRunner::FillPointerArray(std::span<const ExpertGemm> problems, const void** image) {
  const size_t n = problems.size();
  for (size_t i = 0; i < n; ++i) {
    image[i] = problems[i].w;
    image[n + i] = problems[i].x;
    image[2 * n + i] = problems[i].y;
  }
}

cublasStatus_t ExpertGemmRunner::Run(cublasHandle_t handle, bool grouped, GemmTypes types,
                                     std::span<const ExpertGemm> problems,
                                     const void* const* device_pointers) {
  const size_t n = problems.size();
  if (n == 0) return CUBLAS_STATUS_SUCCESS;
  const float one = 1.0f, zero = 0.0f;
  if (!grouped) {
    for (const ExpertGemm& p : problems) {
      if (p.rows == 0) continue;
      const cublasStatus_t s = cublasGemmEx(
          handle, CUBLAS_OP_T, CUBLAS_OP_N, p.out, p.rows, p.in, &one, p.w, types.in, p.in, p.x,
          types.in, p.ldx, &zero, p.y, types.out, p.ldy, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
      if (s != CUBLAS_STATUS_SUCCESS) return s;
    }
    return CUBLAS_STATUS_SUCCESS;
  }
  // One group per problem (group_size 1): the problems differ in rows.
  trans_a_.assign(n, CUBLAS_OP_T);
  trans_b_.assign(n, CUBLAS_OP_N);
  m_.resize(n);
  n_.resize(n);
  k_.resize(n);
  lda_.resize(n);
  ldb_.resize(n);
  ldc_.resize(n);
  group_size_.assign(n, 1);
  alpha_.assign(n, 1.0f);
  beta_.assign(n, 0.0f);
  for (size_t i = 0; i < n; ++i) {
    const ExpertGemm& p = problems[i];
    m_[i] = p.out;
    n_[i] = p.rows;
    k_[i] = p.in;
    lda_[i] = p.in;
    ldb_[i] = p.ldx;
    ldc_[i] = p.ldy;
  }
  const void* const* a = device_pointers;
  const void* const* b = device_pointers + n;
  void* const* c = const_cast<void* const*>(device_pointers + 2 * n);
  return cublasGemmGroupedBatchedEx(handle, trans_a_.data(), trans_b_.data(), m_.data(), n_.data(),
                                    k_.data(), alpha_.data(), a, types.in, lda_.data(), b, types.in,
                                    ldb_.data(), beta_.data(), c, types.out, ldc_.data(),
                                    static_cast<int>(n), group_size_.data(), CUBLAS_COMPUTE_32F);
}

}  // namespace dmoe::core::cuda
