#include "core/config.h"

#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace dmoe::core {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using Json = nlohmann::json;

// deepseek-ai/DeepSeek-V2-Lite config.json as published.
constexpr const char* kV2LiteConfig = R"json({
  "architectures": ["DeepseekV2ForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "auto_map": {
    "AutoConfig": "configuration_deepseek.DeepseekV2Config",
    "AutoModel": "modeling_deepseek.DeepseekV2Model",
    "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM"
  },
  "aux_loss_alpha": 0.001,
  "bos_token_id": 100000,
  "eos_token_id": 100001,
  "ep_size": 1,
  "first_k_dense_replace": 1,
  "hidden_act": "silu",
  "hidden_size": 2048,
  "initializer_range": 0.02,
  "intermediate_size": 10944,
  "kv_lora_rank": 512,
  "max_position_embeddings": 163840,
  "model_type": "deepseek_v2",
  "moe_intermediate_size": 1408,
  "moe_layer_freq": 1,
  "n_group": 1,
  "n_routed_experts": 64,
  "n_shared_experts": 2,
  "norm_topk_prob": false,
  "num_attention_heads": 16,
  "num_experts_per_tok": 6,
  "num_hidden_layers": 27,
  "num_key_value_heads": 16,
  "pretraining_tp": 1,
  "q_lora_rank": null,
  "qk_nope_head_dim": 128,
  "qk_rope_head_dim": 64,
  "rms_norm_eps": 1e-06,
  "rope_scaling": {
    "beta_fast": 32,
    "beta_slow": 1,
    "factor": 40,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
    "original_max_position_embeddings": 4096,
    "type": "yarn"
  },
  "rope_theta": 10000,
  "routed_scaling_factor": 1.0,
  "scoring_func": "softmax",
  "seq_aux": true,
  "tie_word_embeddings": false,
  "topk_group": 1,
  "topk_method": "greedy",
  "torch_dtype": "bfloat16",
  "transformers_version": "4.33.1",
  "use_cache": true,
  "v_head_dim": 128,
  "vocab_size": 102400
})json";

// deepseek-ai/DeepSeek-V3 config.json as published (FP8 weights).
constexpr const char* kV3Config = R"json({
  "architectures": ["DeepseekV3ForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "auto_map": {
    "AutoConfig": "configuration_deepseek.DeepseekV3Config",
    "AutoModel": "modeling_deepseek.DeepseekV3Model",
    "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"
  },
  "aux_loss_alpha": 0.001,
  "bos_token_id": 0,
  "eos_token_id": 1,
  "ep_size": 1,
  "first_k_dense_replace": 3,
  "hidden_act": "silu",
  "hidden_size": 7168,
  "initializer_range": 0.02,
  "intermediate_size": 18432,
  "kv_lora_rank": 512,
  "max_position_embeddings": 163840,
  "model_type": "deepseek_v3",
  "moe_intermediate_size": 2048,
  "moe_layer_freq": 1,
  "n_group": 8,
  "n_routed_experts": 256,
  "n_shared_experts": 1,
  "norm_topk_prob": true,
  "num_attention_heads": 128,
  "num_experts_per_tok": 8,
  "num_hidden_layers": 61,
  "num_key_value_heads": 128,
  "num_nextn_predict_layers": 1,
  "pretraining_tp": 1,
  "q_lora_rank": 1536,
  "qk_nope_head_dim": 128,
  "qk_rope_head_dim": 64,
  "quantization_config": {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128]
  },
  "rms_norm_eps": 1e-06,
  "rope_scaling": {
    "beta_fast": 32,
    "beta_slow": 1,
    "factor": 40,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "original_max_position_embeddings": 4096,
    "type": "yarn"
  },
  "rope_theta": 10000,
  "routed_scaling_factor": 2.5,
  "scoring_func": "sigmoid",
  "seq_aux": true,
  "tie_word_embeddings": false,
  "topk_group": 4,
  "topk_method": "noaux_tc",
  "torch_dtype": "bfloat16",
  "transformers_version": "4.33.1",
  "use_cache": true,
  "v_head_dim": 128,
  "vocab_size": 129280
})json";

