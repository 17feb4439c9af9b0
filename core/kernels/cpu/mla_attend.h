// The attention core of MLA in the absorbed form (core/attention.h), for one
// query token over its sequence's compressed cache, on the batch-invariant
// GEMM of gemm.h.
//
// For a token with per-head queries q[h] = [q_c (rank) | q_pe (width - rank)]
// and cache rows c[j] = [c_kv (rank) | k_pe], j < len:
//   s[h, j] = scale * (q[h] . c[j])            one FMA chain over the width
//   p[h, :] = softmax(s[h, :])                 max-subtracted, sum in double
//   ctx[h, :] = sum_j p[h, j] * c_kv[j]        one FMA chain over j = 0..len-1
// Every value's chain depends only on the width and len, never on the other
// tokens, the thread count or how the work is split, so a token's bits do not
// depend on its batch; the AVX2 and AVX-512 levels give the same bits (the
// generic level has no FMA and rounds products separately).
//
// Thread safety: reentrant; scratch is per thread.
#ifndef DMOE_CORE_KERNELS_CPU_MLA_ATTEND_H_
#define DMOE_CORE_KERNELS_CPU_MLA_ATTEND_H_

#include <cstdint>

namespace dmoe::core {

struct MlaAttendShape {
  int64_t heads = 0;
  int64_t rank = 0;   // c_kv width (kv_lora_rank)
  int64_t width = 0;  // cache row: rank + rope dim
  float scale = 1.0f;
};

// q: [heads, width] dense; cache: [len, width] dense (len >= 1); ctx: [heads,
// rank] with row stride ldctx. `parallel` splits the work over the process's
// OpenMP team (call it from outside a parallel region); otherwise it runs on
// the calling thread. Both give the same bits.
void MlaAttendToken(const MlaAttendShape& shape, const float* q, const float* cache, int64_t len,
                    float* ctx, int64_t ldctx, bool parallel);

}  // namespace dmoe::core

#endif  // DMOE_CORE_KERNELS_CPU_MLA_ATTEND_H_
