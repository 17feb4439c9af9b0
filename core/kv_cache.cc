#include "core/kv_cache.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"

namespace dmoe::core {

KvCache::KvCache(const ModelConfig& cfg, size_t budget_bytes, int64_t block_tokens,
                 bool prefix_cache, KvDtype dtype)
    : width_(cfg.IsMla() ? cfg.kv_lora_rank + cfg.qk_rope_head_dim
                         : 2 * cfg.num_key_value_heads * cfg.head_dim),
      num_layers_(cfg.num_hidden_layers),
      block_tokens_(std::clamp<int64_t>(block_tokens, 1, 4096)),
      budget_(budget_bytes),
      dtype_(dtype),
      prefix_cache_(prefix_cache) {
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
  pool_ = static_cast<char*>(p);
  const size_t n = static_cast<size_t>(total_blocks_);
  ref_.assign(n, 0);
  if (prefix_cache_) {
    key_.resize(n);
    uid_.assign(n, 0);
    lru_pos_.resize(n);
    in_lru_.assign(n, false);
  }
  free_list_.reserve(n);
  // Block 0 on top: the first sequences use the start of the pool.
  for (int64_t b = total_blocks_ - 1; b >= 0; --b) free_list_.push_back(static_cast<int32_t>(b));
}

KvCache::~KvCache() {
  if (pool_ != nullptr) munmap(pool_, pool_bytes_);
}

const char* KvDtypeName(KvDtype d) {
  switch (d) {
    case KvDtype::kF32:
      return "f32";
    case KvDtype::kF16:
      return "f16";
    case KvDtype::kBF16:
      return "bf16";
  }
  return "?";
}

void KvCache::WriteRow(int32_t seq, int64_t layer, int64_t pos, const float* entry) {
  const Seq& s = seqs_.at(seq);
  char* block = static_cast<char*>(BlockData(s.blocks[pos / block_tokens_], layer));
  char* row = block + (pos % block_tokens_) * width_ * ElemBytes();
  const size_t n = static_cast<size_t>(width_);
  switch (dtype_) {
    case KvDtype::kF32:
      std::memcpy(row, entry, n * sizeof(float));
      return;
    case KvDtype::kF16:
      saturated_ += ConvertF32ToF16Sat(entry, n, reinterpret_cast<uint16_t*>(row));
      return;
    case KvDtype::kBF16:
      ConvertF32ToBF16(entry, n, reinterpret_cast<uint16_t*>(row));
      return;
  }
}

void KvCache::ReadRows(int32_t block, int64_t layer, int64_t rows, float* dst) const {
  ConvertToF32(StorageDType(), BlockData(block, layer), static_cast<size_t>(rows * width_), dst);
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

absl::StatusOr<int32_t> KvCache::AllocateUnreserved(int64_t capacity_tokens,
                                                    std::span<const int32_t> tokens,
                                                    int64_t max_prefix_tokens) {
  if (capacity_tokens <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV cache: sequence capacity must be positive, got ", capacity_tokens));
  }
  Seq s;
  s.capacity = capacity_tokens;
  s.last_uid = kRootUid;
  s.blocks = CachedPrefix(tokens, std::min(max_prefix_tokens, capacity_tokens));
  for (int32_t b : s.blocks) Hold(b);
  s.addressed = static_cast<int64_t>(s.blocks.size());
  if (!s.blocks.empty()) s.last_uid = uid_[static_cast<size_t>(s.blocks.back())];
  s.length = s.addressed * block_tokens_;
  const int32_t id = next_id_++;
  seqs_.emplace(id, std::move(s));
  return id;
}

std::vector<int32_t> KvCache::CachedPrefix(std::span<const int32_t> tokens,
                                           int64_t max_tokens) const {
  std::vector<int32_t> blocks;
  if (!prefix_cache_) return blocks;
  const int64_t limit = std::min(max_tokens, static_cast<int64_t>(tokens.size()));
  Key key;
  key.first = kRootUid;
  for (int64_t i = 0; (i + 1) * block_tokens_ <= limit; ++i) {
    const std::span<const int32_t> t = KeyTokens(tokens, i);
    key.second.assign(t.begin(), t.end());
    auto it = index_.find(key);
    if (it == index_.end()) break;
    blocks.push_back(it->second);
    key.first = uid_[static_cast<size_t>(it->second)];
  }
  return blocks;
}

KvCache::PrefixMatch KvCache::MatchPrefix(std::span<const int32_t> tokens,
                                          int64_t max_prefix_tokens) const {
  PrefixMatch m;
  for (int32_t b : CachedPrefix(tokens, max_prefix_tokens)) {
    ++m.blocks;
    if (ref_[static_cast<size_t>(b)] == 0) ++m.unheld;
  }
  return m;
}

void KvCache::Commit(int32_t seq, std::span<const int32_t> tokens) {
  if (!prefix_cache_) return;
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return;
  Seq& s = it->second;
  const int64_t full = std::min(s.length, static_cast<int64_t>(tokens.size())) / block_tokens_;
  for (int64_t i = s.addressed; i < full; ++i) {
    const std::span<const int32_t> t = KeyTokens(tokens, i);
    Key key(s.last_uid, std::vector<int32_t>(t.begin(), t.end()));
    int32_t& mine = s.blocks[static_cast<size_t>(i)];
    auto found = index_.find(key);
    if (found != index_.end()) {
      // Computed already (by a sequence with the same prefix): share that copy.
      if (found->second != mine) {
        Hold(found->second);
        Release(mine);
        mine = found->second;
      }
    } else if (uid_[static_cast<size_t>(mine)] == 0) {
      uid_[static_cast<size_t>(mine)] = next_uid_++;
      key_[static_cast<size_t>(mine)] = key;
      index_.emplace(std::move(key), mine);
    } else {
      // `mine` has another address: it cannot (addresses are fixed by
      // contents and a block is written once), but stop chaining if so.
      break;
    }
    s.addressed = i + 1;
    s.last_uid = uid_[static_cast<size_t>(mine)];
  }
}

absl::StatusOr<int32_t> KvCache::Fork(int32_t seq) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return absl::InvalidArgumentError(absl::StrCat("unknown sequence ", seq));
  if (it->second.reserved_blocks > 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("KV cache: sequence ", seq, " holds a reservation and cannot be forked"));
  }
  Seq s;
  s.capacity = it->second.capacity;
  s.length = it->second.length;
  s.blocks = it->second.blocks;
  s.addressed = it->second.addressed;
  s.last_uid = it->second.last_uid;
  for (int32_t b : s.blocks) Hold(b);
  const int32_t id = next_id_++;
  seqs_.emplace(id, std::move(s));
  return id;
}