// deepseek-ai/deepseek-moe-16b-base config.json as published.
constexpr const char* kMoe16bConfig = R"json({
  "architectures": ["DeepseekForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "auto_map": {
    "AutoConfig": "configuration_deepseek.DeepseekConfig",
    "AutoModel": "modeling_deepseek.DeepseekModel",
    "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"
  },
  "aux_loss_alpha": 0.001,
  "bos_token_id": 100000,
  "eos_token_id": 100001,
  "first_k_dense_replace": 1,
  "hidden_act": "silu",
  "hidden_size": 2048,
  "initializer_range": 0.02,
  "intermediate_size": 10944,
  "max_position_embeddings": 4096,
  "model_type": "deepseek",
  "moe_intermediate_size": 1408,
  "moe_layer_freq": 1,
  "n_routed_experts": 64,
  "n_shared_experts": 2,
  "norm_topk_prob": false,
  "num_attention_heads": 16,
  "num_experts_per_tok": 6,
  "num_hidden_layers": 28,
  "num_key_value_heads": 16,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-06,
  "rope_scaling": null,
  "rope_theta": 10000,
  "scoring_func": "softmax",
  "seq_aux": true,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.36.0",
  "use_cache": true,
  "vocab_size": 102400
})json";

// YaRN attention-scale multiplier of HF's yarn_get_mscale, in double.
double YarnMscale(double factor, double mscale) {
  return factor <= 1.0 ? 1.0 : 0.1 * mscale * std::log(factor) + 1.0;
}

// Parses `base` with `edit` applied (keys set; a "<delete>" string value removes).
absl::StatusOr<ModelConfig> ParseEdited(const char* base, const Json& edit) {
  Json j = Json::parse(base);
  for (const auto& [key, value] : edit.items()) {
    if (value.is_string() && value.get<std::string>() == "<delete>") {
      j.erase(key);
    } else {
      j[key] = value;
    }
  }
  return ModelConfig::FromJson(j.dump());
}

// Asserts an InvalidArgument error whose message contains every substring.
void ExpectInvalid(const absl::StatusOr<ModelConfig>& c,
                   std::initializer_list<const char*> substrings) {
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << c.status();
  for (const char* s : substrings) EXPECT_THAT(c.status().message(), HasSubstr(s));
}

