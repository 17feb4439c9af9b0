#include "tools/make_model.h"

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "testing/files.h"
#include "text/chat_template.h"
#include "text/tokenizer.h"
#include "tools/commands.h"
#include "tools/generated_tokenizer.h"

namespace dmoe::tools {
namespace {

namespace fs = std::filesystem;
using core::DType;
using json = nlohmann::json;
using ::testing::HasSubstr;
using testing::ReadFile;

// A fresh directory for the running test (and `sub`).
std::string TestDir(const std::string& sub = "") { return testing::FreshDir(sub); }

json ReadJson(const std::string& path) { return json::parse(ReadFile(path)); }

struct Expected {
  DType dtype;
  std::vector<int64_t> shape;
};

// The tensors a checkpoint of `c` must hold, written from docs/model.md
// independently of make_model.cc's own list.
std::map<std::string, Expected> ExpectedTensors(const json& c, WeightFormat f) {
  const DType plain = f == WeightFormat::kF32   ? DType::kF32
                      : f == WeightFormat::kF16 ? DType::kF16
                                                : DType::kBF16;
  const DType proj = f == WeightFormat::kFP8 ? DType::kF8E4M3 : plain;
  std::map<std::string, Expected> t;
  auto add_proj = [&](const std::string& name, int64_t rows, int64_t cols) {
    t[name] = {proj, {rows, cols}};
    if (f == WeightFormat::kFP8) {
      t[name + "_scale_inv"] = {DType::kF32, {(rows + 127) / 128, (cols + 127) / 128}};
    }
  };
  const int64_t V = c["vocab_size"], H = c["hidden_size"], I = c["intermediate_size"];
  const int64_t MI = c["moe_intermediate_size"], L = c["num_hidden_layers"];
  const int64_t heads = c["num_attention_heads"], R = c["n_routed_experts"];
  const int64_t S = c["n_shared_experts"], fk = c["first_k_dense_replace"];
  const int64_t freq = c["moe_layer_freq"];
  const std::string type = c["model_type"];
  t["model.embed_tokens.weight"] = {plain, {V, H}};
  t["lm_head.weight"] = {plain, {V, H}};
  t["model.norm.weight"] = {plain, {H}};
  for (int64_t i = 0; i < L; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    t[p + "input_layernorm.weight"] = {plain, {H}};
    t[p + "post_attention_layernorm.weight"] = {plain, {H}};
    if (type == "deepseek") {
      const int64_t hd = H / heads, kvh = c["num_key_value_heads"];
      add_proj(p + "self_attn.q_proj.weight", heads * hd, H);
      add_proj(p + "self_attn.k_proj.weight", kvh * hd, H);
      add_proj(p + "self_attn.v_proj.weight", kvh * hd, H);
      add_proj(p + "self_attn.o_proj.weight", H, heads * hd);
    } else {
      const int64_t nope = c["qk_nope_head_dim"], rope = c["qk_rope_head_dim"];
      const int64_t v = c["v_head_dim"], kvl = c["kv_lora_rank"];
      if (c["q_lora_rank"].is_null()) {
        add_proj(p + "self_attn.q_proj.weight", heads * (nope + rope), H);
      } else {
        const int64_t ql = c["q_lora_rank"];
        add_proj(p + "self_attn.q_a_proj.weight", ql, H);
        t[p + "self_attn.q_a_layernorm.weight"] = {plain, {ql}};
        add_proj(p + "self_attn.q_b_proj.weight", heads * (nope + rope), ql);
      }
      add_proj(p + "self_attn.kv_a_proj_with_mqa.weight", kvl + rope, H);
      t[p + "self_attn.kv_a_layernorm.weight"] = {plain, {kvl}};
      add_proj(p + "self_attn.kv_b_proj.weight", heads * (nope + v), kvl);
      add_proj(p + "self_attn.o_proj.weight", H, heads * v);
    }
    if (i >= fk && i % freq == 0) {
      t[p + "mlp.gate.weight"] = {plain, {R, H}};
      if (type == "deepseek_v3") {
        t[p + "mlp.gate.e_score_correction_bias"] = {
            f == WeightFormat::kF16 ? DType::kF16 : DType::kF32, {R}};
      }
      for (int64_t e = 0; e < R; ++e) {
        const std::string x = p + "mlp.experts." + std::to_string(e) + ".";
        add_proj(x + "gate_proj.weight", MI, H);
        add_proj(x + "up_proj.weight", MI, H);
        add_proj(x + "down_proj.weight", H, MI);
      }
      add_proj(p + "mlp.shared_experts.gate_proj.weight", S * MI, H);
      add_proj(p + "mlp.shared_experts.up_proj.weight", S * MI, H);
      add_proj(p + "mlp.shared_experts.down_proj.weight", H, S * MI);
    } else {
      add_proj(p + "mlp.gate_proj.weight", I, H);
      add_proj(p + "mlp.up_proj.weight", I, H);
      add_proj(p + "mlp.down_proj.weight", H, I);
    }
  }
  return t;
}

void ExpectCheckpointMatches(const std::string& dir, WeightFormat f) {
  const json c = ReadJson(dir + "/config.json");
  auto ckpt = core::Checkpoint::Open(dir);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  const auto expected = ExpectedTensors(c, f);
  std::vector<std::string> want_names;
  for (const auto& [name, e] : expected) want_names.push_back(name);
  EXPECT_EQ((*ckpt)->TensorNames(), want_names);
  for (const auto& [name, e] : expected) {
    auto t = (*ckpt)->Get(name);
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_EQ(t->dtype, e.dtype) << name;
    EXPECT_EQ(t->shape, e.shape) << name;
  }
  // Every weight reads back as float; norms sit around 1, the rest is small.
  for (const auto& [name, e] : expected) {
    auto v = (*ckpt)->ReadF32(name, e.shape);
    ASSERT_TRUE(v.ok()) << v.status();
    const bool norm = name.find("norm") != std::string::npos;
    for (float x : *v) {
      ASSERT_TRUE(std::isfinite(x)) << name;
      if (norm) {
        ASSERT_GE(x, 0.89f) << name;
        ASSERT_LE(x, 1.11f) << name;
      } else if (name.find("_scale_inv") == std::string::npos) {
        ASSERT_LE(std::fabs(x), 1.0f) << name;
      }
    }
  }
}

void ExpectCommonConfigKeys(const json& c) {
  for (const char* key : {"architectures",
                          "model_type",
                          "vocab_size",
                          "hidden_size",
                          "intermediate_size",
                          "moe_intermediate_size",
                          "num_hidden_layers",
                          "num_attention_heads",
                          "num_key_value_heads",
                          "n_routed_experts",
                          "n_shared_experts",
                          "num_experts_per_tok",
                          "first_k_dense_replace",
                          "moe_layer_freq",
                          "scoring_func",
                          "norm_topk_prob",
                          "torch_dtype",
                          "bos_token_id",
                          "eos_token_id",
                          "tie_word_embeddings",
                          "max_position_embeddings",
                          "rms_norm_eps",
                          "rope_theta",
                          "rope_scaling",
                          "hidden_act",
                          "attention_bias"}) {
    EXPECT_TRUE(c.contains(key)) << key;
  }
  EXPECT_EQ(c["hidden_act"], "silu");
  EXPECT_EQ(c["tie_word_embeddings"], false);
  EXPECT_EQ(c["attention_bias"], false);
  EXPECT_EQ(c["torch_dtype"], "bfloat16");
  EXPECT_TRUE(c["architectures"].is_array());
}

MakeModelOptions Options(const std::string& preset, const std::string& dir) {
  MakeModelOptions o;
  o.preset = preset;
  o.out_dir = dir;
  o.seed = 42;
  return o;
}

// ---------------------------------------------------------------------------

TEST(MakeModel, TinyV2LiteLayoutAndConfig) {
  const std::string dir = TestDir();
  MakeModelSummary sum;
  ASSERT_TRUE(WriteRandomModel(Options("tiny-v2lite", dir), &sum).ok());
  EXPECT_EQ(sum.files, (std::vector<std::string>{"config.json", "model.safetensors",
                                                 "tokenizer.json", "tokenizer_config.json"}));
  EXPECT_FALSE(fs::exists(dir + "/model.safetensors.index.json"));
  ExpectCheckpointMatches(dir, WeightFormat::kBF16);
  const json c = ReadJson(dir + "/config.json");
  ExpectCommonConfigKeys(c);
  EXPECT_EQ(c["model_type"], "deepseek_v2");
  EXPECT_EQ(c["architectures"][0], "DeepseekV2ForCausalLM");
  ASSERT_TRUE(c.contains("q_lora_rank"));
  EXPECT_TRUE(c["q_lora_rank"].is_null());
  EXPECT_EQ(c["kv_lora_rank"], 32);
  EXPECT_EQ(c["topk_method"], "greedy");
  EXPECT_EQ(c["rope_scaling"]["type"], "yarn");
  EXPECT_EQ(c["rope_scaling"]["mscale_all_dim"], 0.707);
  EXPECT_FALSE(c.contains("quantization_config"));
  EXPECT_EQ(sum.tensors, static_cast<int64_t>(ExpectedTensors(c, WeightFormat::kBF16).size()));
}

TEST(MakeModel, TinyV3LayoutAndConfig) {
  const std::string dir = TestDir();
  ASSERT_TRUE(WriteRandomModel(Options("tiny-v3", dir)).ok());
  ExpectCheckpointMatches(dir, WeightFormat::kBF16);
  const json c = ReadJson(dir + "/config.json");
  ExpectCommonConfigKeys(c);
  EXPECT_EQ(c["model_type"], "deepseek_v3");
  EXPECT_EQ(c["q_lora_rank"], 48);
  EXPECT_EQ(c["topk_method"], "noaux_tc");
  EXPECT_EQ(c["scoring_func"], "sigmoid");
  EXPECT_EQ(c["n_group"], 4);
  EXPECT_EQ(c["topk_group"], 2);
  EXPECT_EQ(c["routed_scaling_factor"], 2.5);
  EXPECT_EQ(c["num_nextn_predict_layers"], 0);
  // The correction bias stays F32 in a BF16 checkpoint.
  auto ckpt = core::Checkpoint::Open(dir);
  ASSERT_TRUE(ckpt.ok());
  auto bias = (*ckpt)->Get("model.layers.1.mlp.gate.e_score_correction_bias");
  ASSERT_TRUE(bias.ok()) << bias.status();
  EXPECT_EQ(bias->dtype, DType::kF32);
}

TEST(MakeModel, TinyMoe16bLayoutAndConfig) {
  const std::string dir = TestDir();
  ASSERT_TRUE(WriteRandomModel(Options("tiny-moe16b", dir)).ok());
  ExpectCheckpointMatches(dir, WeightFormat::kBF16);
  const json c = ReadJson(dir + "/config.json");
  ExpectCommonConfigKeys(c);
  EXPECT_EQ(c["model_type"], "deepseek");
  EXPECT_TRUE(c["rope_scaling"].is_null());
  EXPECT_EQ(c["max_position_embeddings"], 4096);
  EXPECT_FALSE(c.contains("kv_lora_rank"));
}

TEST(MakeModel, F32AndF16Formats) {
  for (WeightFormat f : {WeightFormat::kF32, WeightFormat::kF16}) {
    const std::string dir = TestDir(f == WeightFormat::kF32 ? "f32" : "f16");
    MakeModelOptions o = Options("tiny-v3", dir);
    o.format = f;
    ASSERT_TRUE(WriteRandomModel(o).ok());
    ExpectCheckpointMatches(dir, f);
  }
}

TEST(MakeModel, ThreeShardsWithIndexHoldTheSameTensors) {
  const std::string one = TestDir("one"), three = TestDir("three");
  ASSERT_TRUE(WriteRandomModel(Options("tiny-v2lite", one)).ok());
  MakeModelOptions o = Options("tiny-v2lite", three);
  o.shards = 3;
  MakeModelSummary sum;
  ASSERT_TRUE(WriteRandomModel(o, &sum).ok());
  EXPECT_EQ(sum.files,
            (std::vector<std::string>{
                "config.json", "model-00001-of-00003.safetensors",
                "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors",
                "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"}));
  ExpectCheckpointMatches(three, WeightFormat::kBF16);

  const json index = ReadJson(three + "/model.safetensors.index.json");
  EXPECT_EQ(index["metadata"]["total_size"].get<uint64_t>(), sum.data_bytes);
  std::map<std::string, int> per_shard;
  for (auto it = index["weight_map"].begin(); it != index["weight_map"].end(); ++it) {
    per_shard[it.value().get<std::string>()]++;
  }
  EXPECT_EQ(per_shard.size(), 3u);

  // Sharding does not change any value: each tensor's bytes match the single
  // file.
  auto a = core::Checkpoint::Open(one);
  auto b = core::Checkpoint::Open(three);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ((*a)->TotalBytes(), (*b)->TotalBytes());
  EXPECT_EQ((*a)->TotalBytes(), sum.data_bytes);
  for (const std::string& name : (*a)->TensorNames()) {
    auto ta = (*a)->Get(name);
    auto tb = (*b)->Get(name);
    ASSERT_TRUE(ta.ok() && tb.ok()) << name;
    ASSERT_EQ(ta->nbytes, tb->nbytes);
    EXPECT_EQ(std::memcmp(ta->data, tb->data, ta->nbytes), 0) << name;
  }
}

TEST(MakeModel, SingleFileRunRemovesStaleIndex) {
  const std::string dir = TestDir();
  MakeModelOptions o = Options("tiny-moe16b", dir);
  o.shards = 2;
  ASSERT_TRUE(WriteRandomModel(o).ok());
  ASSERT_TRUE(fs::exists(dir + "/model.safetensors.index.json"));
  o.shards = 1;
  ASSERT_TRUE(WriteRandomModel(o).ok());
  EXPECT_FALSE(fs::exists(dir + "/model.safetensors.index.json"));
  ExpectCheckpointMatches(dir, WeightFormat::kBF16);
}

TEST(MakeModel, Fp8WeightsDequantiseCloseToF32) {
  const std::string fp8_dir = TestDir("fp8"), f32_dir = TestDir("f32");
  MakeModelOptions o = Options("tiny-v3", fp8_dir);
  o.format = WeightFormat::kFP8;
  ASSERT_TRUE(WriteRandomModel(o).ok());
  ExpectCheckpointMatches(fp8_dir, WeightFormat::kFP8);
  const json c = ReadJson(fp8_dir + "/config.json");
  EXPECT_EQ(c["quantization_config"],
            json::parse(
                R"({"activation_scheme":"dynamic","fmt":"e4m3","quant_method":"fp8",
                            "weight_block_size":[128,128]})"));
  EXPECT_EQ(c["torch_dtype"], "bfloat16");

  o.out_dir = f32_dir;
  o.format = WeightFormat::kF32;
  ASSERT_TRUE(WriteRandomModel(o).ok());
  auto q = core::Checkpoint::Open(fp8_dir);
  auto r = core::Checkpoint::Open(f32_dir);
  ASSERT_TRUE(q.ok() && r.ok());
  // o_proj is [64, 64]; kv_b_proj [4*32, 32] = [128, 32]; expert up [32, 64].
  for (const char* name :
       {"model.layers.0.self_attn.o_proj.weight", "model.layers.1.self_attn.kv_b_proj.weight",
        "model.layers.2.mlp.experts.15.up_proj.weight", "model.layers.0.mlp.down_proj.weight"}) {
    auto t = (*r)->Get(name);
    ASSERT_TRUE(t.ok()) << t.status();
    auto want = (*r)->ReadF32(name, t->shape);
    auto got = (*q)->ReadF32(name, t->shape);
    ASSERT_TRUE(want.ok() && got.ok()) << name;
    auto scale = (*q)->Get(std::string(name) + "_scale_inv");
    ASSERT_TRUE(scale.ok());
    const float s = reinterpret_cast<const float*>(scale->data)[0];
    float max_abs = 0.0f;
    for (float w : *want) max_abs = std::max(max_abs, std::fabs(w));
    EXPECT_FLOAT_EQ(s, max_abs / 448.0f) << name;  // one block: scale = max|w| / 448
    for (size_t i = 0; i < want->size(); ++i) {
      // E4M3 keeps 3 mantissa bits: relative error <= 2^-4, plus half the
      // subnormal step.
      const float w = (*want)[i];
      ASSERT_NEAR((*got)[i], w, std::fabs(w) / 16 + s * 0x1p-10f + 1e-7f) << name << " " << i;
    }
  }
}

TEST(MakeModel, SameSeedSameBytesDifferentSeedDifferent) {
  const std::string a = TestDir("a"), b = TestDir("b"), c = TestDir("c");
  ASSERT_TRUE(WriteRandomModel(Options("tiny-moe16b", a)).ok());
  ASSERT_TRUE(WriteRandomModel(Options("tiny-moe16b", b)).ok());
  MakeModelOptions o = Options("tiny-moe16b", c);
  o.seed = 43;
  ASSERT_TRUE(WriteRandomModel(o).ok());
  const std::string fa = ReadFile(a + "/model.safetensors");
  EXPECT_GT(fa.size(), 100000u);
  EXPECT_EQ(fa, ReadFile(b + "/model.safetensors"));
  EXPECT_EQ(ReadFile(a + "/config.json"), ReadFile(b + "/config.json"));
  const std::string fc = ReadFile(c + "/model.safetensors");
  ASSERT_EQ(fa.size(), fc.size());  // same layout ...
  EXPECT_NE(fa, fc);                // ... different values
}

// ---------------------------------------------------------------------------
// The generated tokenizer

std::unique_ptr<text::Tokenizer> LoadTokenizer(const std::string& dir) {
  absl::StatusOr<std::unique_ptr<text::Tokenizer>> t = text::Tokenizer::Load(dir);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? *std::move(t) : nullptr;
}

TEST(GeneratedTokenizer, LoadsRoundTripsAndFillsTheTinyVocabulary) {
  const std::string dir = TestDir();
  ASSERT_TRUE(WriteRandomModel(Options("tiny-v3", dir)).ok());
  const json c = ReadJson(dir + "/config.json");
  EXPECT_EQ(c["vocab_size"], 512);  // unchanged: the tokenizer fits the preset
  EXPECT_EQ(c["bos_token_id"], 0);
  EXPECT_EQ(c["eos_token_id"], 1);
  std::unique_ptr<text::Tokenizer> tok = LoadTokenizer(dir);
  ASSERT_NE(tok, nullptr);
  // 2 special tokens + 256 bytes + 254 merges: every id of the model decodes.
  EXPECT_EQ(tok->vocab_size(), 512);
  for (int32_t id = 0; id < 512; ++id) {
    std::string bytes;
    ASSERT_TRUE(tok->AppendTokenBytes(id, false, &bytes).ok()) << id;
  }
  EXPECT_EQ(tok->bos_token(), kGeneratedBosToken);
  EXPECT_EQ(tok->eos_token(), kGeneratedEosToken);
  EXPECT_EQ(tok->bos_id().value_or(-1), 0);
  EXPECT_EQ(tok->eos_id().value_or(-1), 1);
  EXPECT_TRUE(tok->IsSpecial(0));
  EXPECT_TRUE(tok->IsSpecial(1));
  EXPECT_FALSE(tok->IsSpecial(2));

  for (const std::string text :
       {"Hello, world! The quick brown fox jumps over the lazy dog.",
        "  leading spaces,\ttabs\nand new lines\n\n", "I'm 42 years old; it's 3 o'clock.",
        "na\xC3\xAFve caf\xC3\xA9, \xE6\x9D\xB1\xE4\xBA\xAC, \xF0\x9F\x99\x82",
        "\xD0\x9F\xD1\x80\xD0\xB8\xD0\xB2\xD0\xB5\xD1\x82 "
        "\xE4\xB8\x96\xE7\x95\x8C",
        ""}) {
    absl::StatusOr<std::vector<int32_t>> ids = tok->Encode(text, /*add_special_tokens=*/true);
    ASSERT_TRUE(ids.ok()) << ids.status();
    ASSERT_FALSE(ids->empty());
    EXPECT_EQ((*ids)[0], 0) << "BOS first: add_bos_token";
    absl::StatusOr<std::string> back = tok->Decode(*ids, /*skip_special_tokens=*/true);
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(*back, text);
    absl::StatusOr<std::string> with_bos = tok->Decode(*ids, /*skip_special_tokens=*/false);
    ASSERT_TRUE(with_bos.ok());
    EXPECT_EQ(*with_bos, std::string(kGeneratedBosToken) + text);
  }
  // The special tokens are added tokens: their text encodes to their id.
  absl::StatusOr<std::vector<int32_t>> eos =
      tok->Encode(std::string("a") + std::string(kGeneratedEosToken), false);
  ASSERT_TRUE(eos.ok());
  EXPECT_EQ(eos->back(), 1);
}

TEST(GeneratedTokenizer, MergesFire) {
  const std::string dir = TestDir();
  ASSERT_TRUE(WriteRandomModel(Options("tiny-v2lite", dir)).ok());
  std::unique_ptr<text::Tokenizer> tok = LoadTokenizer(dir);
  ASSERT_NE(tok, nullptr);
  // Frequent words of the corpus are one token each, others fewer than their
  // bytes.
  for (const std::string word : {" the", " and", "The"}) {
    absl::StatusOr<std::vector<int32_t>> ids = tok->Encode(word);
    ASSERT_TRUE(ids.ok());
    EXPECT_EQ(ids->size(), 1u) << word;
  }
  const std::string sentence = "The woman and her son looked at the weather in the morning.";
  absl::StatusOr<std::vector<int32_t>> ids = tok->Encode(sentence);
  ASSERT_TRUE(ids.ok());
  EXPECT_LT(ids->size(), sentence.size() / 2) << "merges should at least halve English text";
  // The full-size presets get every merge the corpus has (their vocabulary is
  // far larger), so English shrinks further; the ids stay below vocab_size.
  absl::StatusOr<GeneratedTokenizer> big = GenerateTokenizer(
      {.vocab_size = 102400, .bos_id = 100000, .eos_id = 100001, .model_max_length = 163840});
  ASSERT_TRUE(big.ok()) << big.status();
  EXPECT_GT(big->merges, 254);
  EXPECT_EQ(big->size, 100002);
  auto big_tok = text::Tokenizer::FromJson(big->tokenizer_json, big->tokenizer_config_json);
  ASSERT_TRUE(big_tok.ok()) << big_tok.status();
  EXPECT_EQ((*big_tok)->bos_id().value_or(-1), 100000);
  EXPECT_EQ((*big_tok)->eos_id().value_or(-1), 100001);
  absl::StatusOr<std::vector<int32_t>> big_ids = (*big_tok)->Encode(sentence);
  ASSERT_TRUE(big_ids.ok());
  EXPECT_LT(big_ids->size(), ids->size());
  EXPECT_EQ(*(*big_tok)->Decode(*big_ids), sentence);
}

TEST(GeneratedTokenizer, IsDeterministic) {
  const std::string a = TestDir("a"), b = TestDir("b");
  ASSERT_TRUE(WriteRandomModel(Options("tiny-v3", a)).ok());
  MakeModelOptions o = Options("tiny-v3", b);
  o.seed = 7;  // the weights' seed does not change the tokenizer
  ASSERT_TRUE(WriteRandomModel(o).ok());
  for (const char* name : {"tokenizer.json", "tokenizer_config.json"}) {
    const std::string fa = ReadFile(a + "/" + name);
    EXPECT_GT(fa.size(), 100u) << name;
    EXPECT_EQ(fa, ReadFile(b + "/" + name)) << name;
  }
  absl::StatusOr<GeneratedTokenizer> x = GenerateTokenizer({.vocab_size = 512});
  absl::StatusOr<GeneratedTokenizer> y = GenerateTokenizer({.vocab_size = 512});
  ASSERT_TRUE(x.ok() && y.ok());
  EXPECT_EQ(x->tokenizer_json, y->tokenizer_json);
  EXPECT_EQ(x->tokenizer_json, ReadFile(a + "/tokenizer.json"));
}

TEST(GeneratedTokenizer, ChatTemplateRendersDeepSeekStyle) {
  const std::string dir = TestDir();
  ASSERT_TRUE(WriteRandomModel(Options("tiny-moe16b", dir)).ok());
  std::unique_ptr<text::Tokenizer> tok = LoadTokenizer(dir);
  ASSERT_NE(tok, nullptr);
  ASSERT_TRUE(text::ChatTemplate::Parse(tok->chat_template()).ok());
  const nlohmann::ordered_json messages =
      nlohmann::ordered_json::array({{{"role", "system"}, {"content", "Be brief."}},
                                     {{"role", "user"}, {"content", "Hi!"}},
                                     {{"role", "assistant"}, {"content", "Hello."}},
                                     {{"role", "user"}, {"content", "Bye."}}});
  absl::StatusOr<std::string> prompt = text::ApplyChatTemplate(*tok, messages, true);
  ASSERT_TRUE(prompt.ok()) << prompt.status();
  const std::string bos(kGeneratedBosToken), eos(kGeneratedEosToken);
  EXPECT_EQ(*prompt,
            bos + "Be brief.\n\nUser: Hi!\n\nAssistant: Hello." + eos + "User: Bye.\n\nAssistant:");
  absl::StatusOr<std::vector<int32_t>> ids = tok->Encode(*prompt);
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(ids->front(), 0);
  EXPECT_NE(std::find(ids->begin(), ids->end(), 1),
            ids->end());  // EOS after the answer
}

TEST(GeneratedTokenizer, NoTokenizerAndCopiedTokenizer) {
  // --no-tokenizer: none written, and none left over from an earlier run.
  const std::string dir = TestDir("none");
  ASSERT_TRUE(WriteRandomModel(Options("tiny-v3", dir)).ok());
  ASSERT_TRUE(fs::exists(dir + "/tokenizer.json"));
  MakeModelOptions o = Options("tiny-v3", dir);
  o.generate_tokenizer = false;
  MakeModelSummary sum;
  ASSERT_TRUE(WriteRandomModel(o, &sum).ok());
  EXPECT_EQ(sum.files, (std::vector<std::string>{"config.json", "model.safetensors"}));
  EXPECT_FALSE(fs::exists(dir + "/tokenizer.json"));
  EXPECT_FALSE(fs::exists(dir + "/tokenizer_config.json"));

  // --tokenizer DIR still copies that one (here: a generated one with other
  // special ids, so the config follows it).
  const std::string src = TestDir("src");
  absl::StatusOr<GeneratedTokenizer> g =
      GenerateTokenizer({.vocab_size = 600, .bos_id = 598, .eos_id = 599});
  ASSERT_TRUE(g.ok()) << g.status();
  std::ofstream(src + "/tokenizer.json") << g->tokenizer_json;
  std::ofstream(src + "/tokenizer_config.json") << g->tokenizer_config_json;
  const std::string copy = TestDir("copy");
  o = Options("tiny-v3", copy);
  o.tokenizer_dir = src;
  ASSERT_TRUE(WriteRandomModel(o).ok());
  EXPECT_EQ(ReadFile(copy + "/tokenizer.json"), g->tokenizer_json);
  const json c = ReadJson(copy + "/config.json");
  EXPECT_EQ(c["vocab_size"], 600);
  EXPECT_EQ(c["bos_token_id"], 598);
  EXPECT_EQ(c["eos_token_id"], 599);
}

TEST(GeneratedTokenizer, BadOptions) {
  auto st = GenerateTokenizer({.vocab_size = 257}).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("at least 258"));
  st = GenerateTokenizer({.vocab_size = 512, .bos_id = 512}).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("bos_token_id 512 is outside the vocabulary [0, 512)"));
  st = GenerateTokenizer({.vocab_size = 512, .bos_id = 3, .eos_id = 3}).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("both 3"));
}

