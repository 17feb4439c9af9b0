// The float64 reference every expert-backend test compares against, with an
// error bound per output rather than one tolerance for all.
//
// Contract:
//   FfnSumReference(x, hidden, ids, weights, ffns, type)
//     one token's y = sum_a w_a * down(silu(gate x) * up x) in float64, on the
//     values a backend of `type` sees (bf16-rounded inputs, weights and h for
//     kBF16; for kInt8 bf16-rounded inputs and h and the weights quantised
//     per row as gemm.h's PackInt8 does), with two bounds per output j:
//     - scale[j]: sum_a |w_a| sum_i |down_ji| (|h_i| + 1.1 |u_i| sum_k |x_k g_ik|
//       + |silu(g_i)| sum_k |x_k up_ik|): the sums that fp32 accumulation
//       errors (~sqrt(n) 2^-24 of them, < 1e-6 here) and the ~1 ulp exp scale
//       with, propagated to the output. 1e-5 of it leaves a 10x margin yet
//       fails on any bf16-sized (2^-9) error;
//     - flip[j]: kBF16/kInt8 round h to bf16 from fp32, the reference from float64;
//       where the two straddle a rounding boundary h_i moves by one bf16 ulp
//       (2^-8 relative). Two such flips per assignment are allowed:
//       sum_a |w_a| * 2 * 2^-8 * max_i |down_ji h_i|.
//   ExpectMatchesReference(batch, out, ffns, type, extra_rel = 0)
//     a test failure (up to 5 named outputs) wherever out[t][j] is farther
//     than 1e-5 * scale + flip + extra_rel * max_j |y_j| from the reference
//     (a token without assignments must be exact zeros); `ffns` maps every
//     FFN id the batch uses to its weights.
#ifndef DMOE_TESTING_EXPERT_REFERENCE_H_
#define DMOE_TESTING_EXPERT_REFERENCE_H_

#include <cstdint>
#include <map>
#include <vector>

#include "core/kernels/cpu/linear.h"
#include "testing/expert_batch.h"

namespace dmoe::testing {

struct RefOut {
  std::vector<double> y, scale, flip;
};

RefOut FfnSumReference(const float* x, int64_t hidden, const std::vector<int32_t>& ids,
                       const std::vector<float>& ws, const std::map<int32_t, HostFfn>& ffns,
                       core::ComputeType type);

void ExpectMatchesReference(const HostBatch& b, const std::vector<float>& out,
                            const std::map<int32_t, HostFfn>& ffns, core::ComputeType type,
                            double extra_rel = 0.0);

}  // namespace dmoe::testing

#endif  // DMOE_TESTING_EXPERT_REFERENCE_H_