TEST(ConfigTest, ParsesDeepseekV2Lite) {
  absl::StatusOr<ModelConfig> c = ModelConfig::FromJson(kV2LiteConfig);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->model_type, ModelType::kDeepseekV2);
  EXPECT_EQ(ModelTypeName(c->model_type), "deepseek_v2");
  EXPECT_TRUE(c->IsMla());
  EXPECT_EQ(c->vocab_size, 102400);
  EXPECT_EQ(c->hidden_size, 2048);
  EXPECT_EQ(c->intermediate_size, 10944);
  EXPECT_EQ(c->moe_intermediate_size, 1408);
  EXPECT_EQ(c->num_hidden_layers, 27);
  EXPECT_EQ(c->num_attention_heads, 16);
  EXPECT_EQ(c->num_key_value_heads, 16);
  EXPECT_EQ(c->n_routed_experts, 64);
  EXPECT_EQ(c->n_shared_experts, 2);
  EXPECT_EQ(c->num_experts_per_tok, 6);
  EXPECT_EQ(c->moe_layer_freq, 1);
  EXPECT_EQ(c->first_k_dense_replace, 1);
  EXPECT_EQ(c->n_group, 1);
  EXPECT_EQ(c->topk_group, 1);
  EXPECT_FALSE(c->norm_topk_prob);
  EXPECT_EQ(c->routed_scaling_factor, 1.0);
  EXPECT_EQ(c->scoring_func, ScoringFunc::kSoftmax);
  EXPECT_EQ(c->topk_method, TopkMethod::kGreedy);
  EXPECT_EQ(c->q_lora_rank, 0);  // explicit null: plain q_proj
  EXPECT_EQ(c->kv_lora_rank, 512);
  EXPECT_EQ(c->qk_nope_head_dim, 128);
  EXPECT_EQ(c->qk_rope_head_dim, 64);
  EXPECT_EQ(c->v_head_dim, 128);
  EXPECT_EQ(c->QHeadDim(), 192);
  EXPECT_EQ(c->rms_norm_eps, 1e-6);
  EXPECT_EQ(c->rope_theta, 10000.0);
  EXPECT_EQ(c->max_position_embeddings, 163840);
  EXPECT_FALSE(c->tie_word_embeddings);
  EXPECT_EQ(c->bos_token_id, 100000);
  EXPECT_THAT(c->eos_token_ids, ElementsAre(100001));
  EXPECT_EQ(c->rope_scaling.type, RopeScalingType::kYarn);
  EXPECT_EQ(c->rope_scaling.factor, 40.0);
  EXPECT_EQ(c->rope_scaling.original_max_position_embeddings, 4096);
  EXPECT_EQ(c->rope_scaling.beta_fast, 32.0);
  EXPECT_EQ(c->rope_scaling.beta_slow, 1.0);
  EXPECT_EQ(c->rope_scaling.mscale, 0.707);
  EXPECT_EQ(c->rope_scaling.mscale_all_dim, 0.707);
  EXPECT_EQ(c->fp8_block_rows, 128);
  EXPECT_EQ(c->fp8_block_cols, 128);

  EXPECT_FALSE(c->IsMoeLayer(0));
  for (int64_t i = 1; i < 27; ++i) EXPECT_TRUE(c->IsMoeLayer(i)) << i;

  const double m = YarnMscale(40.0, 0.707);
  EXPECT_DOUBLE_EQ(c->SoftmaxScale(), 1.0 / std::sqrt(192.0) * m * m);
}

TEST(ConfigTest, ParsesDeepseekV3) {
  absl::StatusOr<ModelConfig> c = ModelConfig::FromJson(kV3Config);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->model_type, ModelType::kDeepseekV3);
  EXPECT_EQ(ModelTypeName(c->model_type), "deepseek_v3");
  EXPECT_EQ(c->vocab_size, 129280);
  EXPECT_EQ(c->hidden_size, 7168);
  EXPECT_EQ(c->intermediate_size, 18432);
  EXPECT_EQ(c->moe_intermediate_size, 2048);
  EXPECT_EQ(c->num_hidden_layers, 61);
  EXPECT_EQ(c->num_attention_heads, 128);
  EXPECT_EQ(c->n_routed_experts, 256);
  EXPECT_EQ(c->n_shared_experts, 1);
  EXPECT_EQ(c->num_experts_per_tok, 8);
  EXPECT_EQ(c->n_group, 8);
  EXPECT_EQ(c->topk_group, 4);
  EXPECT_TRUE(c->norm_topk_prob);
  EXPECT_EQ(c->routed_scaling_factor, 2.5);
  EXPECT_EQ(c->scoring_func, ScoringFunc::kSigmoid);
  EXPECT_EQ(c->topk_method, TopkMethod::kNoauxTc);
  EXPECT_EQ(c->q_lora_rank, 1536);
  EXPECT_EQ(c->kv_lora_rank, 512);
  EXPECT_EQ(c->first_k_dense_replace, 3);
  EXPECT_EQ(c->bos_token_id, 0);
  EXPECT_THAT(c->eos_token_ids, ElementsAre(1));
  EXPECT_EQ(c->rope_scaling.type, RopeScalingType::kYarn);
  EXPECT_EQ(c->rope_scaling.factor, 40.0);
  EXPECT_EQ(c->rope_scaling.mscale, 1.0);
  EXPECT_EQ(c->rope_scaling.mscale_all_dim, 1.0);
  EXPECT_EQ(c->fp8_block_rows, 128);
  EXPECT_EQ(c->fp8_block_cols, 128);

  for (int64_t i = 0; i < 3; ++i) EXPECT_FALSE(c->IsMoeLayer(i)) << i;
  for (int64_t i = 3; i < 61; ++i) EXPECT_TRUE(c->IsMoeLayer(i)) << i;

  const double m = 0.1 * 1.0 * std::log(40.0) + 1.0;
  EXPECT_DOUBLE_EQ(c->SoftmaxScale(), m * m / std::sqrt(128.0 + 64.0));
}

