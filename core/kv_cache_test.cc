// The block-paged KV cache (kv_cache.h): geometry, reservations in whole
// blocks, blocks attached as sequences grow and reused after Free, rows that
// never alias between sequences, and errors that name the sizes.
#include "core/kv_cache.h"

#include <cmath>
#include <cstring>
#include <map>
#include <random>
#include <set>
#include <vector>

#include "core/dtype.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace dmoe::core {
namespace {

using ::testing::HasSubstr;

// MLA with a 12-float entry (8 c_kv + 4 rope) over 3 layers: 144 bytes per token.
ModelConfig SmallMla() {
  ModelConfig c;
  c.model_type = ModelType::kDeepseekV2;
  c.kv_lora_rank = 8;
  c.qk_rope_head_dim = 4;
  c.num_hidden_layers = 3;
  return c;
}

TEST(KvCache, GeometryAndBudgetInWholeBlocks) {
  const ModelConfig c = SmallMla();
  KvCache cache(c, 144 * 4 * 10 + 100, /*block_tokens=*/4);  // 10 blocks and a remainder
  EXPECT_EQ(cache.entry_width(), 12);
  EXPECT_EQ(cache.BytesPerToken(), 144u);
  EXPECT_EQ(cache.BlockBytes(), 576u);
  EXPECT_EQ(cache.total_blocks(), 10);
  EXPECT_EQ(cache.free_blocks(), 10);
  EXPECT_EQ(cache.used_blocks(), 0);
  EXPECT_EQ(cache.ReserveBytes(0), 0u);
  EXPECT_EQ(cache.ReserveBytes(1), 576u);
  EXPECT_EQ(cache.ReserveBytes(4), 576u);
  EXPECT_EQ(cache.ReserveBytes(5), 1152u);
  EXPECT_EQ(KvCache(c, 575, 4).total_blocks(), 0);  // under one block: nothing to serve
  EXPECT_THAT(KvCache(c, 575, 4).Allocate(1).status().message(), HasSubstr("0 of the 0 blocks"));
}

// The f16 KV conversion: every f16 value round-trips, the midpoint between
// two neighbours goes to the even one and anything nearer to its neighbour,
// subnormals included; out of range saturates (and is counted); NaN stays NaN.
TEST(F32ToF16Sat, RoundsToNearestEvenAndSaturates) {
  for (uint32_t h = 0; h < 0x10000u; ++h) {
    const uint16_t v = static_cast<uint16_t>(h);
    const float f = F16ToF32(v);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(F16ToF32(F32ToF16Sat(f))));
      continue;
    }
    if (std::isinf(f)) {
      EXPECT_EQ(F32ToF16Sat(f), (h & 0x8000u) | 0x7bffu);
      continue;
    }
    ASSERT_EQ(F32ToF16Sat(f), v) << std::hex << h;
    const uint16_t next = static_cast<uint16_t>(h + 1);
    if ((h & 0x7fffu) >= 0x7bffu) continue;  // the largest finite value has no finite neighbour
    const float g = F16ToF32(next);
    const float mid = static_cast<float>((static_cast<double>(f) + g) / 2);  // exact in f32
    const uint16_t even = (h & 1u) == 0 ? v : next;
    ASSERT_EQ(F32ToF16Sat(mid), even) << std::hex << h;
    ASSERT_EQ(F32ToF16Sat(std::nextafter(mid, f)), v) << std::hex << h;
    ASSERT_EQ(F32ToF16Sat(std::nextafter(mid, g)), next) << std::hex << h;
  }
  EXPECT_EQ(F32ToF16Sat(65504.0f), 0x7bffu);
  EXPECT_EQ(F32ToF16Sat(65519.0f), 0x7bffu);
  EXPECT_EQ(F32ToF16Sat(1e10f), 0x7bffu);
  EXPECT_EQ(F32ToF16Sat(-1e10f), 0xfbffu);
  EXPECT_EQ(F32ToF16Sat(std::ldexp(1.0f, -26)), 0u) << "under half the smallest subnormal";
  EXPECT_EQ(F32ToF16Sat(std::ldexp(1.0f, -25)), 0u) << "half the smallest subnormal: ties to 0";
  EXPECT_EQ(F32ToF16Sat(std::ldexp(1.5f, -25)), 1u);
  const float in[5] = {1.0f, 70000.0f, -65504.0f, -1e30f, 0.5f};
  uint16_t out[5];
  EXPECT_EQ(ConvertF32ToF16Sat(in, 5, out), 2u);
  EXPECT_EQ(F16ToF32(out[1]), 65504.0f);
  EXPECT_EQ(F16ToF32(out[3]), -65504.0f);
}

