#include "core/attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "core/dtype.h"
#include "core/kernels/cpu/mla_attend.h"
#include "core/status.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace dmoe::core {
namespace {

float Dot(const float* a, const float* b, int64_t n) {
  float acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

void Axpy(float alpha, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

int MaxThreads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}
int ThreadId() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Work (multiply-adds) below which a PackedLinear runs on one thread, and
// from which the attention core of one token splits over the team.
constexpr int64_t kParallelWork = int64_t{1} << 18;

// Runs body(h) for every head: heads in parallel while one head's projection
// (`head_work` multiply-adds) is too small for PackedLinear to thread itself
// (decode), each head threaded inside otherwise. The bits are the same.
template <typename F>
void ForEachHeadImpl(int64_t heads, int64_t head_work, const F& body) {
  if (head_work < kParallelWork) {
#pragma omp parallel for schedule(static) if (heads > 1)
    for (int64_t h = 0; h < heads; ++h) body(h);
  } else {
    for (int64_t h = 0; h < heads; ++h) body(h);
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<Attention>> Attention::Load(const ModelConfig& cfg,
                                                           const Checkpoint& ckpt, int64_t layer,
                                                           ComputeType type,
                                                           const RopeTable* rope) {
  std::unique_ptr<Attention> a(new Attention(cfg, layer, rope));
  const std::string p = absl::StrCat("model.layers.", layer, ".self_attn.");
  const int64_t H = cfg.num_attention_heads, hidden = cfg.hidden_size;
  if (cfg.IsMla()) {
    const int64_t nope = cfg.qk_nope_head_dim, rdim = cfg.qk_rope_head_dim, vdim = cfg.v_head_dim;
    const int64_t rank = cfg.kv_lora_rank, qdim = H * (nope + rdim);
    if (cfg.q_lora_rank > 0) {
      DMOE_ASSIGN_OR_RETURN(a->q_a_proj_,
                            LoadLinear(ckpt, p + "q_a_proj.weight", cfg.q_lora_rank, hidden, type));
      DMOE_ASSIGN_OR_RETURN(a->q_a_norm_,
                            LoadVector(ckpt, p + "q_a_layernorm.weight", cfg.q_lora_rank));
      DMOE_ASSIGN_OR_RETURN(a->q_b_proj_,
                            LoadLinear(ckpt, p + "q_b_proj.weight", qdim, cfg.q_lora_rank, type));
    } else {
      DMOE_ASSIGN_OR_RETURN(a->q_proj_, LoadLinear(ckpt, p + "q_proj.weight", qdim, hidden, type));
    }
    DMOE_ASSIGN_OR_RETURN(a->kv_a_proj_, LoadLinear(ckpt, p + "kv_a_proj_with_mqa.weight",
                                                    rank + rdim, hidden, type));
    DMOE_ASSIGN_OR_RETURN(a->kv_a_norm_, LoadVector(ckpt, p + "kv_a_layernorm.weight", rank));
    {
      const int64_t shape[2] = {H * (nope + vdim), rank};
      DMOE_ASSIGN_OR_RETURN(std::vector<float> kvb, ckpt.ReadF32(p + "kv_b_proj.weight", shape));
      ckpt.Release(p + "kv_b_proj.weight");
      std::vector<float> t(rank * std::max(nope, vdim));
      for (int64_t h = 0; h < H; ++h) {
        const float* uk = kvb.data() + h * (nope + vdim) * rank;  // [nope, rank]
        const float* uv = uk + nope * rank;                       // [v, rank]
        for (int64_t i = 0; i < nope; ++i) {
          for (int64_t r = 0; r < rank; ++r) t[r * nope + i] = uk[i * rank + r];
        }
        DMOE_ASSIGN_OR_RETURN(PackedLinear uk_t, PackedLinear::Create(t.data(), rank, nope, type));
        DMOE_ASSIGN_OR_RETURN(PackedLinear uv_l, PackedLinear::Create(uv, vdim, rank, type));
        a->w_uk_t_.push_back(std::move(uk_t));
        a->w_uv_.push_back(std::move(uv_l));
      }
    }
    DMOE_ASSIGN_OR_RETURN(a->o_proj_,
                          LoadLinear(ckpt, p + "o_proj.weight", hidden, H * vdim, type));
  } else {
    const int64_t hd = cfg.head_dim, kvh = cfg.num_key_value_heads;
    DMOE_ASSIGN_OR_RETURN(a->q_proj_, LoadLinear(ckpt, p + "q_proj.weight", H * hd, hidden, type));
    DMOE_ASSIGN_OR_RETURN(a->k_proj_,
                          LoadLinear(ckpt, p + "k_proj.weight", kvh * hd, hidden, type));
    DMOE_ASSIGN_OR_RETURN(a->v_proj_,
                          LoadLinear(ckpt, p + "v_proj.weight", kvh * hd, hidden, type));
    DMOE_ASSIGN_OR_RETURN(a->o_proj_, LoadLinear(ckpt, p + "o_proj.weight", hidden, H * hd, type));
  }
  return a;
}

size_t Attention::WeightBytes() const {
  size_t b = q_proj_.weight_bytes() + q_a_proj_.weight_bytes() + q_b_proj_.weight_bytes() +
             kv_a_proj_.weight_bytes() + k_proj_.weight_bytes() + v_proj_.weight_bytes() +
             o_proj_.weight_bytes() + (q_a_norm_.size() + kv_a_norm_.size()) * sizeof(float);
  for (const auto& l : w_uk_t_) b += l.weight_bytes();
  for (const auto& l : w_uv_) b += l.weight_bytes();
  return b;
}

void Attention::Forward(const float* x, const TokenLayout& tokens, KvCache& cache, float* out) {
  if (tokens.num_tokens == 0) return;
  if (cfg_.IsMla()) {
    ForwardMla(x, tokens, cache, out);
  } else {
    ForwardMha(x, tokens, cache, out);
  }
}

void Attention::ForwardMla(const float* x, const TokenLayout& tokens, KvCache& cache, float* out) {
  const int64_t T = tokens.num_tokens, H = cfg_.num_attention_heads;
  auto ForEachHead = [H](int64_t head_work, const auto& body) {
    ForEachHeadImpl(H, head_work, body);
  };
  const int64_t nope = cfg_.qk_nope_head_dim, rdim = cfg_.qk_rope_head_dim;
  const int64_t vdim = cfg_.v_head_dim, rank = cfg_.kv_lora_rank;
  const int64_t qhd = nope + rdim, width = rank + rdim;
  const float scale = static_cast<float>(cfg_.SoftmaxScale());

  // Queries: [T, H*(nope+rope)].
  float* q = q_.Get(T * H * qhd);
  if (cfg_.q_lora_rank > 0) {
    float* qa = qa_.Get(T * cfg_.q_lora_rank);
    q_a_proj_.Forward(x, T, qa);
    RmsNormRows(qa, cfg_.q_lora_rank, q_a_norm_.data(), T, cfg_.q_lora_rank, cfg_.rms_norm_eps, qa,
                cfg_.q_lora_rank);
    q_b_proj_.Forward(qa, T, q);
  } else {
    q_proj_.Forward(x, T, q);
  }
  // Compressed KV of the new tokens: [T, rank + rope] -> normalise c_kv, rotate
  // k_pe, store into each token's cache slot.
  float* kv = kv_.Get(T * width);
  kv_a_proj_.Forward(x, T, kv);
#pragma omp parallel for if (T > 8)
  for (int64_t t = 0; t < T; ++t) {
    float* row = kv + t * width;
    RmsNorm(row, kv_a_norm_.data(), rank, cfg_.rms_norm_eps, row);
    rope_->Apply(row + rank, tokens.position[t]);
    for (int64_t h = 0; h < H; ++h) rope_->Apply(q + (t * H + h) * qhd + nope, tokens.position[t]);
  }
  for (int64_t t = 0; t < T; ++t) {
    cache.WriteRow(tokens.seq[t], layer_, tokens.position[t], kv + t * width);
  }
  // Per-head queries in the cache's space: qcat [T, H, width] = [q_nope · W_uk | q_pe].
  float* qcat = qc_.Get(T * H * width);
  ForEachHead(T * rank * nope, [&](int64_t h) {
    w_uk_t_[h].Forward(q + h * qhd, T, qcat + h * width, H * qhd, H * width);
    for (int64_t t = 0; t < T; ++t) {
      std::memcpy(qcat + (t * H + h) * width + rank, q + (t * H + h) * qhd + nope,
                  rdim * sizeof(float));
    }
  });
  // Scores and the attention-weighted c_kv: ctx [T, H, rank].
  float* ctx = ctx_.Get(T * H * rank);
  const MlaAttendShape shape{.heads = H, .rank = rank, .width = width, .scale = scale};
  // Each token's cache blocks in this layer. An f32 cache is read where it
  // lies. A 16-bit (bf16 or fp16) cache is converted to f32 block by block first: once per
  // step for a sequence with several tokens in it (a prefill chunk), and by
  // the attending thread, into its own scratch, for a lone (decode) token, so
  // that its blocks are read once, in 16 bits, and attended to from the cache.
  const int64_t B = cache.block_tokens();
  const bool half = cache.dtype() != KvDtype::kF32;  // 16-bit storage, converted
  const int64_t block_floats = B * width;
  block_begin_.resize(T + 1);
  block_ptrs_.clear();
  convert_alone_.assign(T, 0);
  float* converted = nullptr;
  if (half) {
    int64_t floats = 0;
    for (int64_t t0 = 0, t1 = 0; t0 < T; t0 = t1) {
      for (t1 = t0 + 1; t1 < T && tokens.seq[t1] == tokens.seq[t0]; ++t1) {
      }
      if (t1 - t0 > 1) floats += cache.BlocksFor(tokens.position[t1 - 1] + 1) * block_floats;
    }
    converted = conv_.Get(floats);
  }
  for (int64_t t0 = 0, t1 = 0; t0 < T; t0 = t1) {
    for (t1 = t0 + 1; t1 < T && tokens.seq[t1] == tokens.seq[t0]; ++t1) {
    }
    const std::vector<int32_t>& table = cache.BlockTable(tokens.seq[t0]);
    if (half && t1 - t0 == 1) {
      convert_alone_[t0] = 1;
      block_begin_[t0] = static_cast<int64_t>(block_ptrs_.size());
      continue;
    }
    // Positions grow within a sequence's run of tokens: the last needs the most.
    const int64_t len = tokens.position[t1 - 1] + 1;
    const int64_t group_begin = static_cast<int64_t>(block_ptrs_.size());
    for (int64_t i = 0; i < cache.BlocksFor(len); ++i) {
      if (half) {
        cache.ReadRows(table[i], layer_, std::min(B, len - i * B), converted);
        block_ptrs_.push_back(converted);
        converted += block_floats;
      } else {
        block_ptrs_.push_back(cache.BlockRows(table[i], layer_));
      }
    }
    for (int64_t t = t0; t < t1; ++t) block_begin_[t] = group_begin;
  }
  block_begin_[T] = static_cast<int64_t>(block_ptrs_.size());
  const int threads = MaxThreads();
  if (half && static_cast<int>(alone_.size()) < threads) alone_.resize(threads);
  // Attends for token t; `alone` is the calling thread's conversion scratch.
  auto attend = [&](int64_t t, AloneScratch& alone, bool parallel) {
    const int64_t len = tokens.position[t] + 1;
    const int64_t nblocks = cache.BlocksFor(len);
    std::span<const float* const> blocks;
    if (!convert_alone_[t]) {
      blocks = {block_ptrs_.data() + block_begin_[t], static_cast<size_t>(nblocks)};
    } else {
      const std::vector<int32_t>& table = cache.BlockTable(tokens.seq[t]);
      alone.rows.resize(static_cast<size_t>(nblocks * block_floats));
      alone.ptrs.resize(static_cast<size_t>(nblocks));
      for (int64_t i = 0; i < nblocks; ++i) {
        float* dst = alone.rows.data() + i * block_floats;
        cache.ReadRows(table[i], layer_, std::min(B, len - i * B), dst);
        alone.ptrs[i] = dst;
      }
      blocks = alone.ptrs;
    }
    MlaAttendToken(shape, qcat + t * H * width, blocks, B, len, ctx + t * H * rank, rank, parallel);
  };
  AloneScratch unused;
  if (T >= threads) {
#pragma omp parallel for schedule(dynamic, 1) if (threads > 1)
    for (int64_t t = 0; t < T; ++t) {
      attend(t, half ? alone_[ThreadId()] : unused, /*parallel=*/false);
    }
  } else {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t len = tokens.position[t] + 1;
      attend(t, half ? alone_[0] : unused, /*parallel=*/H * len * width >= kParallelWork);
    }
  }
  // Per-head values: attn [T, H*v] = ctx_h · W_uv_h^T, then o_proj.
  float* attn = attn_.Get(T * H * vdim);
  ForEachHead(T * rank * vdim, [&](int64_t h) {
    w_uv_[h].Forward(ctx + h * rank, T, attn + h * vdim, H * rank, H * vdim);
  });
  o_proj_.Forward(attn, T, out);
}

void Attention::ForwardMha(const float* x, const TokenLayout& tokens, KvCache& cache, float* out) {
  const int64_t T = tokens.num_tokens, H = cfg_.num_attention_heads;
  const int64_t hd = cfg_.head_dim, kvh = cfg_.num_key_value_heads;
  const int64_t group = H / kvh, width = 2 * kvh * hd;
  const float scale = static_cast<float>(cfg_.SoftmaxScale());

  float* q = q_.Get(T * H * hd);
  float* kv = kv_.Get(T * width);  // per token [k | v]
  q_proj_.Forward(x, T, q);
  k_proj_.Forward(x, T, kv, 0, width);
  v_proj_.Forward(x, T, kv + kvh * hd, 0, width);
#pragma omp parallel for if (T > 8)
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < H; ++h) rope_->Apply(q + (t * H + h) * hd, tokens.position[t]);
    for (int64_t g = 0; g < kvh; ++g) rope_->Apply(kv + t * width + g * hd, tokens.position[t]);
  }
  for (int64_t t = 0; t < T; ++t) {
    cache.WriteRow(tokens.seq[t], layer_, tokens.position[t], kv + t * width);
  }
  // A 16-bit cache: each k or v slice is converted as it is read.
  const bool half = cache.dtype() != KvDtype::kF32;
  const DType stored = cache.StorageDType();
  float* slices = half ? kv_slice_.Get(static_cast<size_t>(MaxThreads()) * hd) : nullptr;
  int64_t max_len = 0;
  for (int64_t t = 0; t < T; ++t) max_len = std::max(max_len, tokens.position[t] + 1);
  float* attn = attn_.Get(T * H * hd);
  float* probs_all = probs_.Get(static_cast<size_t>(MaxThreads()) * max_len);
#pragma omp parallel for schedule(dynamic, 1) if (T * H > 1)
  for (int64_t th = 0; th < T * H; ++th) {
    const int64_t t = th / H, h = th % H, g = h / group;
    const int64_t len = tokens.position[t] + 1;
    const int32_t seq = tokens.seq[t];
    const float* qh = q + (t * H + h) * hd;
    float* s = probs_all + static_cast<int64_t>(ThreadId()) * max_len;
    float* slice = half ? slices + static_cast<int64_t>(ThreadId()) * hd : nullptr;
    // The k (offset g * hd) or v (offset (kvh + g) * hd) slice of position j.
    auto part = [&](int64_t j, int64_t offset) -> const float* {
      if (!half) return cache.Row(seq, layer_, j) + offset;
      ConvertToF32(stored, static_cast<const uint16_t*>(cache.RowData(seq, layer_, j)) + offset,
                   static_cast<size_t>(hd), slice);
      return slice;
    };
    for (int64_t j = 0; j < len; ++j) s[j] = Dot(qh, part(j, g * hd), hd) * scale;
    SoftmaxInPlace(s, len);
    float* o = attn + (t * H + h) * hd;
    std::fill(o, o + hd, 0.0f);
    for (int64_t j = 0; j < len; ++j) Axpy(s[j], part(j, (kvh + g) * hd), o, hd);
  }
  o_proj_.Forward(attn, T, out);
}

}  // namespace dmoe::core
