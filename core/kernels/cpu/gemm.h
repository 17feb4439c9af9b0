// Batch-invariant GEMM kernels of our own (internal to PackedLinear).
//
// y[m, n] = x[m, k] · W[n, k]^T where every output element is ONE serial chain
// of fused multiply-adds over k = 0, 1, ..., K-1 starting from 0:
//   acc = 0; for k: acc = fma(x[r, k], W[c, k], acc); y[r, c] = acc
// Vector lanes run over output columns, never over k, so the chain - and the
// bits of y[r, c] - do not depend on M, on which rows share a register block,
// on the thread split (threads own whole column panels), or on the vector
// width: the AVX-512 and AVX2 kernels give identical bits. The generic (SSE2)
// kernel has no FMA and rounds the product separately; for bf16 weights and
// bf16-rounded x the product is exact in f32, so there too the bits are the
// same, while for f32 weights they differ in the last place.
//
// Weights are packed once into panels of kPanel columns: panel p holds
// W[p*16 + c, k] at ((p * K) + k) * 16 + c, columns past n zero-padded; the
// generic, AVX2 and AVX-512 levels run it. bf16 weights on AVX-512 hosts are
// packed in k pairs instead (PackBf16Pairs below, RunAvx512Pairs and
// RunAvx512Bf16), which the same chain runs with fewer instructions.
#ifndef DMOE_CORE_KERNELS_CPU_GEMM_H_
#define DMOE_CORE_KERNELS_CPU_GEMM_H_

#include <cstddef>
#include <cstdint>

namespace dmoe::core::gemm {

constexpr int64_t kPanel = 16;

inline int64_t NumPanels(int64_t n) { return (n + kPanel - 1) / kPanel; }
// Elements of a packed [n, k] matrix (either type).
inline size_t PackedElems(int64_t n, int64_t k) {
  return static_cast<size_t>(NumPanels(n) * kPanel * k);
}

// w: [n, k] row-major. out: PackedElems(n, k) elements.
void PackF32(const float* w, int64_t n, int64_t k, float* out);
// int8 weights, symmetric per output channel: scale[c] = max_k |W[c, k]| / 127
// (1 where the row is all zero), q[c, k] = W[c, k] / scale[c] rounded to
// nearest (ties away from zero) - so |q| <= 127 - in the panel layout above
// (int8_t, columns past n zero). scales: NumPanels(n) * kPanel floats, zero
// past n. The kernels compute y[r, c] = (the chain over k of x[r, k] *
// q[c, k]) * scale[c]: the products of bf16 x and int8 q are exact in f32, so
// the chain rounds as the bf16 one does, and the scale is one more rounding.
// Returns false (out and scales untouched) if a weight is not finite.
bool PackInt8(const float* w, int64_t n, int64_t k, int8_t* out, float* scales);
// Rounds to bf16 (nearest even, NaN kept).
void PackBf16(const float* w, int64_t n, int64_t k, uint16_t* out);

// The layout of RunAvx512Bf16 and RunAvx512Pairs (vdpbf16ps multiplies pairs
// of bf16 along k; one 64-byte load widens to 2 k x 16 columns by a mask and
// a shift):
// panel p holds, for each pair j of k (KP = ceil(k / 2) pairs), one 32-bit
// word per column c at ((p * KP) + j) * 32 + 2 * c: W[c, 2j] in its high half
// and W[c, 2j + 1] in its low half. vdpbf16ps adds the high product first and
// then the low one, each rounded to f32 (measured bitwise on Zen 5; Intel's
// definition), so this order makes its chain the FMA chain above: k = 2j
// before 2j + 1. The odd k past an odd K is -0 (adding -0 changes no value,
// not even a -0). Columns past n are zero.
inline int64_t NumPairs(int64_t k) { return (k + 1) / 2; }
inline size_t PackedPairElems(int64_t n, int64_t k) {
  return static_cast<size_t>(NumPanels(n) * kPanel * 2 * NumPairs(k));
}
void PackBf16Pairs(const float* w, int64_t n, int64_t k, uint16_t* out);
// One row of x for RunAvx512Bf16: out[j] = bf16(x[2j]) << 16 | bf16(x[2j+1])
// (rounded to nearest even; the odd element past an odd k is +0).
// NumPairs(k) words.
void PackXPairs(const float* x, int64_t k, uint32_t* out);

struct Args {
  const void* w = nullptr;  // packed, float or uint16_t (bf16) per `bf16`
  bool bf16 = false;
  int64_t n = 0, k = 0;
  // x: [m, k] with row stride ldx; for bf16 weights the values must already be
  // bf16-representable (the caller rounds them).
  const float* x = nullptr;
  int64_t ldx = 0;
  float* y = nullptr;  // [m, n], row stride ldy; only columns < n written
  int64_t ldy = 0;
  int64_t m = 0;
  // Column panels [panel_begin, panel_end) of NumPanels(n) to compute.
  int64_t panel_begin = 0, panel_end = 0;
  // Where W[p*16 + c, k] lives: w + p * pstride + k * kstride + c (elements).
  // 0 means the packed layout above (pstride = k*16, kstride = 16). Any other
  // layout must still hold 16 readable columns per panel (the columns past n
  // of the last panel are read and computed, never stored); e.g. W^T stored
  // row-major as [k, ld] with n % 16 == 0 runs in place with pstride = 16,
  // kstride = ld.
  int64_t pstride = 0, kstride = 0;
  // Each output's chain starts from its value in y instead of 0: running K in
  // parts, one after another, gives the bits of one run over the whole K.
  // Not for int8 weights (their scale multiplies the finished chain).
  bool accumulate = false;
  // int8 weights (PackInt8's layout; `bf16` false) with their per-column
  // scales; x must be bf16-representable as for bf16 weights.
  bool int8 = false;
  const float* scales = nullptr;
  // RunAvx512Bf16 only (bf16 weights in PackBf16Pairs' layout, pstride and
  // kstride 0): x as rows of PackXPairs words, row stride ldxp words; `x`
  // and `ldx` are unused there. (RunAvx512Pairs reads x and ldx.)
  const uint32_t* xpairs = nullptr;
  int64_t ldxp = 0;
};

using Fn = void (*)(const Args&);
// The widest level the active ISA cap allows (core/isa.h), after a probe
// shows the AVX-512 level gives the AVX2 level's bits (defined in linear.cc).
Fn Best();

// One per ISA level; each is compiled for its own target and must only be
// called where the CPU has it (RunAvx512: AVX-512F; RunAvx2: AVX2 + FMA).
void RunAvx512(const Args& a);
void RunAvx2(const Args& a);
// AVX-512F + FMA, bf16 weights in the pair layout above, x as floats (x/ldx,
// bf16-representable): a mask and a shift widen 32 weights, then one FMA per
// k in order - the FMA chain, so the other levels' bits.
void RunAvx512Pairs(const Args& a);
// AVX512_BF16 (vdpbf16ps), bf16 weights in the pair layout above. Where its
// add is the sequential one described there (PackedLinear probes it), the
// bits are the other levels' bits, except that vdpbf16ps reads subnormal
// inputs (|v| < 2^-126, the running sum included) as zero and flushes
// subnormal results to zero (Intel's definition; measured so on Zen 5), which
// no real layer's weights, activations or partial sums come near.
void RunAvx512Bf16(const Args& a);
void RunGeneric(const Args& a);

}  // namespace dmoe::core::gemm

#endif  // DMOE_CORE_KERNELS_CPU_GEMM_H_