// bf16 storage: half the bytes per token, twice the blocks in a budget, rows
// written rounded to nearest even and read back as exactly those values.
TEST(KvCache, Bf16RowsTakeHalfTheBytesAndRoundOnce) {
  const ModelConfig c = SmallMla();
  KvCache f32(c, 576 * 10, 4), bf16(c, 576 * 10, 4, false, KvDtype::kBF16);
  EXPECT_EQ(bf16.BytesPerToken(), 72u);
  EXPECT_EQ(bf16.BlockBytes(), 288u);
  EXPECT_EQ(bf16.total_blocks(), 2 * f32.total_blocks());
  const int32_t s = *bf16.Allocate(8);
  ASSERT_TRUE(bf16.Grow(s, 8).ok());
  std::vector<float> entry(12);
  for (int i = 0; i < 12; ++i) entry[i] = 1.0f + static_cast<float>(i) / 3.0f + 1e-3f * i;
  for (int64_t p = 0; p < 8; ++p) bf16.WriteRow(s, 1, p, entry.data());
  entry[0] = 1.00390625f;  // halfway between two bf16 values: rounds to even (1.0)
  bf16.WriteRow(s, 2, 5, entry.data());
  std::vector<float> back(4 * 12);
  bf16.ReadRows(bf16.BlockTable(s)[1], 2, 4, back.data());
  EXPECT_EQ(back[12], 1.0f) << "position 5 is row 1 of the second block";
  for (int i = 1; i < 12; ++i) {
    EXPECT_EQ(back[12 + i], BF16ToF32(F32ToBF16(entry[i])));
    EXPECT_NE(back[12 + i], entry[i]) << "rounded";
  }
  EXPECT_EQ(*static_cast<const uint16_t*>(bf16.RowData(s, 2, 5)), F32ToBF16(1.0f));
  // f16 storage: rounded to f16, saturation counted.
  KvCache f16(c, 576 * 10, 4, false, KvDtype::kF16);
  EXPECT_EQ(f16.BytesPerToken(), 72u);
  EXPECT_EQ(f16.StorageDType(), DType::kF16);
  const int32_t h = *f16.Allocate(4);
  ASSERT_TRUE(f16.Grow(h, 1).ok());
  std::vector<float> big = entry;
  big[3] = 1e6f;
  f16.WriteRow(h, 0, 0, big.data());
  f16.ReadRows(f16.BlockTable(h)[0], 0, 1, back.data());
  EXPECT_EQ(back[3], 65504.0f);
  EXPECT_EQ(back[1], F16ToF32(F32ToF16Sat(big[1])));
  EXPECT_NE(back[1], big[1]);
  EXPECT_EQ(f16.saturated_values(), 1u);
  // f32 storage keeps the values.
  const int32_t t = *f32.Allocate(4);
  ASSERT_TRUE(f32.Grow(t, 1).ok());
  f32.WriteRow(t, 0, 0, entry.data());
  f32.ReadRows(f32.BlockTable(t)[0], 0, 1, back.data());
  EXPECT_TRUE(std::equal(entry.begin(), entry.end(), back.begin()));
}