TEST(GeneratedTokenizer, PreTokenizeSplitsLikeTheGpt2Regex) {
  EXPECT_EQ(internal::PreTokenize("Hello world, it's 2024!  Ok\n\nBye  "),
            (std::vector<std::string_view>{"Hello", " world", ",", " it", "'s", " 2024", "!", " ",
                                           " Ok", "\n", "\n", "Bye", "  "}));
  EXPECT_GT(internal::TrainingCorpus().size(), 2000u);
}

TEST(PresetConfig, LayersOverrideKeepsAMoeLayer) {
  auto v3 = PresetConfig("v3", 0);
  ASSERT_TRUE(v3.ok());
  EXPECT_EQ((*v3)["num_hidden_layers"], 61);
  EXPECT_EQ((*v3)["first_k_dense_replace"], 3);
  auto v3_5 = PresetConfig("v3", 5);
  EXPECT_EQ((*v3_5)["num_hidden_layers"], 5);
  EXPECT_EQ((*v3_5)["first_k_dense_replace"], 3);
  auto v3_2 = PresetConfig("v3", 2);
  EXPECT_EQ((*v3_2)["first_k_dense_replace"], 1);
  auto tiny_1 = PresetConfig("tiny-v2lite", 1);
  EXPECT_EQ((*tiny_1)["first_k_dense_replace"], 0);
  EXPECT_EQ((*PresetConfig("v2lite", 0))["eos_token_id"], 100001);
  EXPECT_TRUE((*PresetConfig("v2lite", 0))["q_lora_rank"].is_null());

  auto bad = PresetConfig("v4", 0);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("unknown preset 'v4'"));
  EXPECT_THAT(bad.status().message(), HasSubstr("tiny-v2lite, tiny-v3, tiny-moe16b, v2lite, v3"));
}

