#include "core/safetensors.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "testing/files.h"

namespace dmoe::core {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

// A fresh directory per test under DMOE_TEST_TMP (set by CTest) or gtest's
// TempDir.
std::string TestDir() { return testing::FreshDir("safetensors"); }

void WriteBytes(const std::string& path, const std::string& bytes) {
  ASSERT_TRUE(testing::WriteFile(path, bytes)) << path;
}

// A raw safetensors file: 8-byte little-endian length, header text, data bytes.
std::string RawFile(const std::string& header, const std::string& data,
                    uint64_t header_len_override = 0) {
  uint64_t len = header_len_override ? header_len_override : header.size();
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((len >> (8 * i)) & 0xff);
  return out + header + data;
}

template <typename T>
void WriteTensor(SafetensorsWriter& w, const std::string& name, const std::vector<T>& v) {
  ASSERT_TRUE(w.Write(name, v.data(), v.size() * sizeof(T)).ok()) << name;
}

// ---------------------------------------------------------------------------
// Round trips

TEST(ShapeStringTest, FormatsWithCommaSpace) {
  const std::vector<int64_t> s = {1408, 2048};
  EXPECT_EQ(ShapeString(s), "[1408, 2048]");
  EXPECT_EQ(ShapeString(std::vector<int64_t>{}), "[]");
  TensorView t;
  t.shape = {3, 4, 5};
  EXPECT_EQ(t.NumElements(), 60);
}

TEST(SafetensorsRoundTrip, EveryDtypeWithMetadata) {
  const std::string path = TestDir() + "/all.safetensors";
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-3.0f, 3.0f);
  std::vector<float> f32(6 * 5);
  for (float& x : f32) x = u(rng);
  // BF16/F16/F8 are given as bit patterns, so the expected floats are exact.
  std::vector<uint16_t> bf16(7), f16(7);
  for (size_t i = 0; i < bf16.size(); ++i) {
    bf16[i] = F32ToBF16(u(rng));
    f16[i] = static_cast<uint16_t>(0x3c00 + 37 * i);  // 1.0 and up
  }
  f16[0] = 0x0001;  // smallest subnormal
  f16[1] = 0xc000;  // -2
  std::vector<uint8_t> f8(3 * 4);
  for (size_t i = 0; i < f8.size(); ++i) f8[i] = static_cast<uint8_t>((i * 19) % 0x7e);
  std::vector<float> scale = {0.5f};

