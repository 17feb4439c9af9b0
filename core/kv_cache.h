// The attention cache: fixed-size blocks of tokens, a block table per sequence,
// all under one byte budget.
//
// For MLA models a token's entry in a layer is the compressed form
// [c_kv (kv_lora_rank) | k_pe (qk_rope_head_dim)], with c_kv already normalised
// and k_pe already rotated. For multi-head attention (model_type "deepseek") it is
// [k (kv_heads * head_dim) | v (kv_heads * head_dim)] with k rotated. Stored
// as fp32 (KvDtype::kF32, exact), fp16 (kF16) or bf16 (kBF16). The 16-bit
// forms take half the bytes: each value is rounded to nearest even once, when
// written (fp16 saturates at +-65504 and counts those values), and read back
// exactly as stored, so the bits still do not depend on the batch. fp16 keeps
// 3 more mantissa bits than bf16 (docs/model.md has the accuracy of each).
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
// Sharing: a block may belong to several sequences at once (a reference
// count per block). Fork(seq) makes a sequence that shares all of another's
// blocks; the first write into a shared partial block copies it first
// (copy-on-write, in Grow), and full blocks are never written again.
//
// Prefix cache (optional, `prefix_cache`): Commit(seq, tokens) gives each
// full block of a sequence a content address: the token ids of the block
// together with the address of the block before it (so a block's address
// stands for every token before it too). Addresses are compared exactly
// (token ids, and parent blocks by a registration number never reused), so
// there are no hash collisions to fear. AllocateUnreserved(capacity, tokens)
// attaches the cached blocks of the longest cached prefix of `tokens`; the
// new sequence starts with that many positions computed. A cached block that
// no sequence holds stays cached and counts as free: it is evicted, least
// recently released first, when a free block is needed and the free list is
// empty. The cached entries are those the model would compute again (its
// arithmetic does not depend on the batch), so reusing them changes no bit;
// the cache is per process and per loaded model.
//
// Thread safety: Allocate/Free/Grow/SetLength must be externally serialised
// with model steps that use the same sequences (the model's caller owns
// scheduling). Row/Block lookups are const and safe from many threads.
#ifndef DMOE_CORE_KV_CACHE_H_
#define DMOE_CORE_KV_CACHE_H_

#include <cstdint>
#include <list>
#include <map>
#include <span>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "core/config.h"
#include "core/dtype.h"

namespace dmoe::core {

enum class KvDtype { kF32, kF16, kBF16 };
const char* KvDtypeName(KvDtype d);

class KvCache {
 public:
  static constexpr int64_t kDefaultBlockTokens = 32;

  // block_tokens in [1, 4096].
  KvCache(const ModelConfig& cfg, size_t budget_bytes, int64_t block_tokens = kDefaultBlockTokens,
          bool prefix_cache = false, KvDtype dtype = KvDtype::kF32);
  ~KvCache();
  KvCache(const KvCache&) = delete;
  KvCache& operator=(const KvCache&) = delete;

