// SwiGLU on the CPU: h[j] = silu(gu[j]) * gu[inter + j], silu(g) = g / (1 +
// exp(-g)), in fp32, with one exp of our own (range reduction to
// [-ln2/2, ln2/2], a degree-6 polynomial with Cephes coefficients, ~1 ulp,
// then an exact scaling by 2^n with a single rounding).
//
// The three levels run the same sequence of IEEE operations (FMAs where the
// formula has them: software fmaf at the generic level), so they give
// identical bits: an expert's output does not depend on whether the server
// runs at the generic, AVX2 or AVX-512 level.
#ifndef DMOE_CORE_KERNELS_CPU_SWIGLU_H_
#define DMOE_CORE_KERNELS_CPU_SWIGLU_H_

#include <cstdint>

namespace dmoe::core {

// gu: [2 * inter] gate then up; h: [inter]. At the level core/isa.h allows.
void SwiGluRow(const float* gu, float* h, int64_t inter);

// The levels, for tests (each only where the CPU has it).
void SwiGluRowGeneric(const float* gu, float* h, int64_t inter);
void SwiGluRowAvx2(const float* gu, float* h, int64_t inter);
void SwiGluRowAvx512(const float* gu, float* h, int64_t inter);

}  // namespace dmoe::core

#endif  // DMOE_CORE_KERNELS_CPU_SWIGLU_H_