  {
    auto w = SafetensorsWriter::Create(path,
                                       {{"a.f32", DType::kF32, {6, 5}},
                                        {"b.bf16", DType::kBF16, {7}},
                                        {"c.f16", DType::kF16, {7, 1}},
                                        {"d.f8", DType::kF8E4M3, {3, 4}},
                                        {"d.f8_scale_inv", DType::kF32, {1, 1}},
                                        {"e.empty", DType::kF32, {0, 4}}},
                                       {{"format", "pt"}});
    ASSERT_TRUE(w.ok()) << w.status();
    WriteTensor(**w, "a.f32", f32);
    WriteTensor(**w, "b.bf16", bf16);
    WriteTensor(**w, "c.f16", f16);
    WriteTensor(**w, "d.f8", f8);
    WriteTensor(**w, "d.f8_scale_inv", scale);
    ASSERT_TRUE((*w)->Write("e.empty", nullptr, 0).ok());
    ASSERT_TRUE((*w)->Finish().ok());
  }
  // The header is padded to a multiple of 8 so the data section stays aligned.
  {
    std::ifstream in(path, std::ios::binary);
    uint8_t len[8];
    in.read(reinterpret_cast<char*>(len), 8);
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | len[i];
    EXPECT_EQ(n % 8, 0u);
  }

  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->metadata().at("format"), "pt");
  EXPECT_EQ((*file)->tensors().size(), 6u);
  const TensorView* a = (*file)->Find("a.f32");
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->dtype, DType::kF32);
  EXPECT_EQ(a->shape, (std::vector<int64_t>{6, 5}));
  EXPECT_EQ(a->nbytes, 120u);
  EXPECT_EQ(std::memcmp(a->data, f32.data(), 120), 0);
  EXPECT_EQ((*file)->Find("nope"), nullptr);
  (*file)->Release(*a);  // pages come back from the file on the next read
  EXPECT_EQ(std::memcmp(a->data, f32.data(), 120), 0);

  auto ckpt = Checkpoint::Open(fs::path(path).parent_path().string());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_TRUE((*ckpt)->Has("b.bf16"));
  EXPECT_EQ((*ckpt)->TensorNames().size(), 6u);
  EXPECT_EQ((*ckpt)->TotalBytes(), 120u + 14 + 14 + 12 + 4);

  const std::vector<int64_t> s65 = {6, 5};
  auto ra = (*ckpt)->ReadF32("a.f32", s65);
  ASSERT_TRUE(ra.ok()) << ra.status();
  EXPECT_EQ(*ra, f32);

  const std::vector<int64_t> s7 = {7};
  auto rb = (*ckpt)->ReadF32("b.bf16", s7);
  ASSERT_TRUE(rb.ok()) << rb.status();
  for (size_t i = 0; i < bf16.size(); ++i) EXPECT_EQ((*rb)[i], BF16ToF32(bf16[i])) << i;

  const std::vector<int64_t> s71 = {7, 1};
  auto rc = (*ckpt)->ReadF32("c.f16", s71);
  ASSERT_TRUE(rc.ok()) << rc.status();
  EXPECT_EQ((*rc)[0], std::ldexp(1.0f, -24));
  EXPECT_EQ((*rc)[1], -2.0f);
  for (size_t i = 2; i < f16.size(); ++i) EXPECT_EQ((*rc)[i], F16ToF32(f16[i])) << i;

  const std::vector<int64_t> s34 = {3, 4};
  auto rd = (*ckpt)->ReadF32("d.f8", s34);
  ASSERT_TRUE(rd.ok()) << rd.status();
  for (size_t i = 0; i < f8.size(); ++i) EXPECT_EQ((*rd)[i], F8E4M3ToF32(f8[i]) * 0.5f) << i;

  const std::vector<int64_t> s04 = {0, 4};
  auto re = (*ckpt)->ReadF32("e.empty", s04);
  ASSERT_TRUE(re.ok()) << re.status();
  EXPECT_TRUE(re->empty());

  // Rows 2..4 of the F32 tensor.
  std::vector<float> rows(3 * 5);
  ASSERT_TRUE((*ckpt)->ReadRowsF32("a.f32", s65, 2, 3, rows.data()).ok());
  for (int i = 0; i < 15; ++i) EXPECT_EQ(rows[i], f32[10 + i]);
  auto bad_rows = (*ckpt)->ReadRowsF32("a.f32", s65, 4, 3, rows.data());
  EXPECT_EQ(bad_rows.code(), absl::StatusCode::kOutOfRange);
  EXPECT_THAT(bad_rows.message(), HasSubstr("a.f32"));
}

TEST(SafetensorsWriterTest, RejectsOutOfOrderWrongSizeAndMissingWrites) {
  const std::string path = TestDir() + "/w.safetensors";
  auto w = SafetensorsWriter::Create(path, {{"x", DType::kF32, {2}}, {"y", DType::kBF16, {3}}});
  ASSERT_TRUE(w.ok()) << w.status();
  std::vector<float> x = {1, 2};
  std::vector<uint16_t> y = {1, 2, 3};

  absl::Status s = (*w)->Write("y", y.data(), 6);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(), HasSubstr("next declared is 'x'"));

  s = (*w)->Write("x", x.data(), 4);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("tensor 'x': 4 bytes given"));

  ASSERT_TRUE((*w)->Write("x", x.data(), 8).ok());
  s = (*w)->Finish();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(), HasSubstr("next is 'y'"));

  auto dup = SafetensorsWriter::Create(path, {{"x", DType::kF32, {2}}, {"x", DType::kF32, {2}}});
  EXPECT_EQ(dup.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(dup.status().message(), HasSubstr("'x' declared twice"));
}

// ---------------------------------------------------------------------------
// FP8 block dequantisation