// The real presets have the published parameter counts (no weights written).
int64_t ParamCount(const std::string& preset) {
  auto c = PresetConfig(preset, 0);
  EXPECT_TRUE(c.ok());
  auto decls = ModelTensors(*c, WeightFormat::kBF16);
  EXPECT_TRUE(decls.ok());
  int64_t n = 0;
  for (const auto& d : *decls) {
    int64_t e = 1;
    for (int64_t x : d.shape) e *= x;
    n += e;
  }
  return n;
}

TEST(PresetConfig, RealPresetsHavePublishedSizes) {
  EXPECT_NEAR(ParamCount("v2lite") / 1e9, 15.7,
              0.1);                             // DeepSeek-V2-Lite: 15.7B
  EXPECT_NEAR(ParamCount("v3") / 1e9, 671, 2);  // DeepSeek-V3 without MTP: 671B
}

TEST(MakeModel, BadOptions) {
  const std::string dir = TestDir();
  MakeModelOptions o = Options("tiny-v3", dir);
  o.shards = 0;
  absl::Status s = WriteRandomModel(o);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("--shards must be >= 1"));
  o.shards = 100000;
  s = WriteRandomModel(o);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("exceeds the"));

  // A file where the output directory should be.
  const std::string file = dir + "/not-a-dir";
  std::ofstream(file) << "x";
  o = Options("tiny-v3", file + "/sub");
  s = WriteRandomModel(o);
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(s.message(), HasSubstr("cannot create output directory " + file + "/sub"));

  EXPECT_EQ(ParseWeightFormat("int4").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(ParseWeightFormat("int4").status().message(), HasSubstr("bf16, f32, f16, fp8"));
}

