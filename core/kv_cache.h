// Per-sequence attention cache with a byte budget.
//
// For MLA models a token's entry in a layer is the compressed form
// [c_kv (kv_lora_rank) | k_pe (qk_rope_head_dim)], with c_kv already normalised
// and k_pe already rotated. For multi-head attention (model_type "deepseek") it is
// [k (kv_heads * head_dim) | v (kv_heads * head_dim)] with k rotated. fp32.
//
// A sequence reserves its full capacity (prompt + tokens to generate) when it is
// allocated; a request that does not fit the remaining budget gets
// ResourceExhausted naming the sizes, never an out-of-memory kill.
//
// Thread safety: Allocate/Free/Length changes must be externally serialised with
// model steps that use the same sequences (the model's caller owns scheduling).
#ifndef DMOE_CORE_KV_CACHE_H_
#define DMOE_CORE_KV_CACHE_H_

#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "core/config.h"

namespace dmoe::core {

class KvCache {
 public:
  KvCache(const ModelConfig& cfg, size_t budget_bytes);

  // Floats per token per layer.
  int64_t entry_width() const { return width_; }
  size_t BytesPerToken() const { return static_cast<size_t>(width_) * num_layers_ * sizeof(float); }
  size_t budget_bytes() const { return budget_; }
  size_t used_bytes() const { return used_; }

  // Reserves room for `capacity_tokens` tokens. Returns the sequence id.
  absl::StatusOr<int32_t> Allocate(int64_t capacity_tokens);
  void Free(int32_t seq);
  bool Contains(int32_t seq) const { return seqs_.count(seq) > 0; }

  int64_t Length(int32_t seq) const { return seqs_.at(seq).length; }
  int64_t Capacity(int32_t seq) const { return seqs_.at(seq).capacity; }
  void SetLength(int32_t seq, int64_t n) { seqs_.at(seq).length = n; }
  // [capacity, entry_width()] floats for `layer`.
  float* LayerData(int32_t seq, int64_t layer) {
    Seq& s = seqs_.at(seq);
    return s.data.get() + layer * s.capacity * width_;
  }

 private:
  struct Seq {
    int64_t capacity = 0;
    int64_t length = 0;
    std::unique_ptr<float[]> data;  // [layers, capacity, width]
  };
  int64_t width_;
  int64_t num_layers_;
  size_t budget_;
  size_t used_ = 0;
  int32_t next_id_ = 0;
  std::map<int32_t, Seq> seqs_;
};

}  // namespace dmoe::core

#endif  // DMOE_CORE_KV_CACHE_H_