void CheckFp8Dequant(DType scale_dtype) {
  const std::string dir = TestDir();
  const int64_t rows = 130,
                cols = 200;  // not multiples of 128: partial edge blocks
  const int64_t srows = 2, scols = 2;
  std::mt19937 rng(123);
  std::vector<uint8_t> q(rows * cols);
  for (auto& v : q) {
    v = static_cast<uint8_t>(rng() & 0xff);
    if ((v & 0x7f) == 0x7f) v = 0x00;  // no NaN codes
  }
  std::vector<float> scales = {0.5f, 0.001953125f, 3.0f, 1.25e-3f};
  std::vector<uint16_t> scales_bf16(4);
  for (int i = 0; i < 4; ++i) {
    scales_bf16[i] = F32ToBF16(scales[i]);
    if (scale_dtype == DType::kBF16) scales[i] = BF16ToF32(scales_bf16[i]);
  }
  {
    auto w = SafetensorsWriter::Create(
        dir + "/model.safetensors",
        {{"w", DType::kF8E4M3, {rows, cols}}, {"w_scale_inv", scale_dtype, {srows, scols}}});
    ASSERT_TRUE(w.ok()) << w.status();
    WriteTensor(**w, "w", q);
    if (scale_dtype == DType::kBF16) {
      WriteTensor(**w, "w_scale_inv", scales_bf16);
    } else {
      WriteTensor(**w, "w_scale_inv", scales);
    }
    ASSERT_TRUE((*w)->Finish().ok());
  }
  auto ckpt = Checkpoint::Open(dir);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  const std::vector<int64_t> shape = {rows, cols};
  auto got = (*ckpt)->ReadF32("w", shape);
  ASSERT_TRUE(got.ok()) << got.status();
  // Reference in double: value * scale of its 128x128 block. One float product
  // is correctly rounded, so the float result is within half an ulp of the
  // reference.
  auto ref = [&](int64_t r, int64_t c) {
    return static_cast<double>(F8E4M3ToF32(q[r * cols + c])) *
           static_cast<double>(scales[(r / 128) * scols + c / 128]);
  };
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const double want = ref(r, c);
      ASSERT_NEAR((*got)[r * cols + c], want, std::fabs(want) * 1e-7) << r << "," << c;
    }
  }
  // Rows across the block boundary (120..129) read the same values.
  std::vector<float> part(10 * cols);
  ASSERT_TRUE((*ckpt)->ReadRowsF32("w", shape, 120, 10, part.data()).ok());
  for (int64_t i = 0; i < 10 * cols; ++i) EXPECT_EQ(part[i], (*got)[120 * cols + i]) << i;

  // A 64x64 block size needs a [3, 4] scale tensor: the [2, 2] one is rejected.
  (*ckpt)->set_fp8_block(64, 64);
  auto bad = (*ckpt)->ReadF32("w", shape);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(),
              HasSubstr("tensor 'w_scale_inv': shape [2, 2], expected [3, 4]"));
}

TEST(Fp8Dequant, BlockScalesF32NonMultipleOf128) { CheckFp8Dequant(DType::kF32); }
TEST(Fp8Dequant, BlockScalesBF16) { CheckFp8Dequant(DType::kBF16); }

