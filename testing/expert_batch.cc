#include "testing/expert_batch.h"

#include <algorithm>
#include <cmath>

namespace dmoe::testing {

std::vector<float> Uniform(size_t n, float scale, std::mt19937* rng) {
  std::uniform_real_distribution<float> dist(-scale, scale);
  std::vector<float> v(n);
  for (float& f : v) f = dist(*rng);
  return v;
}

HostFfn RandomFfn(int64_t hidden, int64_t inter, uint32_t seed) {
  std::mt19937 rng(seed);
  HostFfn f;
  f.hidden = hidden;
  f.inter = inter;
  f.gate = Uniform(inter * hidden, 2.0f / std::sqrt(float(hidden)), &rng);
  f.up = Uniform(inter * hidden, 2.0f / std::sqrt(float(hidden)), &rng);
  f.down = Uniform(hidden * inter, 2.0f / std::sqrt(float(inter)), &rng);
  return f;
}

void HostBatch::AddToken(const std::vector<float>& xt, const std::vector<int32_t>& ffns,
                         const std::vector<float>& ws) {
  x.insert(x.end(), xt.begin(), xt.end());
  ids.insert(ids.end(), ffns.begin(), ffns.end());
  weights.insert(weights.end(), ws.begin(), ws.end());
  offsets.push_back(static_cast<int32_t>(ids.size()));
}

HostBatch RandomBatch(const RandomBatchSpec& spec, int64_t tokens, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> weight(spec.min_weight, spec.max_weight);
  HostBatch b;
  b.layer = spec.layer;
  b.hidden = spec.hidden;
  for (int64_t t = 0; t < tokens; ++t) {
    const int k =
        std::min(spec.variable_k ? static_cast<int>(rng() % (spec.top_k + 1)) : spec.top_k,
                 spec.num_experts);
    std::vector<int32_t> ids;
    while (static_cast<int>(ids.size()) < k) {
      const int32_t e = static_cast<int32_t>(rng() % spec.num_experts);
      if (std::find(ids.begin(), ids.end(), e) == ids.end()) ids.push_back(e);
    }
    switch (spec.shared) {
      case SharedFfn::kNone:
        break;
      case SharedFfn::kAlways:
        ids.push_back(core::kSharedFfn);
        break;
      case SharedFfn::kMostly:
        if (rng() % 8 != 0) ids.insert(ids.begin() + rng() % (ids.size() + 1), core::kSharedFfn);
        break;
    }
    std::vector<float> ws(ids.size());
    for (float& w : ws) w = weight(rng);
    if (spec.shared == SharedFfn::kAlways) ws.back() = 1.0f;
    b.AddToken(Uniform(spec.hidden, 1.0f, &rng), ids, ws);
  }
  return b;
}

}  // namespace dmoe::testing