  // Values per token per layer.
  int64_t entry_width() const { return width_; }
  KvDtype dtype() const { return dtype_; }
  size_t ElemBytes() const { return dtype_ == KvDtype::kF32 ? 4 : 2; }
  // The storage type as a tensor dtype (kF32, kF16 or kBF16).
  DType StorageDType() const {
    return dtype_ == KvDtype::kF32   ? DType::kF32
           : dtype_ == KvDtype::kF16 ? DType::kF16
                                     : DType::kBF16;
  }
  // fp16 values written out of range and saturated, since construction.
  uint64_t saturated_values() const { return saturated_; }
  size_t BytesPerToken() const { return static_cast<size_t>(width_) * num_layers_ * ElemBytes(); }
  int64_t block_tokens() const { return block_tokens_; }
  size_t BlockBytes() const { return BytesPerToken() * static_cast<size_t>(block_tokens_); }
  int64_t total_blocks() const { return total_blocks_; }
  bool prefix_cache() const { return prefix_cache_; }
  // Blocks neither attached to a sequence nor promised to a reservation
  // (cached blocks no sequence holds included: they are evicted on demand).
  int64_t free_blocks() const {
    return static_cast<int64_t>(free_list_.size() + lru_size_) -
           (reserved_blocks_ - reserved_attached_);
  }
  // Blocks attached to sequences (holding or about to hold entries).
  int64_t used_blocks() const {
    return total_blocks_ - static_cast<int64_t>(free_list_.size() + lru_size_);
  }
  // Prefix-cached blocks no sequence holds (reusable, evictable).
  int64_t cached_blocks() const { return static_cast<int64_t>(lru_size_); }
  // Blocks with a content address (held or not).
  int64_t addressed_blocks() const { return static_cast<int64_t>(index_.size()); }
  // Cached blocks evicted since construction.
  uint64_t evictions() const { return evictions_; }
  size_t budget_bytes() const { return budget_; }
  // Bytes of the reserved blocks.
  size_t used_bytes() const { return static_cast<size_t>(reserved_blocks_) * BlockBytes(); }
  // Bytes a sequence of `tokens` tokens reserves (whole blocks); 0 for
  // tokens <= 0, SIZE_MAX when it overflows.
  size_t ReserveBytes(int64_t tokens) const;

  // Reserves room for `capacity_tokens` tokens. Returns the sequence id.
  absl::StatusOr<int32_t> Allocate(int64_t capacity_tokens);
  // A sequence of at most `capacity_tokens` tokens that reserves nothing.
  // With the prefix cache, it starts with the cached blocks of the longest
  // cached prefix of `tokens` of at most `max_prefix_tokens` tokens attached
  // (Length() = the tokens they hold).
  absl::StatusOr<int32_t> AllocateUnreserved(int64_t capacity_tokens,
                                             std::span<const int32_t> tokens = {},
                                             int64_t max_prefix_tokens = 0);
  struct PrefixMatch {
    int64_t blocks = 0;  // cached blocks of the longest cached prefix
    int64_t unheld = 0;  // of them, blocks no sequence holds (counted free now)
  };
  // What AllocateUnreserved(_, tokens, max_prefix_tokens) would attach.
  PrefixMatch MatchPrefix(std::span<const int32_t> tokens, int64_t max_prefix_tokens) const;
  // Gives the full blocks of `seq` among positions [0, Length(seq)) content
  // addresses; tokens[p] is the token at position p (tokens.size() >=
  // Length(seq)). A block whose address is already cached is replaced by the
  // cached one (same entries), so equal prefixes share memory. No-op without
  // the prefix cache.
  void Commit(int32_t seq, std::span<const int32_t> tokens);
  // A new sequence sharing all of `seq`'s blocks and length (its capacity
  // and reservation: none, like AllocateUnreserved). Writes of either copy
  // into a shared partial block copy it first.
  absl::StatusOr<int32_t> Fork(int32_t seq);
  // Blocks Grow(seq, tokens) would take (new ones, and a copy of a shared
  // partial block).
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
  // Attaches blocks so that positions [0, tokens) have rows and the rows of
  // [Length(seq), tokens) are the sequence's own (a shared partial block is
  // copied first); tokens <= Capacity(seq) (the reservation guarantees the
  // blocks).
  absl::Status Grow(int32_t seq, int64_t tokens);
  // Sequences holding `block`.
  int32_t RefCount(int32_t block) const { return ref_[static_cast<size_t>(block)]; }

