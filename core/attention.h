// Self-attention of one decoder layer, reading and writing the KV cache.
//
// MLA (deepseek_v2/v3) runs in the compressed ("absorbed") form: the cache holds
// the normalised c_kv and the rotated k_pe; per head, q_nope is mapped into the
// c_kv space with W_uk (from kv_b_proj) and the attention-weighted c_kv is mapped
// out with W_uv, which equals the per-head k/v formulation of docs/model.md up
// to rounding. MHA (deepseek) uses q/k/v/o projections with llama-style RoPE and
// grouped KV heads.
//
// Forward first writes the cache entries of every token of the batch, then each
// token attends causally to positions [0, its position] of its own sequence.
// Thread safety: one Forward at a time per Attention object (it owns scratch).
#ifndef DMOE_CORE_ATTENTION_H_
#define DMOE_CORE_ATTENTION_H_

#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "core/config.h"
#include "core/kernels/cpu/linear.h"
#include "core/kv_cache.h"
#include "core/layers.h"
#include "core/rope.h"
#include "core/safetensors.h"

namespace dmoe::core {

class Attention {
 public:
  // `rope` is shared by all layers and must outlive this object.
  static absl::StatusOr<std::unique_ptr<Attention>> Load(const ModelConfig& cfg,
                                                         const Checkpoint& ckpt, int64_t layer,
                                                         ComputeType type, const RopeTable* rope);

  // x: [T, hidden] (already normalised); out: [T, hidden].
  void Forward(const float* x, const TokenLayout& tokens, KvCache& cache, float* out);
  size_t WeightBytes() const;

 private:
  Attention(const ModelConfig& cfg, int64_t layer, const RopeTable* rope)
      : cfg_(cfg), layer_(layer), rope_(rope) {}
  void ForwardMla(const float* x, const TokenLayout& tokens, KvCache& cache, float* out);
  void ForwardMha(const float* x, const TokenLayout& tokens, KvCache& cache, float* out);

  const ModelConfig& cfg_;
  const int64_t layer_;
  const RopeTable* rope_;

  // MLA weights.
  PackedLinear q_proj_;    // [H*(nope+rope), hidden] (no q LoRA)
  PackedLinear q_a_proj_;  // [q_lora, hidden]
  std::vector<float> q_a_norm_;
  PackedLinear q_b_proj_;   // [H*(nope+rope), q_lora]
  PackedLinear kv_a_proj_;  // [kv_lora + rope, hidden]
  std::vector<float> kv_a_norm_;
  std::vector<PackedLinear> w_uk_t_;  // per head: [kv_lora, nope] (W_uk transposed)
  std::vector<PackedLinear> w_uv_;    // per head: [v, kv_lora]
  // MHA weights.
  PackedLinear k_proj_, v_proj_;
  PackedLinear o_proj_;  // [hidden, H*v] (MLA) or [hidden, H*head_dim]

  Scratch q_, qa_, kv_, qc_, ctx_, attn_, probs_;
  std::vector<const float*> block_ptrs_;  // per token: its cache blocks in this layer
  std::vector<int64_t> block_begin_;      // [T + 1] offsets into block_ptrs_
  // A 16-bit cache: blocks converted to f32 for this step (sequences with
  // several tokens), tokens whose thread converts their blocks itself, that
  // scratch per thread, and MHA's per-thread slice.
  Scratch conv_, kv_slice_;
  std::vector<char> convert_alone_;
  struct AloneScratch {
    std::vector<float> rows;
    std::vector<const float*> ptrs;
  };
  std::vector<AloneScratch> alone_;
};

}  // namespace dmoe::core

#endif  // DMOE_CORE_ATTENTION_H_