TEST(ConfigTest, ParsesDeepseekMoe16b) {
  absl::StatusOr<ModelConfig> c = ModelConfig::FromJson(kMoe16bConfig);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->model_type, ModelType::kDeepseek);
  EXPECT_EQ(ModelTypeName(c->model_type), "deepseek");
  EXPECT_FALSE(c->IsMla());
  EXPECT_EQ(c->hidden_size, 2048);
  EXPECT_EQ(c->num_hidden_layers, 28);
  EXPECT_EQ(c->num_attention_heads, 16);
  EXPECT_EQ(c->num_key_value_heads, 16);
  EXPECT_EQ(c->head_dim, 128);
  EXPECT_EQ(c->QHeadDim(), 128);
  EXPECT_EQ(c->n_routed_experts, 64);
  EXPECT_EQ(c->n_shared_experts, 2);
  EXPECT_EQ(c->num_experts_per_tok, 6);
  EXPECT_EQ(c->topk_method, TopkMethod::kGreedy);
  EXPECT_EQ(c->n_group, 1);
  EXPECT_EQ(c->routed_scaling_factor, 1.0);
  EXPECT_EQ(c->rope_scaling.type, RopeScalingType::kNone);
  EXPECT_EQ(c->max_position_embeddings, 4096);
  EXPECT_FALSE(c->IsMoeLayer(0));
  EXPECT_TRUE(c->IsMoeLayer(1));
  EXPECT_TRUE(c->IsMoeLayer(27));
  EXPECT_DOUBLE_EQ(c->SoftmaxScale(), 1.0 / std::sqrt(128.0));
}

TEST(ConfigTest, V2DefaultsWhenKeysAbsent) {
  absl::StatusOr<ModelConfig> c = ModelConfig::FromJson(R"({"model_type": "deepseek_v2"})");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->vocab_size, 102400);
  EXPECT_EQ(c->hidden_size, 4096);
  EXPECT_EQ(c->intermediate_size, 11008);
  EXPECT_EQ(c->num_hidden_layers, 30);
  EXPECT_EQ(c->q_lora_rank, 1536);  // absent: HF default, unlike an explicit null
  EXPECT_EQ(c->kv_lora_rank, 512);
  EXPECT_EQ(c->n_routed_experts, 0);  // None: every layer dense
  EXPECT_FALSE(c->IsMoeLayer(0));
  EXPECT_EQ(c->topk_method, TopkMethod::kGreedy);  // HF's "gready"
  EXPECT_EQ(c->max_position_embeddings, 2048);
  EXPECT_EQ(c->bos_token_id, 100000);
  EXPECT_THAT(c->eos_token_ids, ElementsAre(100001));
  EXPECT_EQ(c->rope_scaling.type, RopeScalingType::kNone);
  EXPECT_DOUBLE_EQ(c->SoftmaxScale(), 1.0 / std::sqrt(192.0));
}