  // Blocks attached to `seq`, in position order.
  const std::vector<int32_t>& BlockTable(int32_t seq) const { return seqs_.at(seq).blocks; }
  // Rows [block_tokens, entry_width] of `block` (a pool index) in `layer`,
  // as stored (StorageDType()).
  void* BlockData(int32_t block, int64_t layer) const {
    return pool_ + ((static_cast<size_t>(block) * num_layers_ + layer) * block_tokens_ * width_) *
                       ElemBytes();
  }
  // The same for an f32 cache.
  float* BlockRows(int32_t block, int64_t layer) const {
    return static_cast<float*>(BlockData(block, layer));
  }
  // The row of position `pos` (< attached blocks * block_tokens) in `layer`,
  // of an f32 cache.
  float* Row(int32_t seq, int64_t layer, int64_t pos) const {
    const Seq& s = seqs_.at(seq);
    return BlockRows(s.blocks[pos / block_tokens_], layer) + (pos % block_tokens_) * width_;
  }
  // The row of position `pos` in `layer` as stored (StorageDType()).
  const void* RowData(int32_t seq, int64_t layer, int64_t pos) const {
    const Seq& s = seqs_.at(seq);
    return static_cast<const char*>(BlockData(s.blocks[pos / block_tokens_], layer)) +
           (pos % block_tokens_) * width_ * ElemBytes();
  }
  // Stores `entry` (entry_width floats) as the row of `pos`, in the cache's dtype.
  void WriteRow(int32_t seq, int64_t layer, int64_t pos, const float* entry);
  // Rows [0, rows) of `block` in `layer` as floats into dst [rows, entry_width].
  void ReadRows(int32_t block, int64_t layer, int64_t rows, float* dst) const;

 private:
  struct Seq {
    int64_t capacity = 0;
    int64_t length = 0;
    int64_t reserved_blocks = 0;
    std::vector<int32_t> blocks;
    int64_t addressed = 0;  // blocks[0, addressed) have content addresses
    uint64_t last_uid = 0;  // registration number of blocks[addressed - 1]
  };
  // A block's content address: its parent's registration number and its tokens.
  using Key = std::pair<uint64_t, std::vector<int32_t>>;
  static constexpr uint64_t kRootUid = 1;  // parent of every first block

  // The cached blocks of the longest cached prefix of `tokens` of at most
  // `max_tokens` tokens, in position order (none without the prefix cache).
  std::vector<int32_t> CachedPrefix(std::span<const int32_t> tokens, int64_t max_tokens) const;
  // A block for a new entry: from the free list, else the least recently
  // released cached block (its address is dropped).
  int32_t TakeBlock();
  // Drops one reference to `block`: an unaddressed block goes to the free
  // list, an addressed one to the back of the LRU list.
  void Release(int32_t block);
  // One more reference to `block` (leaves the LRU list if it was there).
  void Hold(int32_t block);
  void Unlist(int32_t block);
  std::span<const int32_t> KeyTokens(std::span<const int32_t> tokens, int64_t i) const {
    return tokens.subspan(static_cast<size_t>(i * block_tokens_),
                          static_cast<size_t>(block_tokens_));
  }
  int64_t width_;
  int64_t num_layers_;
  int64_t block_tokens_;
  size_t budget_;
  int64_t total_blocks_ = 0;
  int64_t reserved_blocks_ = 0;
  int64_t reserved_attached_ = 0;  // blocks attached to reserving sequences
  KvDtype dtype_ = KvDtype::kF32;
  uint64_t saturated_ = 0;
  char* pool_ = nullptr;
  size_t pool_bytes_ = 0;
  std::vector<int32_t> free_list_;  // LIFO: a freed block is reused first
  std::vector<int32_t> ref_;        // [total_blocks]: sequences holding each block
  bool prefix_cache_ = false;
  // Prefix cache: address -> block, and per block its address and number
  // (0: none). Unheld addressed blocks wait in lru_ (front: evicted first).
  absl::flat_hash_map<Key, int32_t> index_;
  std::vector<Key> key_;
  std::vector<uint64_t> uid_;
  uint64_t next_uid_ = kRootUid + 1;
  std::list<int32_t> lru_;
  size_t lru_size_ = 0;
  std::vector<std::list<int32_t>::iterator> lru_pos_;
  std::vector<bool> in_lru_;
  uint64_t evictions_ = 0;
  int32_t next_id_ = 0;
  std::map<int32_t, Seq> seqs_;
};

}  // namespace dmoe::core

#endif  // DMOE_CORE_KV_CACHE_H_