TEST(Fp8Dequant, MissingScaleInvIsNamed) {
  const std::string dir = TestDir();
  std::vector<uint8_t> q(4 * 4, 0x38);
  auto w = SafetensorsWriter::Create(dir + "/model.safetensors",
                                     {{"layer.up_proj.weight", DType::kF8E4M3, {4, 4}}});
  ASSERT_TRUE(w.ok());
  WriteTensor(**w, "layer.up_proj.weight", q);
  ASSERT_TRUE((*w)->Finish().ok());
  auto ckpt = Checkpoint::Open(dir);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  const std::vector<int64_t> shape = {4, 4};
  auto got = (*ckpt)->ReadF32("layer.up_proj.weight", shape);
  EXPECT_EQ(got.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(got.status().message(), HasSubstr("'layer.up_proj.weight_scale_inv'"));
}

// ---------------------------------------------------------------------------
// Checkpoints

// Writes `names` (F32 [2, 3], value = index) into `file`.
void WriteShard(const std::string& path, const std::vector<std::string>& names) {
  std::vector<SafetensorsWriter::Decl> decls;
  for (const auto& n : names) decls.push_back({n, DType::kF32, {2, 3}});
  auto w = SafetensorsWriter::Create(path, decls);
  ASSERT_TRUE(w.ok()) << w.status();
  for (size_t i = 0; i < names.size(); ++i) {
    std::vector<float> v(6, static_cast<float>(i));
    WriteTensor(**w, names[i], v);
  }
  ASSERT_TRUE((*w)->Finish().ok());
}

void WriteIndex(const std::string& dir, const nlohmann::json& weight_map) {
  nlohmann::json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", weight_map}};
  WriteBytes(dir + "/model.safetensors.index.json", index.dump(2));
}

TEST(CheckpointTest, ShardedViaIndex) {
  const std::string dir = TestDir();
  WriteShard(dir + "/model-00001-of-00002.safetensors", {"a", "b"});
  WriteShard(dir + "/model-00002-of-00002.safetensors", {"c"});
  WriteShard(dir + "/unrelated.safetensors", {"z"});  // not in the index: ignored
  WriteIndex(dir, {{"a", "model-00001-of-00002.safetensors"},
                   {"b", "model-00001-of-00002.safetensors"},
                   {"c", "model-00002-of-00002.safetensors"}});
  auto ckpt = Checkpoint::Open(dir);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_EQ((*ckpt)->TensorNames(), (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_FALSE((*ckpt)->Has("z"));
  EXPECT_EQ((*ckpt)->TotalBytes(), 3u * 24);
  const std::vector<int64_t> shape = {2, 3};
  auto b = (*ckpt)->ReadF32("b", shape);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(*b, std::vector<float>(6, 1.0f));
  auto c = (*ckpt)->ReadF32("c", shape);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(*c, std::vector<float>(6, 0.0f));
  (*ckpt)->Release("c");
}

TEST(CheckpointTest, WithoutIndexUsesAllSafetensorsFiles) {
  const std::string dir = TestDir();
  WriteShard(dir + "/b.safetensors", {"y"});
  WriteShard(dir + "/a.safetensors", {"x"});
  WriteBytes(dir + "/config.json", "{}");
  auto ckpt = Checkpoint::Open(dir);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_EQ((*ckpt)->TensorNames(), (std::vector<std::string>{"x", "y"}));
}

TEST(CheckpointTest, DuplicateTensorAcrossShards) {
  const std::string dir = TestDir();
  WriteShard(dir + "/a.safetensors", {"x", "dup"});
  WriteShard(dir + "/b.safetensors", {"dup"});
  auto ckpt = Checkpoint::Open(dir);
  EXPECT_EQ(ckpt.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(ckpt.status().message(), HasSubstr("tensor 'dup' is in both"));
}

TEST(CheckpointTest, EmptyDirIsNotFound) {
  const std::string dir = TestDir();
  auto ckpt = Checkpoint::Open(dir);
  EXPECT_EQ(ckpt.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(ckpt.status().message(), HasSubstr("no safetensors files in " + dir));
  auto missing = Checkpoint::Open(dir + "/does-not-exist");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
}

TEST(CheckpointTest, IndexPointingToMissingShard) {
  const std::string dir = TestDir();
  WriteShard(dir + "/model-00001-of-00002.safetensors", {"a"});
  WriteIndex(
      dir, {{"a", "model-00001-of-00002.safetensors"}, {"b", "model-00002-of-00002.safetensors"}});
  auto ckpt = Checkpoint::Open(dir);
  EXPECT_EQ(ckpt.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(ckpt.status().message(), HasSubstr("shard model-00002-of-00002.safetensors"));
  EXPECT_THAT(ckpt.status().message(), HasSubstr("'b'"));
}

TEST(CheckpointTest, IndexListsTensorMissingFromShard) {
  const std::string dir = TestDir();
  WriteShard(dir + "/model-00001-of-00001.safetensors", {"a"});
  WriteIndex(dir, {{"a", "model-00001-of-00001.safetensors"},
                   {"ghost", "model-00001-of-00001.safetensors"}});
  auto ckpt = Checkpoint::Open(dir);
  EXPECT_EQ(ckpt.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(ckpt.status().message(), HasSubstr("tensor 'ghost'"));
  EXPECT_THAT(ckpt.status().message(), HasSubstr("model-00001-of-00001.safetensors"));
}

TEST(CheckpointTest, IndexShardNameMustStayInDirectory) {
  const std::string dir = TestDir();
  WriteIndex(dir, {{"a", "../evil.safetensors"}});
  auto ckpt = Checkpoint::Open(dir);
  EXPECT_EQ(ckpt.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(ckpt.status().message(), HasSubstr("weight_map['a']"));
}

TEST(CheckpointTest, ReadF32WrongShapeAndMissingTensor) {
  const std::string dir = TestDir();
  WriteShard(dir + "/model.safetensors", {"model.norm.weight"});
  auto ckpt = Checkpoint::Open(dir);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  const std::vector<int64_t> wrong = {3, 2};
  auto r = (*ckpt)->ReadF32("model.norm.weight", wrong);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(),
              HasSubstr("tensor 'model.norm.weight': shape [2, 3], expected [3, 2]"));
  std::vector<float> buf(6);
  absl::Status rows = (*ckpt)->ReadRowsF32("model.norm.weight", wrong, 0, 1, buf.data());
  EXPECT_THAT(rows.message(), HasSubstr("shape [2, 3], expected [3, 2]"));

  auto m = (*ckpt)->ReadF32("lm_head.weight", wrong);
  EXPECT_EQ(m.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(m.status().message(),
              HasSubstr("tensor 'lm_head.weight' not found in checkpoint " + dir));
}

// ---------------------------------------------------------------------------
// Malformed files: each gives InvalidArgument naming the file and the
// tensor/key.

class BadFileTest : public ::testing::Test {
 protected:
  void SetUp() override { path_ = TestDir() + "/bad.safetensors"; }
  absl::Status OpenRaw(const std::string& bytes) {
    WriteBytes(path_, bytes);
    return SafetensorsFile::Open(path_).status();
  }
  void ExpectInvalid(const std::string& bytes, const std::string& substr) {
    absl::Status s = OpenRaw(bytes);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_THAT(s.message(), HasSubstr(path_)) << s;
    EXPECT_THAT(s.message(), HasSubstr(substr)) << s;
  }
  std::string path_;
};

TEST_F(BadFileTest, MissingFileIsNotFound) {
  auto f = SafetensorsFile::Open(path_ + ".missing");
  EXPECT_EQ(f.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(f.status().message(), HasSubstr("bad.safetensors.missing"));
}

TEST_F(BadFileTest, ShorterThanEightBytes) { ExpectInvalid("abc", "shorter than the 8-byte"); }

TEST_F(BadFileTest, HeaderLengthLongerThanFile) {
  const std::string header = R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})";
  const std::string bytes = RawFile(header, "abcd", 1000);
  ExpectInvalid(bytes, "header length 1000 exceeds file size " + std::to_string(bytes.size()));
  // A huge length must not overflow the comparison.
  ExpectInvalid(RawFile(header, "abcd", ~uint64_t{0}), "exceeds file size");
}

TEST_F(BadFileTest, TruncatedData) {
  // Header promises 2x4 F32 (32 bytes) but the file was cut after 20.
  const std::string header = R"({"w":{"dtype":"F32","shape":[2,4],"data_offsets":[0,32]}})";
  ExpectInvalid(RawFile(header, std::string(20, '\0')),
                "tensor 'w': offsets [0, 32) out of range of data section (20 bytes)");
}

TEST_F(BadFileTest, HeaderNotJson) {
  ExpectInvalid(RawFile("{\"w\": {", ""), "header is not valid JSON");
  ExpectInvalid(RawFile("[1, 2]", ""), "expected an object");
}

TEST_F(BadFileTest, EntryMissingKeysOrWrongTypes) {
  ExpectInvalid(RawFile(R"({"w":{"dtype":"F32","shape":[1]}})", "abcd"),
                "tensor 'w': missing 'data_offsets'");
  ExpectInvalid(RawFile(R"({"w":{"dtype":7,"shape":[1],"data_offsets":[0,4]}})", "abcd"),
                "tensor 'w': 'dtype' is a JSON number");
  ExpectInvalid(RawFile(R"({"w":{"dtype":"F32","shape":"1","data_offsets":[0,4]}})", "abcd"),
                "tensor 'w': 'shape' is a JSON string");
  ExpectInvalid(RawFile(R"({"w":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}})", "abcd"),
                "tensor 'w': 'shape' has a non-integer");
  ExpectInvalid(RawFile(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0]}})", "abcd"),
                "tensor 'w': 'data_offsets' must be an array of 2");
  ExpectInvalid(RawFile(R"({"w":[1]})", "abcd"), "tensor 'w': entry is a JSON array");
  ExpectInvalid(RawFile(R"({"__metadata__":{"k":1}})", ""), "'__metadata__' key 'k'");
}

TEST_F(BadFileTest, UnsupportedDtype) {
  ExpectInvalid(
      RawFile(R"({"ids":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}})", std::string(8, '\0')),
      "tensor 'ids': unsupported dtype 'I64'");
}

TEST_F(BadFileTest, NegativeDimAndReversedOffsets) {
  ExpectInvalid(RawFile(R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", "abcd"),
                "tensor 'w': 'shape' has a negative");
  ExpectInvalid(RawFile(R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[4,0]}})", "abcd"),
                "tensor 'w': data_offsets [4, 0) has begin > end");
}

TEST_F(BadFileTest, OffsetsOutOfRange) {
  ExpectInvalid(
      RawFile(R"({"w":{"dtype":"BF16","shape":[2],"data_offsets":[8,12]}})", std::string(10, '\0')),
      "tensor 'w': offsets [8, 12) out of range of data section (10 bytes)");
}

TEST_F(BadFileTest, SizeDoesNotMatchShape) {
  ExpectInvalid(RawFile(R"({"w":{"dtype":"BF16","shape":[1408,2],"data_offsets":[0,8]}})",
                        std::string(8, '\0')),
                "tensor 'w': shape [1408, 2] BF16 needs 5632 bytes, data_offsets give 8");
}

TEST_F(BadFileTest, NumelOverflow) {
  ExpectInvalid(
      RawFile(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}})", ""),
      "tensor 'w': shape [4294967296, 4294967296] F32 overflows");
}

TEST_F(BadFileTest, OverlappingTensors) {
  ExpectInvalid(RawFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                        R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                        std::string(12, '\0')),
                "tensors 'a' and 'b' overlap");
  // b nested inside a long tensor a that starts earlier.
  ExpectInvalid(RawFile(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                        R"("c":{"dtype":"F32","shape":[1],"data_offsets":[12,16]},)"
                        R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                        std::string(16, '\0')),
                "tensors 'a' and 'b' overlap");
}