TEST(ConfigTest, V3DefaultsWhenKeysAbsent) {
  absl::StatusOr<ModelConfig> c = ModelConfig::FromJson(R"({"model_type": "deepseek_v3"})");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->hidden_size, 7168);
  EXPECT_EQ(c->n_routed_experts, 256);
  EXPECT_EQ(c->num_experts_per_tok, 8);
  EXPECT_EQ(c->n_group, 8);
  EXPECT_EQ(c->topk_group, 4);
  EXPECT_EQ(c->topk_method, TopkMethod::kNoauxTc);
  EXPECT_EQ(c->scoring_func, ScoringFunc::kSigmoid);
  EXPECT_EQ(c->routed_scaling_factor, 2.5);
  EXPECT_EQ(c->max_position_embeddings, 4096);
  EXPECT_EQ(c->bos_token_id, 0);
  EXPECT_THAT(c->eos_token_ids, ElementsAre(1));
}

TEST(ConfigTest, DeepseekDefaultsKvHeadsToHeads) {
  absl::StatusOr<ModelConfig> c = ModelConfig::FromJson(R"({"model_type": "deepseek"})");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_attention_heads, 32);
  EXPECT_EQ(c->num_key_value_heads, 32);
  EXPECT_EQ(c->head_dim, 128);
  EXPECT_EQ(c->n_routed_experts, 0);
}

TEST(ConfigTest, ExplicitNullsMeanNone) {
  absl::StatusOr<ModelConfig> c = ParseEdited(kV3Config, {{"n_group", nullptr},
                                                          {"topk_group", nullptr},
                                                          {"n_shared_experts", nullptr},
                                                          {"rope_scaling", nullptr},
                                                          {"eos_token_id", nullptr},
                                                          {"bos_token_id", nullptr},
                                                          {"q_lora_rank", nullptr}});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->n_group, 1);
  EXPECT_EQ(c->topk_group, 1);
  EXPECT_EQ(c->n_shared_experts, 0);
  EXPECT_EQ(c->q_lora_rank, 0);
  EXPECT_EQ(c->rope_scaling.type, RopeScalingType::kNone);
  EXPECT_TRUE(c->eos_token_ids.empty());
  EXPECT_EQ(c->bos_token_id, -1);

  c = ParseEdited(kV2LiteConfig, {{"n_routed_experts", nullptr}});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->n_routed_experts, 0);
  EXPECT_FALSE(c->IsMoeLayer(5));
}

TEST(ConfigTest, EosTokenList) {
  absl::StatusOr<ModelConfig> c = ParseEdited(kV2LiteConfig, {{"eos_token_id", {1, 100001}}});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_THAT(c->eos_token_ids, ElementsAre(1, 100001));
}

TEST(ConfigTest, RopeTypeKeyAndLinearScaling) {
  absl::StatusOr<ModelConfig> c =
      ParseEdited(kMoe16bConfig, {{"rope_scaling", {{"rope_type", "linear"}, {"factor", 4.0}}}});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_scaling.type, RopeScalingType::kLinear);
  EXPECT_EQ(c->rope_scaling.factor, 4.0);
  EXPECT_DOUBLE_EQ(c->SoftmaxScale(), 1.0 / std::sqrt(128.0));
}

TEST(ConfigTest, YarnDefaultsAndNoMscaleWithoutAllDim) {
  absl::StatusOr<ModelConfig> c =
      ParseEdited(kV2LiteConfig, {{"rope_scaling", {{"type", "yarn"}, {"factor", 8}}}});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_scaling.original_max_position_embeddings, 4096);
  EXPECT_EQ(c->rope_scaling.beta_fast, 32.0);
  EXPECT_EQ(c->rope_scaling.beta_slow, 1.0);
  EXPECT_EQ(c->rope_scaling.mscale, 1.0);
  EXPECT_EQ(c->rope_scaling.mscale_all_dim, 0.0);
  EXPECT_DOUBLE_EQ(c->SoftmaxScale(), 1.0 / std::sqrt(192.0));
}

TEST(ConfigTest, GreedyIgnoresGroups) {
  absl::StatusOr<ModelConfig> c = ParseEdited(kV2LiteConfig, {{"n_group", 8}, {"topk_group", 3}});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->n_group, 1);
  EXPECT_EQ(c->topk_group, 1);
}

