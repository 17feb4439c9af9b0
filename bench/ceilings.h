// The host's ceilings that benchmarks report ratios to, measured in the same
// run as the numbers they judge (moe_layer_bench, serve_bench).
//
// Contract:
//   HostCeilings(type)   allocates a 1 GiB probe buffer (2 MiB-aligned, advised
//                        for huge pages as the packed weights are) and a
//                        2048 x 2048 PackedLinear of `type` (the best dense GEMM
//                        oneDNN has here, batch-invariant or not).
//   ReadGBs(threads, reps)   GB/s of `threads` OpenMP readers summing the probe
//                        (AVX-512, AVX2 or portable loads), best of `reps`.
//   GemmGflops(reps)     GFLOP/s of a 2048^3 GEMM through the PackedLinear,
//                        best of `reps` (threads: the process's OpenMP setting).
//   FmaGflops(threads, reps)   peak f32 multiply-add GFLOP/s of `threads`
//                        OpenMP threads at the active ISA level (register-only
//                        FMA chains; SSE2: multiply + add), best of `reps`: the
//                        compute ceiling of kernels whose arithmetic is f32 FMA
//                        (bf16 weights below AVX512_BF16 are widened to f32).
//   Bf16DotGflops(threads, reps)   peak vdpbf16ps GFLOP/s (register-only
//                        chains) where the active level has AVX512_BF16, else
//                        0: the compute ceiling of the native bf16 kernel.
//   FreeProbe()          gives the 1 GiB back (ReadGBs must not be called after).
#ifndef DMOE_BENCH_CEILINGS_H_
#define DMOE_BENCH_CEILINGS_H_

#include <cstdint>
#include <vector>

#include "core/kernels/cpu/linear.h"

namespace dmoe::bench {

class HostCeilings {
 public:
  explicit HostCeilings(core::ComputeType type);
  ~HostCeilings() { FreeProbe(); }
  HostCeilings(const HostCeilings&) = delete;
  HostCeilings& operator=(const HostCeilings&) = delete;

  void FreeProbe();
  double ReadGBs(int threads, int reps);
  double GemmGflops(int reps);
  double FmaGflops(int threads, int reps);
  double Bf16DotGflops(int threads, int reps);

 private:
  static constexpr size_t kProbeBytes = size_t{1} << 30;
  static constexpr int64_t kGemmN = 2048;
  float* probe_ = nullptr;
  core::PackedLinear gemm_;
  std::vector<float> x_, y_;
};

}  // namespace dmoe::bench

#endif  // DMOE_BENCH_CEILINGS_H_