TEST_F(BadFileTest, CheckpointOpenReportsBadShard) {
  const std::string dir = fs::path(path_).parent_path().string();
  WriteBytes(path_, RawFile(R"({"ids":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}})",
                            std::string(8, '\0')));
  auto ckpt = Checkpoint::Open(dir);
  EXPECT_EQ(ckpt.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(ckpt.status().message(), HasSubstr("bad.safetensors"));
  EXPECT_THAT(ckpt.status().message(), HasSubstr("unsupported dtype 'I64'"));
}

// The in-memory entry points (fuzz/) validate exactly as the file ones.
TEST(SafetensorsFromBytes, SameValidationAsOpenNamedAfterTheGivenName) {
  const std::string header =
      R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"__metadata__":{"k":"v"}})";
  auto file = SafetensorsFile::FromBytes(RawFile(header, "abcd"), "mem.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  ASSERT_NE((*file)->Find("a"), nullptr);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>((*file)->Find("a")->data), 4), "abcd");
  EXPECT_EQ((*file)->metadata().at("k"), "v");

  auto bad = SafetensorsFile::FromBytes(RawFile(header, "abc"), "mem.safetensors");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("mem.safetensors: tensor 'a': offsets [0, 4)"));
  auto short_file = SafetensorsFile::FromBytes("1234567");
  EXPECT_THAT(short_file.status().message(), HasSubstr("shorter than the 8-byte header length"));
}

TEST(SafetensorsIndex, ParsesWeightMapAndNamesThePath) {
  auto shards = ParseSafetensorsIndex(
      R"({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors", "c": "s1.safetensors"}})",
      "idx.json");
  ASSERT_TRUE(shards.ok()) << shards.status();
  EXPECT_EQ((*shards)["s1.safetensors"], (std::vector<std::string>{"a", "c"}));
  EXPECT_EQ((*shards)["s2.safetensors"], (std::vector<std::string>{"b"}));
  auto bad = ParseSafetensorsIndex(R"({"weight_map": {"a": "../x"}})", "idx.json");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("idx.json: weight_map['a']: shard name '../x'"));
  EXPECT_THAT(ParseSafetensorsIndex("[1]", "idx.json").status().message(),
              HasSubstr("not a JSON object"));
}

}  // namespace
}  // namespace dmoe::core