TEST(ConfigTest, FromFileReadsAndNamesPath) {
  const std::string path = ::testing::TempDir() + "/dmoe_config_test_config.json";
  {
    std::ofstream out(path);
    out << kV3Config;
  }
  absl::StatusOr<ModelConfig> c = ModelConfig::FromFile(path);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->hidden_size, 7168);
  {
    std::ofstream out(path);
    out << R"({"model_type": "deepseek_v3", "hidden_size": -1})";
  }
  c = ModelConfig::FromFile(path);
  ExpectInvalid(c, {path.c_str(), "'hidden_size'"});
  std::remove(path.c_str());

  c = ModelConfig::FromFile(path);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(c.status().message(), HasSubstr(path));
}

// --- one test per error class ---

TEST(ConfigErrorTest, UnsupportedModelType) {
  ExpectInvalid(ParseEdited(kV2LiteConfig, {{"model_type", "llama"}}),
                {"unsupported model_type 'llama'", "deepseek_v3"});
  ExpectInvalid(ParseEdited(kV2LiteConfig, {{"model_type", "<delete>"}}),
                {"model_type", "supported: deepseek, deepseek_v2, deepseek_v3"});
}

TEST(ConfigErrorTest, BadType) {
  ExpectInvalid(ParseEdited(kV2LiteConfig, {{"hidden_size", "big"}}),
                {"config.json: 'hidden_size' must be a positive integer, got \"big\""});
  ExpectInvalid(ParseEdited(kV2LiteConfig, {{"hidden_size", 2048.0}}),
                {"'hidden_size' must be a positive integer"});
  ExpectInvalid(ParseEdited(kV2LiteConfig, {{"hidden_size", nullptr}}),
                {"'hidden_size' must be a positive integer, got null"});
  ExpectInvalid(ParseEdited(kV2LiteConfig, {{"scoring_func", nullptr}}),
                {"'scoring_func' must be a string"});
  ExpectInvalid(ParseEdited(kV2LiteConfig, {{"num_hidden_layers", 0}}),
                {"'num_hidden_layers' must be a positive integer, got 0"});
  ExpectInvalid(ParseEdited(kV2LiteConfig, {{"rms_norm_eps", -1e-6}}),
                {"'rms_norm_eps' must be a positive number"});
  ExpectInvalid(ParseEdited(kV2LiteConfig, {{"norm_topk_prob", 1}}),
                {"'norm_topk_prob' must be true or false"});
  ExpectInvalid(ParseEdited(kV2LiteConfig, {{"eos_token_id", "eos"}}), {"'eos_token_id'"});
}

TEST(ConfigErrorTest, UnknownScoringFunc) {
  ExpectInvalid(ParseEdited(kV2LiteConfig, {{"scoring_func", "relu"}}),
                {"scoring_func 'relu'", "softmax, sigmoid"});
}

TEST(ConfigErrorTest, UnknownTopkMethod) {
  ExpectInvalid(ParseEdited(kV2LiteConfig, {{"topk_method", "random"}}),
                {"topk_method 'random'", "group_limited_greedy", "noaux_tc"});
}

TEST(ConfigErrorTest, DynamicRopeScaling) {
  ExpectInvalid(
      ParseEdited(kV2LiteConfig, {{"rope_scaling", {{"type", "dynamic"}, {"factor", 2.0}}}}),
      {"unsupported rope_scaling type 'dynamic'", "yarn, linear"});
  ExpectInvalid(ParseEdited(kV2LiteConfig, {{"rope_scaling", {{"type", "yarn"}}}}),
                {"rope_scaling.factor"});
}

TEST(ConfigErrorTest, TopkLargerThanExperts) {
  ExpectInvalid(ParseEdited(kV2LiteConfig, {{"num_experts_per_tok", 65}}),
                {"'num_experts_per_tok' (65)", "'n_routed_experts' = 64"});
  ExpectInvalid(ParseEdited(kV2LiteConfig, {{"num_experts_per_tok", nullptr}}),
                {"'num_experts_per_tok' (0)"});
}