TEST(KvCache, ReservesWholeBlocksAndRefusesOverTheFreeOnes) {
  KvCache cache(SmallMla(), 576 * 5, 4);
  auto a = cache.Allocate(9);  // 3 blocks
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(cache.free_blocks(), 2);
  EXPECT_EQ(cache.used_blocks(), 0) << "reserved, not yet attached";
  EXPECT_EQ(cache.used_bytes(), 3 * 576u);
  auto b = cache.Allocate(9);
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(b.status().message(), HasSubstr("needs 3 blocks of 4 tokens (1728 bytes)"));
  EXPECT_THAT(b.status().message(), HasSubstr("only 2 of the 5 blocks"));
  EXPECT_EQ(cache.Allocate(0).status().code(), absl::StatusCode::kInvalidArgument);
  cache.Free(*a);
  EXPECT_EQ(cache.free_blocks(), 5);
  EXPECT_TRUE(cache.Allocate(20).ok());  // all 5
  EXPECT_EQ(cache.free_blocks(), 0);
}

TEST(KvCache, GrowAttachesBlocksWithinTheReservationOnly) {
  KvCache cache(SmallMla(), 576 * 8, 4);
  const int32_t s = *cache.Allocate(10);  // 3 blocks reserved
  EXPECT_TRUE(cache.BlockTable(s).empty());
  ASSERT_TRUE(cache.Grow(s, 1).ok());
  EXPECT_EQ(cache.BlockTable(s).size(), 1u);
  ASSERT_TRUE(cache.Grow(s, 4).ok());
  EXPECT_EQ(cache.BlockTable(s).size(), 1u);
  ASSERT_TRUE(cache.Grow(s, 5).ok());
  EXPECT_EQ(cache.BlockTable(s).size(), 2u);
  ASSERT_TRUE(cache.Grow(s, 10).ok());
  EXPECT_EQ(cache.BlockTable(s).size(), 3u);
  EXPECT_EQ(cache.used_blocks(), 3);
  const absl::Status over = cache.Grow(s, 11);
  EXPECT_EQ(over.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(over.message(), HasSubstr("over its reservation of 10"));
  EXPECT_EQ(cache.Grow(12345, 1).code(), absl::StatusCode::kInvalidArgument);
}

// Rows of different positions, layers and sequences never alias; a row's
// address is its block's rows in that layer plus its offset; a freed block is
// the next one attached (LIFO) and keeps nothing of its owner in the table.
TEST(KvCache, RowsNeverAliasAndFreedBlocksAreReused) {
  const ModelConfig c = SmallMla();
  KvCache cache(c, 576 * 6, 4);
  const int32_t a = *cache.Allocate(8), b = *cache.Allocate(8);
  ASSERT_TRUE(cache.Grow(a, 8).ok());
  ASSERT_TRUE(cache.Grow(b, 8).ok());
  std::set<const float*> rows;
  for (int32_t s : {a, b}) {
    for (int64_t l = 0; l < 3; ++l) {
      for (int64_t p = 0; p < 8; ++p) {
        float* r = cache.Row(s, l, p);
        EXPECT_EQ(r, cache.BlockRows(cache.BlockTable(s)[p / 4], l) + (p % 4) * 12);
        EXPECT_TRUE(rows.insert(r).second) << "seq " << s << " layer " << l << " pos " << p;
        for (int i = 0; i < 12; ++i) r[i] = static_cast<float>(s * 1000 + l * 100 + p);
      }
    }
  }
  for (int32_t s : {a, b}) {  // nothing overwrote anything
    for (int64_t l = 0; l < 3; ++l) {
      for (int64_t p = 0; p < 8; ++p) {
        EXPECT_EQ(cache.Row(s, l, p)[11], static_cast<float>(s * 1000 + l * 100 + p));
      }
    }
  }
  const std::vector<int32_t> a_blocks = cache.BlockTable(a);
  cache.Free(a);
  const int32_t d = *cache.Allocate(4);
  ASSERT_TRUE(cache.Grow(d, 1).ok());
  EXPECT_EQ(cache.BlockTable(d)[0], a_blocks[0]) << "the most recently freed block first";
  EXPECT_FALSE(cache.Contains(a));
}

// Writes the rows of positions [Length, n) of `seq` as a function of the
// tokens up to each position (what a model's KV entry depends on), then
// makes them part of the sequence.
float EntryOf(std::span<const int32_t> tokens, int64_t pos, int64_t layer) {
  uint32_t h = 2166136261u + static_cast<uint32_t>(layer);
  for (int64_t i = 0; i <= pos; ++i) h = (h ^ static_cast<uint32_t>(tokens[i])) * 16777619u;
  return static_cast<float>(h % 100003);
}
void Compute(KvCache& cache, int32_t seq, std::span<const int32_t> tokens, int64_t n) {
  ASSERT_TRUE(cache.Grow(seq, n).ok());
  for (int64_t p = cache.Length(seq); p < n; ++p) {
    for (int64_t l = 0; l < 3; ++l) {
      float* r = cache.Row(seq, l, p);
      for (int64_t i = 0; i < cache.entry_width(); ++i) r[i] = EntryOf(tokens, p, l) + i;
    }
  }
  cache.SetLength(seq, n);
}
// Every computed row of `seq` holds what its own tokens give.
void ExpectRows(const KvCache& cache, int32_t seq, std::span<const int32_t> tokens) {
  for (int64_t p = 0; p < cache.Length(seq); ++p) {
    for (int64_t l = 0; l < 3; ++l) {
      const float* r = cache.Row(seq, l, p);
      for (int64_t i = 0; i < cache.entry_width(); ++i) {
        ASSERT_EQ(r[i], EntryOf(tokens, p, l) + i)
            << "seq " << seq << " pos " << p << " layer " << l;
      }
    }
  }
}

TEST(KvCachePrefix, FullBlocksOfACommittedSequenceAreReusedByTheNextOne) {
  KvCache cache(SmallMla(), 576 * 8, 4, /*prefix_cache=*/true);
  const std::vector<int32_t> a = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
  const int32_t s = *cache.AllocateUnreserved(20, a, 9);
  EXPECT_EQ(cache.Length(s), 0) << "nothing cached yet";
  Compute(cache, s, a, 10);
  cache.Commit(s, a);
  EXPECT_EQ(cache.addressed_blocks(), 2) << "two full blocks; the third is partial";
  cache.Free(s);
  EXPECT_EQ(cache.cached_blocks(), 2);
  EXPECT_EQ(cache.used_blocks(), 0);
  EXPECT_EQ(cache.free_blocks(), 8) << "cached blocks no one holds count as free";

  // Same first 6 tokens: one block; same 9: two (capped by the limit).
  std::vector<int32_t> b = {1, 2, 3, 4, 5, 6, 70, 80, 90};
  EXPECT_EQ(cache.MatchPrefix(b, 8).blocks, 1);
  EXPECT_EQ(cache.MatchPrefix(b, 8).unheld, 1);
  EXPECT_EQ(cache.MatchPrefix(a, 9).blocks, 2);
  EXPECT_EQ(cache.MatchPrefix(a, 7).blocks, 1) << "never past the limit";
  std::vector<int32_t> c = {9, 2, 3, 4, 5, 6, 7, 8};
  EXPECT_EQ(cache.MatchPrefix(c, 7).blocks, 0) << "a block is addressed with all before it";
  const int32_t t = *cache.AllocateUnreserved(20, b, 8);
  EXPECT_EQ(cache.Length(t), 4);
  EXPECT_EQ(cache.cached_blocks(), 1);
  ExpectRows(cache, t, b);
  Compute(cache, t, b, 9);
  ExpectRows(cache, t, b);
  cache.Commit(t, b);
  const int32_t u = *cache.AllocateUnreserved(20, a, 9);
  EXPECT_EQ(cache.Length(u), 8);
  EXPECT_EQ(cache.RefCount(cache.BlockTable(u)[0]), 2) << "held by t and u";
  ExpectRows(cache, u, a);
}

TEST(KvCachePrefix, EvictsTheLeastRecentlyReleasedBlocksAndOnlyUnheldOnes) {
  KvCache cache(SmallMla(), 576 * 4, 4, /*prefix_cache=*/true);
  const std::vector<int32_t> a = {1, 1, 1, 1, 2, 2, 2, 2}, b = {3, 3, 3, 3, 4, 4, 4, 4};
  for (const auto* toks : {&a, &b}) {
    const int32_t s = *cache.AllocateUnreserved(8, *toks, 7);
    Compute(cache, s, *toks, 8);
    cache.Commit(s, *toks);
    cache.Free(s);
  }
  EXPECT_EQ(cache.cached_blocks(), 4);
  // a is released first, and a sequence's last block before its first.
  const std::vector<int32_t> x = {9, 9, 9, 9, 9};
  const int32_t s = *cache.AllocateUnreserved(8, x, 4);
  Compute(cache, s, x, 5);  // takes 2 blocks: a's second block, then a's first
  EXPECT_EQ(cache.evictions(), 2u);
  EXPECT_EQ(cache.MatchPrefix(a, 8).blocks, 0);
  EXPECT_EQ(cache.MatchPrefix(b, 8).blocks, 2);
  const int32_t t = *cache.AllocateUnreserved(8, b, 8);  // holds b's blocks
  EXPECT_EQ(cache.free_blocks(), 0);
  EXPECT_FALSE(cache.Grow(s, 9).ok()) << "held cached blocks are never evicted";
  ExpectRows(cache, t, b);
  ExpectRows(cache, s, x);
}

TEST(KvCachePrefix, CommitSharesABlockComputedTwice) {
  KvCache cache(SmallMla(), 576 * 8, 4, /*prefix_cache=*/true);
  const std::vector<int32_t> a = {5, 6, 7, 8, 9};
  const int32_t s = *cache.AllocateUnreserved(8, a, 4), t = *cache.AllocateUnreserved(8, a, 4);
  Compute(cache, s, a, 5);
  Compute(cache, t, a, 5);
  EXPECT_EQ(cache.used_blocks(), 4);
  cache.Commit(s, a);
  cache.Commit(t, a);
  EXPECT_EQ(cache.used_blocks(), 3) << "t's first block is s's now";
  EXPECT_EQ(cache.BlockTable(s)[0], cache.BlockTable(t)[0]);
  ExpectRows(cache, t, a);
}

TEST(KvCacheFork, ForksShareBlocksAndCopyTheSharedPartialBlockOnWrite) {
  KvCache cache(SmallMla(), 576 * 8, 4);
  std::vector<int32_t> a = {1, 2, 3, 4, 5, 6};
  const int32_t s = *cache.AllocateUnreserved(12);
  Compute(cache, s, a, 6);
  const int32_t f = *cache.Fork(s);
  EXPECT_EQ(cache.Length(f), 6);
  EXPECT_EQ(cache.BlockTable(f), cache.BlockTable(s));
  EXPECT_EQ(cache.used_blocks(), 2);
  EXPECT_EQ(cache.BlocksToGrow(f, 7), 1) << "a copy of the shared partial block";
  EXPECT_EQ(cache.BlocksToGrow(f, 9), 2);
  std::vector<int32_t> b = a;
  a.push_back(7);
  b.push_back(70);
  Compute(cache, s, a, 7);
  Compute(cache, f, b, 7);
  EXPECT_EQ(cache.BlockTable(s)[0], cache.BlockTable(f)[0]) << "full blocks stay shared";
  EXPECT_NE(cache.BlockTable(s)[1], cache.BlockTable(f)[1]);
  EXPECT_EQ(cache.used_blocks(), 3);
  ExpectRows(cache, s, a);
  ExpectRows(cache, f, b);
  cache.Free(s);
  ExpectRows(cache, f, b);
  EXPECT_EQ(cache.used_blocks(), 2);
  cache.Free(f);
  EXPECT_EQ(cache.free_blocks(), 8);
  const int32_t r = *cache.Allocate(4);
  EXPECT_EQ(cache.Fork(r).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(cache.Fork(999).status().code(), absl::StatusCode::kInvalidArgument);
}

// Random allocations (with cached prefixes), growth, commits, forks and frees
// over a small pool: every sequence always reads the entries of its own
// tokens, and the block accounting always adds up.
TEST(KvCachePrefix, RandomOperationsKeepEveryRowAndTheAccounting) {
  for (bool prefix : {false, true}) {
    KvCache cache(SmallMla(), 576 * 12, 4, prefix);
    std::mt19937 rng(7);
    std::map<int32_t, std::vector<int32_t>> seqs;  // seq -> its tokens (>= its length)
    auto pick = [&]() { return std::next(seqs.begin(), rng() % seqs.size())->first; };
    for (int op = 0; op < 3000; ++op) {
      const int kind = static_cast<int>(rng() % 6);
      if (kind == 0 || seqs.empty()) {
        std::vector<int32_t> toks;
        const int n = 1 + static_cast<int>(rng() % 14);
        for (int i = 0; i < n; ++i) toks.push_back(static_cast<int32_t>(rng() % 3));  // collisions
        if (cache.free_blocks() < cache.BlocksFor(n)) continue;
        const int32_t s = *cache.AllocateUnreserved(24, toks, n - 1);
        ASSERT_LE(cache.Length(s), n - 1);
        ExpectRows(cache, s, toks);
        Compute(cache, s, toks, n);
        seqs[s] = toks;
      } else if (kind == 1 || kind == 2) {
        const int32_t s = pick();
        std::vector<int32_t>& toks = seqs[s];
        if (cache.Length(s) >= 24) continue;
        const int64_t n = cache.Length(s) + 1;
        if (cache.BlocksToGrow(s, n) > cache.free_blocks()) continue;
        toks.resize(static_cast<size_t>(cache.Length(s)));
        toks.push_back(static_cast<int32_t>(rng() % 3));
        Compute(cache, s, toks, n);
      } else if (kind == 3) {
        const int32_t s = pick();
        cache.Commit(s, seqs[s]);
      } else if (kind == 4) {
        const int32_t s = pick();
        const int32_t f = *cache.Fork(s);
        seqs[f] = seqs[s];
      } else {
        const int32_t s = pick();
        cache.Free(s);
        seqs.erase(s);
      }
      int64_t held = 0;
      std::set<int32_t> distinct;
      for (const auto& [s, toks] : seqs) {
        for (int32_t b : cache.BlockTable(s)) distinct.insert(b);
      }
      for (int32_t b : distinct) held += cache.RefCount(b) > 0 ? 1 : 0;
      ASSERT_EQ(cache.used_blocks(), held) << "op " << op;
      ASSERT_EQ(cache.used_blocks() + cache.free_blocks(), cache.total_blocks()) << "op " << op;
      if (!prefix) {
        ASSERT_EQ(cache.cached_blocks(), 0);
      }
      for (const auto& [s, toks] : seqs) {
        int64_t refs = 0;
        for (int32_t b : cache.BlockTable(s)) refs += cache.RefCount(b) > 0 ? 1 : 0;
        ASSERT_EQ(refs, static_cast<int64_t>(cache.BlockTable(s).size()));
        ExpectRows(cache, s, toks);
      }
    }
    for (const auto& [s, toks] : seqs) cache.Free(s);
    EXPECT_EQ(cache.used_blocks(), 0);
    EXPECT_EQ(cache.free_blocks(), cache.total_blocks());
  }
}

}  // namespace
}  // namespace dmoe::core
