// The attention cache: fixed-size blocks of tokens, a block table per sequence,
// all under one byte budget.
//
// For MLA models a token's entry in a layer is the compressed form
// [c_kv (kv_lora_rank) | k_pe (qk_rope_head_dim)], with c_kv already normalised
// and k_pe already rotated. For multi-head attention (model_type "deepseek") it is
// [k (kv_heads * head_dim) | v (kv_heads * head_dim)] with k rotated. fp32.
//
// Storage: the budget is divided into blocks of `block_tokens` tokens, each
// holding those tokens' entries for every layer ([layers][block_tokens][width]
// floats, so a block's rows in one layer are contiguous). The pool is one
// anonymous mapping, faulted in as blocks are first used. A sequence's block
// table lists its blocks in position order; position p lives in block table
// entry p / block_tokens, row p % block_tokens. Blocks are attached as the
// sequence grows (Grow) and returned to the free list when it is freed.
//
// Reservation: Allocate(capacity) reserves ceil(capacity / block_tokens)
// blocks, so a sequence can always grow to its capacity; a request that does
// not fit the unreserved blocks gets ResourceExhausted naming the sizes,
// never an out-of-memory kill. AllocateUnreserved(capacity) reserves nothing:
// its Grow takes free blocks (never ones promised to a reservation) and fails
// with ResourceExhausted when there are too few; the caller (the scheduler)
// makes room first, by preempting, using BlocksToGrow and free_blocks.
//
// Thread safety: Allocate/Free/Grow/SetLength must be externally serialised
// with model steps that use the same sequences (the model's caller owns
// scheduling). Row/Block lookups are const and safe from many threads.
#ifndef DMOE_CORE_KV_CACHE_H_
#define DMOE_CORE_KV_CACHE_H_

#include <cstdint>
#include <map>
#include <vector>

#include "absl/status/statusor.h"
#include "core/config.h"

namespace dmoe::core {

class KvCache {
 public:
  static constexpr int64_t kDefaultBlockTokens = 32;

  // block_tokens in [1, 4096].
  KvCache(const ModelConfig& cfg, size_t budget_bytes, int64_t block_tokens = kDefaultBlockTokens);
  ~KvCache();
  KvCache(const KvCache&) = delete;
  KvCache& operator=(const KvCache&) = delete;

  // Floats per token per layer.
  int64_t entry_width() const { return width_; }
  size_t BytesPerToken() const { return static_cast<size_t>(width_) * num_layers_ * sizeof(float); }
  int64_t block_tokens() const { return block_tokens_; }
  size_t BlockBytes() const { return BytesPerToken() * static_cast<size_t>(block_tokens_); }
  int64_t total_blocks() const { return total_blocks_; }
  // Blocks neither attached to a sequence nor promised to a reservation.
  int64_t free_blocks() const {
    return static_cast<int64_t>(free_list_.size()) - (reserved_blocks_ - reserved_attached_);
  }
  // Blocks attached to sequences (holding or about to hold entries).
  int64_t used_blocks() const { return total_blocks_ - static_cast<int64_t>(free_list_.size()); }
  size_t budget_bytes() const { return budget_; }
  // Bytes of the reserved blocks.
  size_t used_bytes() const { return static_cast<size_t>(reserved_blocks_) * BlockBytes(); }
  // Bytes a sequence of `tokens` tokens reserves (whole blocks); 0 for
  // tokens <= 0, SIZE_MAX when it overflows.
  size_t ReserveBytes(int64_t tokens) const;

  // Reserves room for `capacity_tokens` tokens. Returns the sequence id.
  absl::StatusOr<int32_t> Allocate(int64_t capacity_tokens);
  // A sequence of at most `capacity_tokens` tokens that reserves nothing.
  absl::StatusOr<int32_t> AllocateUnreserved(int64_t capacity_tokens);
  // Blocks Grow(seq, tokens) would attach.
  int64_t BlocksToGrow(int32_t seq, int64_t tokens) const;
  // Blocks needed for `tokens` tokens.
  int64_t BlocksFor(int64_t tokens) const {
    return tokens <= 0 ? 0 : (tokens + block_tokens_ - 1) / block_tokens_;
  }
  void Free(int32_t seq);
  bool Contains(int32_t seq) const { return seqs_.count(seq) > 0; }

  int64_t Length(int32_t seq) const { return seqs_.at(seq).length; }
  int64_t Capacity(int32_t seq) const { return seqs_.at(seq).capacity; }
  void SetLength(int32_t seq, int64_t n) { seqs_.at(seq).length = n; }
  // Attaches blocks so that positions [0, tokens) have rows; tokens <=
  // Capacity(seq) (the reservation guarantees the blocks).
  absl::Status Grow(int32_t seq, int64_t tokens);

  // Blocks attached to `seq`, in position order.
  const std::vector<int32_t>& BlockTable(int32_t seq) const { return seqs_.at(seq).blocks; }
  // Rows [block_tokens, entry_width] of `block` (a pool index) in `layer`.
  float* BlockRows(int32_t block, int64_t layer) const {
    return pool_ + (static_cast<size_t>(block) * num_layers_ + layer) * block_tokens_ * width_;
  }
  // The row of position `pos` (< attached blocks * block_tokens) in `layer`.
  float* Row(int32_t seq, int64_t layer, int64_t pos) const {
    const Seq& s = seqs_.at(seq);
    return BlockRows(s.blocks[pos / block_tokens_], layer) + (pos % block_tokens_) * width_;
  }

 private:
  struct Seq {
    int64_t capacity = 0;
    int64_t length = 0;
    int64_t reserved_blocks = 0;
    std::vector<int32_t> blocks;
  };
  int64_t width_;
  int64_t num_layers_;
  int64_t block_tokens_;
  size_t budget_;
  int64_t total_blocks_ = 0;
  int64_t reserved_blocks_ = 0;
  int64_t reserved_attached_ = 0;  // blocks attached to reserving sequences
  float* pool_ = nullptr;
  size_t pool_bytes_ = 0;
  std::vector<int32_t> free_list_;  // LIFO: a freed block is reused first
  int32_t next_id_ = 0;
  std::map<int32_t, Seq> seqs_;
};

}  // namespace dmoe::core

#endif  // DMOE_CORE_KV_CACHE_H_
