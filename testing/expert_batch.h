// Random inputs for the expert-backend tests (CPU, CUDA, remote): FFN weights
// and token batches in the backends' CSR form (core::ExpertBatch), owning
// their arrays.
//
// Contract:
//   Uniform(n, scale, rng)     n floats uniform in [-scale, scale), drawn from
//                              *rng in order.
//   HostFfn / RandomFfn        one FFN's gate, up ([inter, hidden]) and down
//                              ([hidden, inter]) weights, uniform and scaled
//                              by 2/sqrt(fan-in) so that the FFN's outputs are
//                              O(1) for O(1) inputs; RandomFfn draws gate, up,
//                              down in that order from mt19937(seed).
//   HostBatch                  a batch of `layer`: x [tokens, hidden] and, per
//                              token t, the FFN ids and weights at
//                              [offsets[t], offsets[t + 1]). AddToken appends
//                              one token; View() points into the arrays (valid
//                              while the HostBatch lives and is not changed).
//   RandomBatch(spec, tokens, seed)
//                              `tokens` tokens drawn from mt19937(seed), token
//                              by token: its routed experts (distinct, from
//                              [0, spec.num_experts), exactly spec.top_k or,
//                              with spec.variable_k, 0..top_k of them), the
//                              shared FFN (core::kSharedFfn) per spec.shared,
//                              one weight per FFN uniform in [min_weight,
//                              max_weight) (the shared FFN's is 1 with
//                              kAlways), then its activations, uniform in
//                              [-1, 1). The same spec, tokens and seed give the
//                              same batch, bit for bit.
#ifndef DMOE_TESTING_EXPERT_BATCH_H_
#define DMOE_TESTING_EXPERT_BATCH_H_

#include <cstdint>
#include <random>
#include <vector>

#include "core/expert_backend.h"

namespace dmoe::testing {

std::vector<float> Uniform(size_t n, float scale, std::mt19937* rng);

struct HostFfn {
  int64_t hidden = 0, inter = 0;
  std::vector<float> gate{}, up{}, down{};  // [inter, hidden] x2, [hidden, inter]
  core::FfnWeights View() const { return core::FfnWeights{hidden, inter, gate, up, down}; }
};

HostFfn RandomFfn(int64_t hidden, int64_t inter, uint32_t seed);

struct HostBatch {
  int32_t layer = 0;
  int64_t hidden = 0;
  std::vector<float> x{};  // [tokens, hidden]
  std::vector<int32_t> offsets{0};
  std::vector<int32_t> ids{};
  std::vector<float> weights{};

  int64_t tokens() const { return static_cast<int64_t>(offsets.size()) - 1; }
  void AddToken(const std::vector<float>& xt, const std::vector<int32_t>& ffns,
                const std::vector<float>& ws);
  core::ExpertBatch View() const { return View(layer); }
  // The same tokens as a batch of another layer.
  core::ExpertBatch View(int32_t other_layer) const {
    return core::ExpertBatch{other_layer, tokens(), hidden, x.data(), offsets, ids, weights};
  }
};

// Where the shared FFN goes in each token of a RandomBatch.
enum class SharedFfn {
  kNone,    // never
  kAlways,  // every token, last, weight 1
  kMostly,  // 7 in 8 tokens on average, at a random place, random weight
};

struct RandomBatchSpec {
  int32_t layer = 0;
  int64_t hidden = 0;
  int num_experts = 0;      // routed experts come from [0, num_experts)
  int top_k = 0;            // routed experts per token (at most num_experts)
  bool variable_k = false;  // 0..top_k per token, uniformly, instead
  SharedFfn shared = SharedFfn::kAlways;
  float min_weight = -1.0f, max_weight = 1.0f;
};

HostBatch RandomBatch(const RandomBatchSpec& spec, int64_t tokens, uint32_t seed);

}  // namespace dmoe::testing

#endif  // DMOE_TESTING_EXPERT_BATCH_H_
