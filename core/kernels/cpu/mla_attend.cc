#include "core/kernels/cpu/mla_attend.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/kernels/cpu/gemm.h"

namespace dmoe::core {
namespace {

struct Scratch {
  std::vector<float> packed_q, scores, probs, tail;
  float* Get(std::vector<float>& v, size_t n) {
    if (v.size() < n) v.resize(n);
    return v.data();
  }
};
thread_local Scratch t_scratch;

// Splits [0, n) into `parts` near-equal ranges; range i.
inline void Range(int64_t n, int parts, int i, int64_t* b, int64_t* e) {
  *b = n * i / parts;
  *e = n * (i + 1) / parts;
}

// Runs body(i, parts) for i < parts on the OpenMP team, or once on this thread.
template <typename F>
void Split(bool parallel, const F& body) {
  if (parallel && !omp_in_parallel() && omp_get_max_threads() > 1) {
#pragma omp parallel
    body(omp_get_thread_num(), omp_get_num_threads());
  } else {
    body(0, 1);
  }
}

}  // namespace

void SoftmaxInPlace(float* s, int64_t n) {
  float mx = s[0];
  for (int64_t i = 1; i < n; ++i) mx = std::max(mx, s[i]);
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    s[i] = std::exp(s[i] - mx);
    sum += s[i];
  }
  const float inv = static_cast<float>(1.0 / sum);
  for (int64_t i = 0; i < n; ++i) s[i] *= inv;
}

void MlaAttendToken(const MlaAttendShape& shape, const float* q,
                    std::span<const float* const> blocks, int64_t block_tokens, int64_t len,
                    float* ctx, int64_t ldctx, bool parallel) {
  const int64_t H = shape.heads, rank = shape.rank, width = shape.width, B = block_tokens;
  if (H <= 0 || len <= 0 || B <= 0) return;
  const int64_t nblocks = (len + B - 1) / B;
  const gemm::Fn run = gemm::Best();
  Scratch& s = t_scratch;
  // Queries as the GEMM's packed "weights": scores^T [len, H] = cache · q^T.
  float* packed_q = s.Get(s.packed_q, gemm::PackedElems(H, width));
  gemm::PackF32(q, H, width, packed_q);
  float* st = s.Get(s.scores, static_cast<size_t>(len * H));
  float* probs = s.Get(s.probs, static_cast<size_t>(H * len));
  auto rows_of = [&](int64_t i) { return std::min(B, len - i * B); };
  // c_kv columns past the last whole panel, copied into one zero-padded panel
  // (only for a rank that is not a multiple of 16).
  const int64_t full = rank / gemm::kPanel * gemm::kPanel, tail = rank - full;
  float* tail_panel = nullptr;
  if (tail > 0) {
    tail_panel = s.Get(s.tail, static_cast<size_t>(len * gemm::kPanel));
    for (int64_t j = 0; j < len; ++j) {
      float* dst = tail_panel + j * gemm::kPanel;
      std::memcpy(dst, blocks[j / B] + (j % B) * width + full, tail * sizeof(float));
      std::fill(dst + tail, dst + gemm::kPanel, 0.0f);
    }
  }
  const int64_t full_panels = full / gemm::kPanel;
  const int64_t ctx_parts = full_panels + (tail > 0 ? 1 : 0);
  Split(parallel, [&](int id, int nt) {
    int64_t b, e;
    // Scores: blocks of cache rows split over threads.
    Range(nblocks, nt, id, &b, &e);
    for (int64_t i = b; i < e; ++i) {
      gemm::Args a;
      a.w = packed_q;
      a.n = H;
      a.k = width;
      a.x = blocks[i];
      a.ldx = width;
      a.y = st + i * B * H;
      a.ldy = H;
      a.m = rows_of(i);
      a.panel_end = gemm::NumPanels(H);
      run(a);
    }
    if (nt > 1) {
#pragma omp barrier
    }
    // Softmax per head into probs [H, len].
    Range(H, nt, id, &b, &e);
    for (int64_t h = b; h < e; ++h) {
      float* p = probs + h * len;
      for (int64_t j = 0; j < len; ++j) p[j] = st[j * H + h] * shape.scale;
      SoftmaxInPlace(p, len);
    }
    if (nt > 1) {
#pragma omp barrier
    }
    // Context: ctx [H, rank] = probs · c_kv, c_kv read in place as W^T, one
    // block after another (each output's chain continues across blocks).
    Range(ctx_parts, nt, id, &b, &e);
    const int64_t fe = std::min(e, full_panels);
    if (fe > b) {
      for (int64_t i = 0; i < nblocks; ++i) {
        gemm::Args a;
        a.w = blocks[i];
        a.n = full;
        a.k = rows_of(i);
        a.pstride = gemm::kPanel;
        a.kstride = width;
        a.x = probs + i * B;
        a.ldx = len;
        a.y = ctx;
        a.ldy = ldctx;
        a.m = H;
        a.panel_begin = b;
        a.panel_end = fe;
        a.accumulate = i > 0;
        run(a);
      }
    }
    if (tail > 0 && b <= full_panels && full_panels < e) {
      gemm::Args a;
      a.w = tail_panel;
      a.n = tail;
      a.k = len;
      a.x = probs;
      a.ldx = len;
      a.y = ctx + full;
      a.ldy = ldctx;
      a.m = H;
      a.panel_end = 1;
      run(a);
    }
  });
}

}  // namespace dmoe::core