int64_t KvCache::BlocksToGrow(int32_t seq, int64_t tokens) const {
  const Seq& s = seqs_.at(seq);
  int64_t n = std::max<int64_t>(0, BlocksFor(tokens) - static_cast<int64_t>(s.blocks.size()));
  const size_t partial = static_cast<size_t>(s.length / block_tokens_);
  if (tokens > s.length && s.length % block_tokens_ != 0 && partial < s.blocks.size() &&
      ref_[static_cast<size_t>(s.blocks[partial])] > 1) {
    ++n;  // copy-on-write
  }
  return n;
}

int32_t KvCache::TakeBlock() {
  if (!free_list_.empty()) {
    const int32_t b = free_list_.back();
    free_list_.pop_back();
    return b;
  }
  // Evict the least recently released cached block.
  const int32_t b = lru_.front();
  Unlist(b);
  index_.erase(key_[static_cast<size_t>(b)]);
  key_[static_cast<size_t>(b)] = Key();
  uid_[static_cast<size_t>(b)] = 0;
  ++evictions_;
  return b;
}

void KvCache::Unlist(int32_t b) {
  const size_t i = static_cast<size_t>(b);
  if (!prefix_cache_ || !in_lru_[i]) return;
  lru_.erase(lru_pos_[i]);
  in_lru_[i] = false;
  --lru_size_;
}

void KvCache::Hold(int32_t b) {
  if (ref_[static_cast<size_t>(b)]++ == 0) Unlist(b);
}

void KvCache::Release(int32_t b) {
  const size_t i = static_cast<size_t>(b);
  if (--ref_[i] > 0) return;
  if (prefix_cache_ && uid_[i] != 0) {
    lru_pos_[i] = lru_.insert(lru_.end(), b);
    in_lru_[i] = true;
    ++lru_size_;
  } else {
    free_list_.push_back(b);
  }
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
  const int64_t more = BlocksToGrow(seq, tokens);
  if (more <= 0) return absl::OkStatus();
  // A reserving sequence's blocks are always there (reservations never exceed
  // the pool, and unreserved growth never takes promised blocks; reserving
  // sequences are never forked).
  if (s.reserved_blocks == 0 && more > free_blocks()) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "KV cache: sequence ", seq, " needs ", more, " more blocks to reach ", tokens,
        " tokens, but only ", free_blocks(), " of the ", total_blocks_, " blocks are free"));
  }
  const size_t partial = static_cast<size_t>(s.length / block_tokens_);
  if (s.length % block_tokens_ != 0 && partial < s.blocks.size() &&
      ref_[static_cast<size_t>(s.blocks[partial])] > 1) {
    // Copy-on-write: the partial block's rows in every layer (one span).
    const int32_t shared = s.blocks[partial];
    const int32_t copy = TakeBlock();
    ref_[static_cast<size_t>(copy)] = 1;
    std::memcpy(BlockRows(copy, 0), BlockRows(shared, 0), BlockBytes());
    Release(shared);
    s.blocks[partial] = copy;
  }
  while (static_cast<int64_t>(s.blocks.size()) < BlocksFor(tokens)) {
    const int32_t b = TakeBlock();
    ref_[static_cast<size_t>(b)] = 1;
    s.blocks.push_back(b);
    if (s.reserved_blocks > 0) ++reserved_attached_;
  }
  return absl::OkStatus();
}

void KvCache::Free(int32_t seq) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return;
  // Last block first: the end of a prefix is evicted before its start.
  for (auto b = it->second.blocks.rbegin(); b != it->second.blocks.rend(); ++b) Release(*b);
  reserved_blocks_ -= it->second.reserved_blocks;
  if (it->second.reserved_blocks > 0) {
    reserved_attached_ -= static_cast<int64_t>(it->second.blocks.size());
  }
  seqs_.erase(it);
}

}  // namespace dmoe::core