int RunCli(std::vector<std::string> args) {
  args.insert(args.begin(), {"dmoe", "make-model"});
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  return RunMakeModel(static_cast<int>(argv.size()), argv.data());
}

TEST(MakeModelCli, ExitCodes) {
  const std::string dir = TestDir();
  EXPECT_EQ(RunCli({"--preset", "tiny-v3", "--out", dir, "--layers", "2", "--shards", "2",
                    "--weight-dtype", "fp8", "--seed", "7"}),
            0);
  EXPECT_TRUE(fs::exists(dir + "/model-00002-of-00002.safetensors"));
  EXPECT_EQ(ReadJson(dir + "/config.json")["num_hidden_layers"], 2);
  EXPECT_EQ(RunCli({"--preset", "nope", "--out", dir}), 1);
  EXPECT_EQ(RunCli({"--preset", "tiny-v3", "--out", dir, "--layers", "0"}), 1);
  EXPECT_EQ(RunCli({"--preset", "tiny-v3", "--out", dir, "--shards", "0"}), 1);
  EXPECT_EQ(RunCli({"--preset", "tiny-v3", "--out", dir, "--weight-dtype", "i8"}), 1);
  EXPECT_EQ(RunCli({"--preset", "tiny-v3"}), 2);  // missing --out
  EXPECT_EQ(RunCli({"--preset", "tiny-v3", "--out", dir, "--bogus"}),
            2);  // unknown flag
  EXPECT_EQ(RunCli({"--help"}), 0);
  EXPECT_EQ(RunCli({"--preset", "tiny-v3", "--out", dir, "--no-tokenizer"}), 0);
  EXPECT_FALSE(fs::exists(dir + "/tokenizer.json"));
  EXPECT_EQ(RunCli({"--preset", "tiny-v3", "--out", dir}), 0);
  EXPECT_TRUE(fs::exists(dir + "/tokenizer.json"));
  EXPECT_EQ(RunCli({"--preset", "tiny-v3", "--out", dir, "--no-tokenizer", "--tokenizer", dir}), 2);
}

