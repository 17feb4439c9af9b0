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
#include <span>

namespace dmoe::core {

// Softmax over s[0..n) in place (n >= 1): max-subtracted, the sum in double,
// then one multiply by its f32 inverse. Shared by MLA and MHA attention.
void SoftmaxInPlace(float* s, int64_t n);

struct MlaAttendShape {
  int64_t heads = 0;
  int64_t rank = 0;   // c_kv width (kv_lora_rank)
  int64_t width = 0;  // cache row: rank + rope dim
  float scale = 1.0f;
};

// q: [heads, width] dense. The cache is read where it lies, in blocks of
// `block_tokens` rows: blocks[i] holds positions [i * block_tokens, (i + 1) *
// block_tokens) as dense [block_tokens, width] rows (the last block may be
// partly filled); len >= 1 positions are attended to, so blocks must hold at
// least ceil(len / block_tokens) pointers. The bits do not depend on
// block_tokens. ctx: [heads, rank] with row stride ldctx. `parallel` splits the
// work over the process's OpenMP team (call it from outside a parallel
// region); otherwise it runs on the calling thread. Both give the same bits.
void MlaAttendToken(const MlaAttendShape& shape, const float* q,
                    std::span<const float* const> blocks, int64_t block_tokens, int64_t len,
                    float* ctx, int64_t ldctx, bool parallel);

}  // namespace dmoe::core

#endif  // DMOE_CORE_KERNELS_CPU_MLA_ATTEND_H_
