// The block-paged KV cache (kv_cache.h): geometry, reservations in whole
// blocks, blocks attached as sequences grow and reused after Free, rows that
// never alias between sequences, and errors that name the sizes.
#include "core/kv_cache.h"

#include <set>
#include <vector>

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

}  // namespace
}  // namespace dmoe::core