// ---------------------------------------------------------------------------
// Conversions

TEST(Conversions, FastE4M3MatchesReference) {
  std::vector<float> xs;
  for (uint32_t h = 0; h < 0x10000; ++h) xs.push_back(core::BF16ToF32(static_cast<uint16_t>(h)));
  // Midpoints between neighbouring codes (exact ties) and their float
  // neighbours.
  for (int c = 0; c < 0x7e; ++c) {
    const float lo = core::F8E4M3ToF32(static_cast<uint8_t>(c));
    const float hi = core::F8E4M3ToF32(static_cast<uint8_t>(c + 1));
    const float mid = (lo + hi) / 2;
    for (float x : {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1000.0f), lo, hi}) {
      xs.push_back(x);
      xs.push_back(-x);
    }
  }
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(-500.0f, 500.0f);
  for (int i = 0; i < 20000; ++i) xs.push_back(u(rng));
  for (float x : xs) {
    if (std::isnan(x)) {
      EXPECT_EQ(internal::FastF32ToF8E4M3(x) & 0x7f, 0x7f);
      continue;
    }
    ASSERT_EQ(internal::FastF32ToF8E4M3(x), core::F32ToF8E4M3(x)) << x;
  }
}

TEST(Conversions, F32ToF16RoundTripsAndRoundsToEven) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const auto v = static_cast<uint16_t>(h);
    const float f = core::F16ToF32(v);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(core::F16ToF32(internal::F32ToF16(f))));
      continue;
    }
    ASSERT_EQ(internal::F32ToF16(f), v) << std::hex << h;
  }
  // Ties between neighbours go to the even mantissa.
  EXPECT_EQ(internal::F32ToF16(1.0f + 0x1p-11f), 0x3c00);      // 1 + half ulp -> 1
  EXPECT_EQ(internal::F32ToF16(1.0f + 3 * 0x1p-11f), 0x3c02);  // -> 1 + 2 ulp
  EXPECT_EQ(internal::F32ToF16(0x1p-25f), 0x0000);             // half the min subnormal
  EXPECT_EQ(internal::F32ToF16(3 * 0x1p-25f), 0x0002);
  EXPECT_EQ(internal::F32ToF16(65519.0f), 0x7bff);  // rounds down to 65504
  EXPECT_EQ(internal::F32ToF16(65520.0f), 0x7c00);  // ties to inf
  EXPECT_EQ(internal::F32ToF16(-1e30f), 0xfc00);
}

}  // namespace
}  // namespace dmoe::tools
