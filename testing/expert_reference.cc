#include "testing/expert_reference.h"

#include <algorithm>
#include <cmath>

#include "core/dtype.h"
#include "gtest/gtest.h"

namespace dmoe::testing {

namespace {

float RoundBF16(float f) { return core::BF16ToF32(core::F32ToBF16(f)); }

// [rows, cols] dequantised as the int8 kernels see it, written independently
// of them: per row scale = max |w| / 127 (1 for an all-zero row), q = round(w
// / scale).
std::vector<float> DequantRows(const std::vector<float>& w, int64_t rows, int64_t cols) {
  std::vector<float> out(w.size());
  for (int64_t r = 0; r < rows; ++r) {
    float amax = 0;
    for (int64_t c = 0; c < cols; ++c) amax = std::max(amax, std::fabs(w[r * cols + c]));
    const float s = amax > 0 ? amax / 127.0f : 1.0f;
    for (int64_t c = 0; c < cols; ++c) {
      // q * scale rounded to f32 (2^-24 relative, far inside the bound).
      out[r * cols + c] = static_cast<float>(double{std::round(w[r * cols + c] / s)} * s);
    }
  }
  return out;
}

}  // namespace

RefOut FfnSumReference(const float* x, int64_t hidden, const std::vector<int32_t>& ids,
                       const std::vector<float>& ws, const std::map<int32_t, HostFfn>& ffns,
                       core::ComputeType type) {
  // bf16 and int8 round x and h to bf16; bf16 rounds the weights too, int8
  // quantises them (DequantRows).
  const bool int8 = type == core::ComputeType::kInt8;
  const bool bf16 = type == core::ComputeType::kBF16 || int8;
  auto v = [&](float f) { return double{bf16 ? RoundBF16(f) : f}; };
  auto wv = [&](float f) { return int8 ? double{f} : v(f); };
  RefOut r;
  r.y.assign(hidden, 0.0);
  r.scale.assign(hidden, 0.0);
  r.flip.assign(hidden, 0.0);
  for (size_t a = 0; a < ids.size(); ++a) {
    const HostFfn& f0 = ffns.at(ids[a]);
    HostFfn quantised;
    if (int8) {
      quantised = f0;
      quantised.gate = DequantRows(f0.gate, f0.inter, hidden);
      quantised.up = DequantRows(f0.up, f0.inter, hidden);
      quantised.down = DequantRows(f0.down, hidden, f0.inter);
    }
    const HostFfn& f = int8 ? quantised : f0;
    const double w = ws[a];
    std::vector<double> h(f.inter), hs(f.inter);
    for (int64_t i = 0; i < f.inter; ++i) {
      double g = 0, u = 0, sg = 0, su = 0;
      for (int64_t k = 0; k < hidden; ++k) {
        const double xk = v(x[k]);
        g += xk * wv(f.gate[i * hidden + k]);
        u += xk * wv(f.up[i * hidden + k]);
        sg += std::fabs(xk * wv(f.gate[i * hidden + k]));
        su += std::fabs(xk * wv(f.up[i * hidden + k]));
      }
      const double silu = g / (1.0 + std::exp(-g));
      h[i] = silu * u;
      if (bf16) h[i] = RoundBF16(static_cast<float>(h[i]));
      // |d silu / dg| <= 1.1: errors in g and u reach h scaled like this.
      hs[i] = std::fabs(h[i]) + 1.1 * std::fabs(u) * sg + std::fabs(silu) * su;
    }
    for (int64_t j = 0; j < hidden; ++j) {
      double acc = 0, sc = 0, mx = 0;
      for (int64_t i = 0; i < f.inter; ++i) {
        const double d = wv(f.down[j * f.inter + i]);
        acc += d * h[i];
        sc += std::fabs(d) * hs[i];
        mx = std::max(mx, std::fabs(d * h[i]));
      }
      r.y[j] += w * acc;
      r.scale[j] += std::fabs(w) * sc;
      r.flip[j] += bf16 ? std::fabs(w) * 2.0 * std::ldexp(mx, -8) : 0.0;
    }
  }
  return r;
}

void ExpectMatchesReference(const HostBatch& b, const std::vector<float>& out,
                            const std::map<int32_t, HostFfn>& ffns, core::ComputeType type,
                            double extra_rel) {
  int bad = 0;
  for (int64_t t = 0; t < b.tokens() && bad < 5; ++t) {
    const std::vector<int32_t> ids(b.ids.begin() + b.offsets[t], b.ids.begin() + b.offsets[t + 1]);
    const std::vector<float> ws(b.weights.begin() + b.offsets[t],
                                b.weights.begin() + b.offsets[t + 1]);
    const RefOut ref = FfnSumReference(b.x.data() + t * b.hidden, b.hidden, ids, ws, ffns, type);
    double row_max = 0;
    for (double y : ref.y) row_max = std::max(row_max, std::fabs(y));
    for (int64_t j = 0; j < b.hidden && bad < 5; ++j) {
      const double got = out[t * b.hidden + j];
      const double tol = 1e-5 * ref.scale[j] + ref.flip[j] + extra_rel * row_max;
      if (!(std::fabs(got - ref.y[j]) <= tol)) {
        ADD_FAILURE() << "token " << t << " out[" << j << "] = " << got << ", expected " << ref.y[j]
                      << " +- " << tol;
        ++bad;
      }
    }
  }
}

}  // namespace dmoe::testing
