#include "core/kv_cache.h"

#include <new>

#include "absl/strings/str_cat.h"

namespace dmoe::core {

KvCache::KvCache(const ModelConfig& cfg, size_t budget_bytes)
    : width_(cfg.IsMla() ? cfg.kv_lora_rank + cfg.qk_rope_head_dim
                         : 2 * cfg.num_key_value_heads * cfg.head_dim),
      num_layers_(cfg.num_hidden_layers),
      budget_(budget_bytes) {}

absl::StatusOr<int32_t> KvCache::Allocate(int64_t capacity_tokens) {
  if (capacity_tokens <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV cache: sequence capacity must be positive, got ", capacity_tokens));
  }
  const size_t bytes = static_cast<size_t>(capacity_tokens) * BytesPerToken();
  if (bytes / BytesPerToken() != static_cast<size_t>(capacity_tokens) || bytes > budget_ - used_) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "KV cache: a sequence of ", capacity_tokens, " tokens needs ", bytes, " bytes, but only ",
        budget_ - used_, " of the ", budget_, "-byte budget are free (raise --kv-cache-bytes)"));
  }
  Seq s;
  s.capacity = capacity_tokens;
  s.data.reset(
      new (std::nothrow) float[static_cast<size_t>(capacity_tokens) * width_ * num_layers_]);
  if (!s.data) {
    return absl::ResourceExhaustedError(
        absl::StrCat("KV cache: could not allocate ", bytes, " bytes"));
  }
  used_ += bytes;
  const int32_t id = next_id_++;
  seqs_.emplace(id, std::move(s));
  return id;
}

void KvCache::Free(int32_t seq) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return;
  used_ -= static_cast<size_t>(it->second.capacity) * BytesPerToken();
  seqs_.erase(it);
}

}  // namespace dmoe::core
