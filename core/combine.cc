#include "core/combine.h"

#include <algorithm>

namespace dmoe::core {

void SumAssignmentRows(std::span<const int32_t> token_offsets, std::span<const float* const> rows,
                       int64_t hidden, float* out) {
  const int64_t tokens = static_cast<int64_t>(token_offsets.size()) - 1;
  for (int64_t t = 0; t < tokens; ++t) {
    float* o = out + t * hidden;
    const int32_t begin = token_offsets[t], end = token_offsets[t + 1];
    if (begin == end) {
      std::fill(o, o + hidden, 0.0f);
      continue;
    }
    std::copy(rows[begin], rows[begin] + hidden, o);
    for (int32_t a = begin + 1; a < end; ++a) {
      const float* c = rows[a];
      for (int64_t j = 0; j < hidden; ++j) o[j] = o[j] + c[j];
    }
  }
}

void AddToResidual(std::span<float> residual, std::span<const float> ffn_out) {
  const size_t n = std::min(residual.size(), ffn_out.size());
  for (size_t i = 0; i < n; ++i) residual[i] += ffn_out[i];
}

void CountExpertLoad(const GateResult& routing, std::span<int64_t> load) {
  for (int32_t e : routing.experts) ++load[e];
}

}  // namespace dmoe::core
