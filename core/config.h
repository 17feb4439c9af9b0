// Model configuration parsed from a Hugging Face config.json.
//
// Supported `model_type`s: "deepseek" (DeepSeekMoE 16B: multi-head attention with
// llama-style RoPE), "deepseek_v2" and "deepseek_v3" (MLA). Missing keys take the
// defaults of the corresponding Hugging Face configuration class (e.g. V2's
// q_lora_rank defaults to 1536 when absent; an explicit null means "no q LoRA").
// Unknown enum values (scoring_func, topk_method, rope_scaling type, hidden_act)
// and inconsistent values (top-k larger than the expert count, experts not
// divisible into groups, odd rope dims, ...) are errors naming the key.
#ifndef DMOE_CORE_CONFIG_H_
#define DMOE_CORE_CONFIG_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace dmoe::core {

enum class ModelType { kDeepseek, kDeepseekV2, kDeepseekV3 };
enum class ScoringFunc { kSoftmax, kSigmoid };
enum class TopkMethod { kGreedy, kGroupLimitedGreedy, kNoauxTc };
enum class RopeScalingType { kNone, kLinear, kYarn };

struct RopeScaling {
  RopeScalingType type = RopeScalingType::kNone;
  double factor = 1.0;
  // YaRN parameters (HF DeepseekV2YarnRotaryEmbedding defaults).
  int64_t original_max_position_embeddings = 4096;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  double mscale = 1.0;
  double mscale_all_dim = 0.0;
};

struct ModelConfig {
  ModelType model_type = ModelType::kDeepseekV2;
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;      // dense MLP layers
  int64_t moe_intermediate_size = 0;  // one routed expert
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  // MHA (deepseek) only; MLA ignores it

  // MoE. n_routed_experts == 0 means every layer is dense.
  int64_t n_routed_experts = 0;
  int64_t n_shared_experts = 0;
  int64_t num_experts_per_tok = 0;
  int64_t moe_layer_freq = 1;
  int64_t first_k_dense_replace = 0;
  int64_t n_group = 1;     // 1 when absent/null
  int64_t topk_group = 1;  // 1 when absent/null
  bool norm_topk_prob = false;
  double routed_scaling_factor = 1.0;
  ScoringFunc scoring_func = ScoringFunc::kSoftmax;
  TopkMethod topk_method = TopkMethod::kGreedy;

  // MLA (deepseek_v2 / deepseek_v3). q_lora_rank == 0: plain q_proj.
  int64_t q_lora_rank = 0;
  int64_t kv_lora_rank = 0;
  int64_t qk_nope_head_dim = 0;
  int64_t qk_rope_head_dim = 0;
  int64_t v_head_dim = 0;

  // MHA (deepseek): hidden_size / num_attention_heads.
  int64_t head_dim = 0;

  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  int64_t max_position_embeddings = 2048;
  bool tie_word_embeddings = false;
  int64_t bos_token_id = -1;
  std::vector<int64_t> eos_token_ids;

  // FP8 block size from quantization_config.weight_block_size (default 128x128).
  int64_t fp8_block_rows = 128;
  int64_t fp8_block_cols = 128;

  bool IsMla() const { return model_type != ModelType::kDeepseek; }
  // True when layer `i` has a MoE FFN (see docs/model.md).
  bool IsMoeLayer(int64_t i) const {
    return n_routed_experts > 0 && i >= first_k_dense_replace && i % moe_layer_freq == 0;
  }
  int64_t QHeadDim() const { return IsMla() ? qk_nope_head_dim + qk_rope_head_dim : head_dim; }
  // Softmax scale of attention scores, YaRN mscale included.
  double SoftmaxScale() const;

  static absl::StatusOr<ModelConfig> FromJson(const std::string& json_text);
  static absl::StatusOr<ModelConfig> FromFile(const std::string& path);
};

std::string ModelTypeName(ModelType t);

}  // namespace dmoe::core

#endif  // DMOE_CORE_CONFIG_H_