TEST(ConfigErrorTest, ExpertsNotDivisibleByGroups) {
  ExpectInvalid(ParseEdited(kV3Config, {{"n_routed_experts", 250}}),
                {"'n_routed_experts' (250)", "'n_group' (8)"});
  ExpectInvalid(ParseEdited(kV3Config, {{"topk_group", 9}}), {"'topk_group' (9)"});
  ExpectInvalid(ParseEdited(kV3Config, {{"topk_group", 1}, {"n_routed_experts", 32}}),
                {"'topk_group' (1)", "'num_experts_per_tok' (8)"});
  ExpectInvalid(
      ParseEdited(kV3Config,
                  {{"n_routed_experts", 8}, {"topk_group", 8}, {"num_experts_per_tok", 2}}),
      {"noaux_tc", ">= 2"});
}

TEST(ConfigErrorTest, OddRopeDim) {
  ExpectInvalid(ParseEdited(kV2LiteConfig, {{"qk_rope_head_dim", 63}}),
                {"'qk_rope_head_dim' must be even", "63"});
  ExpectInvalid(ParseEdited(kMoe16bConfig, {{"hidden_size", 16 * 127}}), {"head_dim", "even"});
}

TEST(ConfigErrorTest, InvalidJson) {
  absl::StatusOr<ModelConfig> c = ModelConfig::FromJson(R"({"model_type": "deepseek_v2",)");
  ExpectInvalid(c, {"config.json: invalid JSON: "});
  ExpectInvalid(ModelConfig::FromJson("[1, 2]"), {"config.json", "object"});
  // nlohmann reports number overflow as out_of_range, not parse_error.
  ExpectInvalid(ModelConfig::FromJson(R"({"model_type": "deepseek_v2", "rope_theta": 1e999})"),
                {"config.json: invalid JSON: "});
}

TEST(ConfigErrorTest, AttentionBiasTrue) {
  ExpectInvalid(ParseEdited(kV2LiteConfig, {{"attention_bias", true}}),
                {"'attention_bias' true is unsupported"});
}

TEST(ConfigErrorTest, HeadsNotDivisibleByKvHeads) {
  ExpectInvalid(ParseEdited(kMoe16bConfig, {{"num_key_value_heads", 3}}),
                {"'num_attention_heads' (16)", "'num_key_value_heads' (3)"});
  ExpectInvalid(ParseEdited(kMoe16bConfig, {{"num_attention_heads", 15}}),
                {"'hidden_size' (2048)", "'num_attention_heads' (15)"});
}

TEST(ConfigErrorTest, NonSiluActivation) {
  ExpectInvalid(ParseEdited(kV2LiteConfig, {{"hidden_act", "gelu"}}),
                {"hidden_act 'gelu'", "supported: silu"});
}

TEST(ConfigErrorTest, UnsupportedQuantization) {
  ExpectInvalid(ParseEdited(kV3Config, {{"quantization_config", {{"quant_method", "gptq"}}}}),
                {"quantization_config.quant_method 'gptq'", "fp8"});
  ExpectInvalid(ParseEdited(kV3Config, {{"quantization_config",
                                         {{"quant_method", "fp8"}, {"weight_block_size", {128}}}}}),
                {"weight_block_size", "[128]"});
}

TEST(ConfigErrorTest, DenseLayersNeedIntermediateSize) {
  ExpectInvalid(ParseEdited(kV2LiteConfig, {{"intermediate_size", 0}}),
                {"'intermediate_size' must be positive"});
  // No dense layer: intermediate_size may be 0.
  EXPECT_TRUE(
      ParseEdited(kV2LiteConfig, {{"intermediate_size", 0}, {"first_k_dense_replace", 0}}).ok());
  ExpectInvalid(ParseEdited(kV2LiteConfig, {{"moe_intermediate_size", 0}}),
                {"'moe_intermediate_size' must be positive"});
}

}  // namespace
}  // namespace dmoe::core
