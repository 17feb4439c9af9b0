#include "core/kv_cache.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <limits>

#include "absl/strings/str_cat.h"

namespace dmoe::core {

KvCache::KvCache(const ModelConfig& cfg, size_t budget_bytes, int64_t block_tokens)
    : width_(cfg.IsMla() ? cfg.kv_lora_rank + cfg.qk_rope_head_dim
                         : 2 * cfg.num_key_value_heads * cfg.head_dim),
      num_layers_(cfg.num_hidden_layers),
      block_tokens_(std::clamp<int64_t>(block_tokens, 1, 4096)),
      budget_(budget_bytes) {
  const size_t block_bytes = BlockBytes();
  if (block_bytes == 0) return;
  // Block ids are int32.
  total_blocks_ = static_cast<int64_t>(
      std::min<size_t>(budget_ / block_bytes, std::numeric_limits<int32_t>::max()));
  if (total_blocks_ == 0) return;
  pool_bytes_ = static_cast<size_t>(total_blocks_) * block_bytes;
  void* p = mmap(nullptr, pool_bytes_, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    // Address space is the only thing a NORESERVE mapping can run out of;
    // serve nothing rather than crash on first use.
    std::fprintf(stderr, "KV cache: cannot map %zu bytes; the cache has no blocks\n", pool_bytes_);
    total_blocks_ = 0;
    pool_bytes_ = 0;
    return;
  }
  pool_ = static_cast<float*>(p);
  free_list_.reserve(static_cast<size_t>(total_blocks_));
  // Block 0 on top: the first sequences use the start of the pool.
  for (int64_t b = total_blocks_ - 1; b >= 0; --b) free_list_.push_back(static_cast<int32_t>(b));
}

KvCache::~KvCache() {
  if (pool_ != nullptr) munmap(pool_, pool_bytes_);
}

size_t KvCache::ReserveBytes(int64_t tokens) const {
  if (tokens <= 0) return 0;
  const size_t blocks = static_cast<size_t>(BlocksFor(tokens));
  const size_t bb = BlockBytes();
  if (bb != 0 && blocks > std::numeric_limits<size_t>::max() / bb) {
    return std::numeric_limits<size_t>::max();
  }
  return blocks * bb;
}

absl::StatusOr<int32_t> KvCache::Allocate(int64_t capacity_tokens) {
  if (capacity_tokens <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV cache: sequence capacity must be positive, got ", capacity_tokens));
  }
  const int64_t blocks = BlocksFor(capacity_tokens);
  if (blocks > free_blocks()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("KV cache: a sequence of ", capacity_tokens, " tokens needs ", blocks,
                     " blocks of ", block_tokens_, " tokens (", ReserveBytes(capacity_tokens),
                     " bytes), but only ", free_blocks(), " of the ", total_blocks_, " blocks (",
                     budget_, "-byte budget) are free (raise --kv-cache-bytes)"));
  }
  Seq s;
  s.capacity = capacity_tokens;
  s.reserved_blocks = blocks;
  s.blocks.reserve(static_cast<size_t>(blocks));
  reserved_blocks_ += blocks;
  const int32_t id = next_id_++;
  seqs_.emplace(id, std::move(s));
  return id;
}

absl::StatusOr<int32_t> KvCache::AllocateUnreserved(int64_t capacity_tokens) {
  if (capacity_tokens <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV cache: sequence capacity must be positive, got ", capacity_tokens));
  }
  Seq s;
  s.capacity = capacity_tokens;
  const int32_t id = next_id_++;
  seqs_.emplace(id, std::move(s));
  return id;
}

int64_t KvCache::BlocksToGrow(int32_t seq, int64_t tokens) const {
  const Seq& s = seqs_.at(seq);
  return std::max<int64_t>(0, BlocksFor(tokens) - static_cast<int64_t>(s.blocks.size()));
}

absl::Status KvCache::Grow(int32_t seq, int64_t tokens) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return absl::InvalidArgumentError(absl::StrCat("unknown sequence ", seq));
  Seq& s = it->second;
  if (tokens > s.capacity) {
    return absl::ResourceExhaustedError(absl::StrCat("KV cache: sequence ", seq, " would reach ",
                                                     tokens, " tokens, over its reservation of ",
                                                     s.capacity));
  }
  const int64_t need = BlocksFor(tokens);
  const int64_t more = need - static_cast<int64_t>(s.blocks.size());
  if (more <= 0) return absl::OkStatus();
  // A reserving sequence's blocks are always there (reservations never exceed
  // the pool, and unreserved growth never takes promised blocks).
  if (s.reserved_blocks == 0 && more > free_blocks()) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "KV cache: sequence ", seq, " needs ", more, " more blocks to reach ", tokens,
        " tokens, but only ", free_blocks(), " of the ", total_blocks_, " blocks are free"));
  }
  for (int64_t i = 0; i < more; ++i) {
    s.blocks.push_back(free_list_.back());
    free_list_.pop_back();
  }
  if (s.reserved_blocks > 0) reserved_attached_ += more;
  return absl::OkStatus();
}

void KvCache::Free(int32_t seq) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return;
  for (auto b = it->second.blocks.rbegin(); b != it->second.blocks.rend(); ++b) {
    free_list_.push_back(*b);
  }
  reserved_blocks_ -= it->second.reserved_blocks;
  if (it->second.reserved_blocks > 0) {
    reserved_attached_ -= static_cast<int64_t>(it->second.blocks.size());
  }
  seqs_.erase(it);
}

}  // namespace dmoe::core
