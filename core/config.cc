#include "core/config.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <sstream>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "core/status.h"
#include "nlohmann/json.hpp"

namespace dmoe::core {
namespace {

using Json = nlohmann::json;

// Defaults of the Hugging Face configuration classes (DeepseekConfig,
// DeepseekV2Config, DeepseekV3Config). A std::nullopt stands for Python's None.
struct Defaults {
  int64_t vocab_size;
  int64_t hidden_size;
  int64_t intermediate_size;
  int64_t moe_intermediate_size;
  int64_t num_hidden_layers;
  int64_t num_attention_heads;
  std::optional<int64_t> num_key_value_heads;  // None: = num_attention_heads
  std::optional<int64_t> n_shared_experts;
  std::optional<int64_t> n_routed_experts;
  std::optional<int64_t> num_experts_per_tok;
  std::optional<int64_t> n_group;
  std::optional<int64_t> topk_group;
  int64_t first_k_dense_replace;
  bool norm_topk_prob;
  double routed_scaling_factor;
  const char* scoring_func;
  const char* topk_method;
  int64_t max_position_embeddings;
  int64_t bos_token_id;
  int64_t eos_token_id;
  // MLA only.
  std::optional<int64_t> q_lora_rank;
};

constexpr Defaults kDeepseekDefaults = {
    .vocab_size = 102400,
    .hidden_size = 4096,
    .intermediate_size = 11008,
    .moe_intermediate_size = 1407,
    .num_hidden_layers = 30,
    .num_attention_heads = 32,
    .num_key_value_heads = std::nullopt,
    .n_shared_experts = std::nullopt,
    .n_routed_experts = std::nullopt,
    .num_experts_per_tok = std::nullopt,
    .n_group = std::nullopt,
    .topk_group = std::nullopt,
    .first_k_dense_replace = 0,
    .norm_topk_prob = false,
    .routed_scaling_factor = 1.0,
    .scoring_func = "softmax",
    .topk_method = "greedy",
    .max_position_embeddings = 2048,
    .bos_token_id = 100000,
    .eos_token_id = 100001,
    .q_lora_rank = std::nullopt,
};

constexpr Defaults kDeepseekV2Defaults = {
    .vocab_size = 102400,
    .hidden_size = 4096,
    .intermediate_size = 11008,
    .moe_intermediate_size = 1407,
    .num_hidden_layers = 30,
    .num_attention_heads = 32,
    .num_key_value_heads = 32,
    .n_shared_experts = std::nullopt,
    .n_routed_experts = std::nullopt,
    .num_experts_per_tok = std::nullopt,
    .n_group = std::nullopt,
    .topk_group = std::nullopt,
    .first_k_dense_replace = 0,
    .norm_topk_prob = false,
    .routed_scaling_factor = 1.0,
    .scoring_func = "softmax",
    .topk_method = "gready",  // sic: HF's default
    .max_position_embeddings = 2048,
    .bos_token_id = 100000,
    .eos_token_id = 100001,
    .q_lora_rank = 1536,
};

constexpr Defaults kDeepseekV3Defaults = {
    .vocab_size = 129280,
    .hidden_size = 7168,
    .intermediate_size = 18432,
    .moe_intermediate_size = 2048,
    .num_hidden_layers = 61,
    .num_attention_heads = 128,
    .num_key_value_heads = 128,
    .n_shared_experts = 1,
    .n_routed_experts = 256,
    .num_experts_per_tok = 8,
    .n_group = 8,
    .topk_group = 4,
    .first_k_dense_replace = 3,
    .norm_topk_prob = true,
    .routed_scaling_factor = 2.5,
    .scoring_func = "sigmoid",
    .topk_method = "noaux_tc",
    .max_position_embeddings = 4096,
    .bos_token_id = 0,
    .eos_token_id = 1,
    .q_lora_rank = 1536,
};

// The value of `v` when it is a JSON integer that fits int64 (floats such as
// 4096.0 are not integers: configs written by HF never use them for sizes).
std::optional<int64_t> AsInt64(const Json& v) {
  if (!v.is_number_integer()) return std::nullopt;
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return std::nullopt;
    return static_cast<int64_t>(u);
  }
  return v.get<int64_t>();
}

// Reads typed values out of one JSON object; every error names `where_` (the
// file) and the key, and shows the offending value as JSON.
class Reader {
 public:
  Reader(const Json& obj, std::string where, std::string key_prefix = "")
      : obj_(obj), where_(std::move(where)), key_prefix_(std::move(key_prefix)) {}

  bool Has(const char* key) const { return obj_.contains(key); }
  bool IsNull(const char* key) const { return Has(key) && obj_.at(key).is_null(); }
  const Json& At(const char* key) const { return obj_.at(key); }

  absl::Status Error(absl::string_view msg) const {
    return absl::InvalidArgumentError(absl::StrCat(where_, ": ", msg));
  }
  std::string Name(const char* key) const { return absl::StrCat(key_prefix_, key); }
  // A reader of the nested object `obj`, whose keys are named "<prefix><key>".
  Reader Nested(const Json& obj, absl::string_view prefix) const {
    return Reader(obj, where_, absl::StrCat(key_prefix_, prefix));
  }

  // Integer at `key` with value >= `min` (0: "non-negative", 1: "positive").
  // Absent: `absent`; null: `null` (what Python's None means for this key). Either
  // without a value is an error.
  absl::StatusOr<int64_t> Int(const char* key, std::optional<int64_t> absent, int64_t min,
                              std::optional<int64_t> null = std::nullopt) const {
    if (!Has(key)) {
      if (absent.has_value()) return *absent;
      return Error(absl::StrCat("missing required key '", Name(key), "'"));
    }
    if (At(key).is_null() && null.has_value()) return *null;
    if (std::optional<int64_t> i = AsInt64(At(key)); i.has_value() && *i >= min) return *i;
    return Error(absl::StrCat("'", Name(key), "' must be a ",
                              min >= 1 ? "positive" : "non-negative", " integer, got ",
                              At(key).dump()));
  }

  // Number (integer or float) at `key`; `positive` requires > 0, else finite.
  absl::StatusOr<double> Double(const char* key, std::optional<double> absent,
                                bool positive) const {
    if (!Has(key)) {
      if (absent.has_value()) return *absent;
      return Error(absl::StrCat("missing required key '", Name(key), "'"));
    }
    const Json& v = At(key);
    if (v.is_number()) {
      const double d = v.get<double>();
      if (std::isfinite(d) && (!positive || d > 0)) return d;
    }
    return Error(absl::StrCat("'", Name(key), "' must be a ", positive ? "positive " : "finite ",
                              "number, got ", v.dump()));
  }

  // Boolean at `key`; null reads as false (Python's None is falsy).
  absl::StatusOr<bool> Bool(const char* key, bool absent) const {
    if (!Has(key)) return absent;
    const Json& v = At(key);
    if (v.is_null()) return false;
    if (v.is_boolean()) return v.get<bool>();
    return Error(absl::StrCat("'", Name(key), "' must be true or false, got ", v.dump()));
  }

  // String at `key`, which must be one of `accepted`.
  absl::StatusOr<std::string> Enum(const char* key, const char* absent,
                                   std::initializer_list<absl::string_view> accepted) const {
    std::string s = absent;
    if (Has(key)) {
      const Json& v = At(key);
      if (!v.is_string()) {
        return Error(absl::StrCat("'", Name(key), "' must be a string (one of ",
                                  absl::StrJoin(accepted, ", "), "), got ", v.dump()));
      }
      s = v.get<std::string>();
    }
    for (absl::string_view a : accepted) {
      if (s == a) return s;
    }
    return Error(absl::StrCat("unsupported ", Name(key), " '", s,
                              "' (supported: ", absl::StrJoin(accepted, ", "), ")"));
  }

 private:
  const Json& obj_;
  std::string where_;
  std::string key_prefix_;
};

absl::StatusOr<ModelType> ParseModelType(const Json& root, const std::string& where) {
  constexpr const char* kSupported = "(supported: deepseek, deepseek_v2, deepseek_v3)";
  if (!root.contains("model_type")) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": unsupported model_type <missing> ", kSupported));
  }
  const Json& v = root.at("model_type");
  const std::string s = v.is_string() ? v.get<std::string>() : v.dump();
  if (s == "deepseek") return ModelType::kDeepseek;
  if (s == "deepseek_v2") return ModelType::kDeepseekV2;
  if (s == "deepseek_v3") return ModelType::kDeepseekV3;
  return absl::InvalidArgumentError(
      absl::StrCat(where, ": unsupported model_type '", s, "' ", kSupported));
}

absl::Status ParseRopeScaling(const Reader& r, RopeScaling* out) {
  *out = RopeScaling{};
  if (!r.Has("rope_scaling") || r.IsNull("rope_scaling")) return absl::OkStatus();
  const Json& rs = r.At("rope_scaling");
  if (!rs.is_object()) {
    return r.Error(absl::StrCat("'rope_scaling' must be an object or null, got ", rs.dump()));
  }
  // Older configs spell the key "type", newer transformers versions "rope_type".
  const char* type_key = rs.contains("type") ? "type" : "rope_type";
  if (!rs.contains(type_key)) {
    return r.Error("'rope_scaling' has no 'type' (supported: yarn, linear)");
  }
  const Json& t = rs.at(type_key);
  const std::string type = t.is_string() ? t.get<std::string>() : t.dump();
  const Reader sub = r.Nested(rs, "rope_scaling.");
  if (type == "linear") {
    out->type = RopeScalingType::kLinear;
  } else if (type == "yarn") {
    out->type = RopeScalingType::kYarn;
  } else {
    return r.Error(
        absl::StrCat("unsupported rope_scaling type '", type, "' (supported: yarn, linear)"));
  }
  DMOE_ASSIGN_OR_RETURN(out->factor, sub.Double("factor", std::nullopt, /*positive=*/true));
  if (out->type != RopeScalingType::kYarn) return absl::OkStatus();
  DMOE_ASSIGN_OR_RETURN(out->original_max_position_embeddings,
                        sub.Int("original_max_position_embeddings", 4096, 1));
  // beta_* enter ln(L / (beta * 2 pi)), so they must be positive.
  DMOE_ASSIGN_OR_RETURN(out->beta_fast, sub.Double("beta_fast", 32.0, true));
  DMOE_ASSIGN_OR_RETURN(out->beta_slow, sub.Double("beta_slow", 1.0, true));
  DMOE_ASSIGN_OR_RETURN(out->mscale, sub.Double("mscale", 1.0, false));
  DMOE_ASSIGN_OR_RETURN(out->mscale_all_dim, sub.Double("mscale_all_dim", 0.0, false));
  return absl::OkStatus();
}

absl::Status ParseQuantization(const Reader& r, ModelConfig* c) {
  if (!r.Has("quantization_config") || r.IsNull("quantization_config")) return absl::OkStatus();
  const Json& q = r.At("quantization_config");
  if (!q.is_object()) {
    return r.Error(absl::StrCat("'quantization_config' must be an object, got ", q.dump()));
  }
  const Json method = q.contains("quant_method") ? q.at("quant_method") : Json();
  if (!method.is_string() || method.get<std::string>() != "fp8") {
    return r.Error(
        absl::StrCat("unsupported quantization_config.quant_method ",
                     method.is_string() ? "'" + method.get<std::string>() + "'" : method.dump(),
                     " (supported: fp8)"));
  }
  if (q.contains("fmt") && !q.at("fmt").is_null()) {
    const Json& fmt = q.at("fmt");
    if (!fmt.is_string() || fmt.get<std::string>() != "e4m3") {
      return r.Error(absl::StrCat("unsupported quantization_config.fmt ",
                                  fmt.is_string() ? "'" + fmt.get<std::string>() + "'" : fmt.dump(),
                                  " (supported: e4m3)"));
    }
  }
  if (q.contains("weight_block_size") && !q.at("weight_block_size").is_null()) {
    const Json& b = q.at("weight_block_size");
    auto positive_int = [](const Json& v) { return AsInt64(v).value_or(0) > 0; };
    if (!b.is_array() || b.size() != 2 || !positive_int(b[0]) || !positive_int(b[1])) {
      return r.Error(absl::StrCat(
          "'quantization_config.weight_block_size' must be [rows, cols] of positive integers, "
          "got ",
          b.dump()));
    }
    c->fp8_block_rows = b[0].get<int64_t>();
    c->fp8_block_cols = b[1].get<int64_t>();
  }
  return absl::OkStatus();
}

// bos: one id or null (-1). eos: one id, a list of ids, or null (empty).
absl::Status ParseSpecialTokens(const Reader& r, const Defaults& d, ModelConfig* c) {
  DMOE_ASSIGN_OR_RETURN(c->bos_token_id, r.Int("bos_token_id", d.bos_token_id, 0, -1));

  c->eos_token_ids.clear();
  if (!r.Has("eos_token_id")) {
    c->eos_token_ids.push_back(d.eos_token_id);
    return absl::OkStatus();
  }
  const Json& e = r.At("eos_token_id");
  if (e.is_null()) return absl::OkStatus();
  auto bad = [&] {
    return r.Error(absl::StrCat(
        "'eos_token_id' must be a non-negative integer or a list of them, got ", e.dump()));
  };
  const Json list = e.is_array() ? e : Json::array({e});
  for (const Json& v : list) {
    const std::optional<int64_t> id = AsInt64(v);
    if (!id.has_value() || *id < 0) return bad();
    c->eos_token_ids.push_back(*id);
  }
  return absl::OkStatus();
}

// Cross-field checks; the parse above only checked each value on its own.
absl::Status Validate(const Reader& r, ModelConfig& c) {
  if (c.IsMla()) {
    if (c.qk_rope_head_dim % 2 != 0) {
      return r.Error(absl::StrCat("'qk_rope_head_dim' must be even (RoPE rotates pairs), got ",
                                  c.qk_rope_head_dim));
    }
  } else {
    if (c.hidden_size % c.num_attention_heads != 0) {
      return r.Error(absl::StrCat("'hidden_size' (", c.hidden_size,
                                  ") must be divisible by 'num_attention_heads' (",
                                  c.num_attention_heads, ")"));
    }
    c.head_dim = c.hidden_size / c.num_attention_heads;
    if (c.head_dim % 2 != 0) {
      return r.Error(absl::StrCat("head_dim = 'hidden_size' / 'num_attention_heads' = ", c.head_dim,
                                  " must be even (RoPE rotates pairs)"));
    }
    if (c.num_attention_heads % c.num_key_value_heads != 0) {
      return r.Error(absl::StrCat("'num_attention_heads' (", c.num_attention_heads,
                                  ") must be divisible by 'num_key_value_heads' (",
                                  c.num_key_value_heads, ")"));
    }
  }

  const bool moe = c.n_routed_experts > 0;
  if (moe) {
    if (c.num_experts_per_tok < 1 || c.num_experts_per_tok > c.n_routed_experts) {
      return r.Error(absl::StrCat("'num_experts_per_tok' (", c.num_experts_per_tok,
                                  ") must be in [1, 'n_routed_experts' = ", c.n_routed_experts,
                                  "]"));
    }
    if (c.moe_intermediate_size <= 0) {
      return r.Error(absl::StrCat("'moe_intermediate_size' must be positive for MoE layers, got ",
                                  c.moe_intermediate_size));
    }
    if (c.topk_method != TopkMethod::kGreedy) {
      if (c.n_routed_experts % c.n_group != 0) {
        return r.Error(absl::StrCat("'n_routed_experts' (", c.n_routed_experts,
                                    ") must be divisible by 'n_group' (", c.n_group, ")"));
      }
      if (c.topk_group < 1 || c.topk_group > c.n_group) {
        return r.Error(absl::StrCat("'topk_group' (", c.topk_group,
                                    ") must be in [1, 'n_group' = ", c.n_group, "]"));
      }
      const int64_t per_group = c.n_routed_experts / c.n_group;
      if (c.n_group > 1 && c.topk_group * per_group < c.num_experts_per_tok) {
        return r.Error(absl::StrCat("'topk_group' (", c.topk_group, ") groups of ", per_group,
                                    " experts ('n_routed_experts' / 'n_group') cannot supply "
                                    "'num_experts_per_tok' (",
                                    c.num_experts_per_tok, ") experts"));
      }
      if (c.topk_method == TopkMethod::kNoauxTc && c.n_group > 1 && per_group < 2) {
        return r.Error(
            absl::StrCat("'topk_method' noaux_tc scores a group by its top-2 experts; "
                         "'n_routed_experts' / 'n_group' = ",
                         per_group, " must be >= 2"));
      }
    }
  }
  // A layer is dense when !IsMoeLayer(i): all of them without routed experts, layer 0
  // when first_k_dense_replace > 0, layer 1 when moe_layer_freq > 1.
  const bool any_dense =
      !moe || c.first_k_dense_replace > 0 || (c.moe_layer_freq > 1 && c.num_hidden_layers > 1);
  if (any_dense && c.intermediate_size <= 0) {
    return r.Error(absl::StrCat(
        "'intermediate_size' must be positive (some layers are dense), got ", c.intermediate_size));
  }
  return absl::OkStatus();
}

absl::StatusOr<ModelConfig> Parse(const std::string& json_text, const std::string& where) {
  Json root;
  try {
    root = Json::parse(json_text);
  } catch (const Json::exception& e) {  // parse_error, or out_of_range for 1e999
    return absl::InvalidArgumentError(absl::StrCat(where, ": invalid JSON: ", e.what()));
  }
  if (!root.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": top level must be a JSON object, got ", root.type_name()));
  }
  const Reader r(root, where);
  ModelConfig c;
  DMOE_ASSIGN_OR_RETURN(c.model_type, ParseModelType(root, where));
  const Defaults& d = c.model_type == ModelType::kDeepseek     ? kDeepseekDefaults
                      : c.model_type == ModelType::kDeepseekV2 ? kDeepseekV2Defaults
                                                               : kDeepseekV3Defaults;

  DMOE_ASSIGN_OR_RETURN(c.vocab_size, r.Int("vocab_size", d.vocab_size, 1));
  DMOE_ASSIGN_OR_RETURN(c.hidden_size, r.Int("hidden_size", d.hidden_size, 1));
  // Sizes that only matter for some layers are checked in Validate.
  DMOE_ASSIGN_OR_RETURN(c.intermediate_size, r.Int("intermediate_size", d.intermediate_size, 0));
  DMOE_ASSIGN_OR_RETURN(c.moe_intermediate_size,
                        r.Int("moe_intermediate_size", d.moe_intermediate_size, 0));
  DMOE_ASSIGN_OR_RETURN(c.num_hidden_layers, r.Int("num_hidden_layers", d.num_hidden_layers, 1));
  DMOE_ASSIGN_OR_RETURN(c.num_attention_heads,
                        r.Int("num_attention_heads", d.num_attention_heads, 1));
  DMOE_ASSIGN_OR_RETURN(
      c.num_key_value_heads,
      r.Int("num_key_value_heads", d.num_key_value_heads.value_or(c.num_attention_heads), 1,
            c.num_attention_heads));

  // MoE. None/null: no routed experts (all layers dense), no shared experts.
  DMOE_ASSIGN_OR_RETURN(c.n_routed_experts,
                        r.Int("n_routed_experts", d.n_routed_experts.value_or(0), 0, 0));
  DMOE_ASSIGN_OR_RETURN(c.n_shared_experts,
                        r.Int("n_shared_experts", d.n_shared_experts.value_or(0), 0, 0));
  DMOE_ASSIGN_OR_RETURN(c.num_experts_per_tok,
                        r.Int("num_experts_per_tok", d.num_experts_per_tok.value_or(0), 0, 0));
  DMOE_ASSIGN_OR_RETURN(c.moe_layer_freq, r.Int("moe_layer_freq", 1, 1));
  DMOE_ASSIGN_OR_RETURN(c.first_k_dense_replace,
                        r.Int("first_k_dense_replace", d.first_k_dense_replace, 0));
  DMOE_ASSIGN_OR_RETURN(c.norm_topk_prob, r.Bool("norm_topk_prob", d.norm_topk_prob));
  DMOE_ASSIGN_OR_RETURN(std::string scoring,
                        r.Enum("scoring_func", d.scoring_func, {"softmax", "sigmoid"}));
  c.scoring_func = scoring == "sigmoid" ? ScoringFunc::kSigmoid : ScoringFunc::kSoftmax;

  if (c.model_type == ModelType::kDeepseek) {
    // DeepSeekMoE's gate is plain greedy top-k without group limit or scaling; its HF
    // class has none of these keys, so any that a config carries are ignored.
    c.topk_method = TopkMethod::kGreedy;
    c.n_group = 1;
    c.topk_group = 1;
    c.routed_scaling_factor = 1.0;
  } else {
    DMOE_ASSIGN_OR_RETURN(std::string method,
                          r.Enum("topk_method", d.topk_method,
                                 {"greedy", "gready", "group_limited_greedy", "noaux_tc"}));
    c.topk_method = method == "noaux_tc"               ? TopkMethod::kNoauxTc
                    : method == "group_limited_greedy" ? TopkMethod::kGroupLimitedGreedy
                                                       : TopkMethod::kGreedy;
    DMOE_ASSIGN_OR_RETURN(c.n_group, r.Int("n_group", d.n_group.value_or(1), 1, 1));
    DMOE_ASSIGN_OR_RETURN(c.topk_group, r.Int("topk_group", d.topk_group.value_or(1), 1, 1));
    if (c.topk_method == TopkMethod::kGreedy) {
      // HF's greedy gate never looks at groups; normalise so that gating code which
      // keys the group limit on n_group > 1 cannot apply one.
      c.n_group = 1;
      c.topk_group = 1;
    }
    DMOE_ASSIGN_OR_RETURN(c.routed_scaling_factor,
                          r.Double("routed_scaling_factor", d.routed_scaling_factor, true));

    // MLA. q_lora_rank None/null/0: plain q_proj.
    DMOE_ASSIGN_OR_RETURN(c.q_lora_rank, r.Int("q_lora_rank", d.q_lora_rank.value_or(0), 0, 0));
    DMOE_ASSIGN_OR_RETURN(c.kv_lora_rank, r.Int("kv_lora_rank", 512, 1));
    DMOE_ASSIGN_OR_RETURN(c.qk_nope_head_dim, r.Int("qk_nope_head_dim", 128, 1));
    DMOE_ASSIGN_OR_RETURN(c.qk_rope_head_dim, r.Int("qk_rope_head_dim", 64, 1));
    DMOE_ASSIGN_OR_RETURN(c.v_head_dim, r.Int("v_head_dim", 128, 1));
  }

  DMOE_RETURN_IF_ERROR(r.Enum("hidden_act", "silu", {"silu"}).status());
  DMOE_ASSIGN_OR_RETURN(bool attention_bias, r.Bool("attention_bias", false));
  if (attention_bias) {
    return r.Error("'attention_bias' true is unsupported (supported: false)");
  }
  DMOE_ASSIGN_OR_RETURN(c.rms_norm_eps, r.Double("rms_norm_eps", 1e-6, true));
  DMOE_ASSIGN_OR_RETURN(c.rope_theta, r.Double("rope_theta", 10000.0, true));
  DMOE_RETURN_IF_ERROR(ParseRopeScaling(r, &c.rope_scaling));
  DMOE_ASSIGN_OR_RETURN(c.max_position_embeddings,
                        r.Int("max_position_embeddings", d.max_position_embeddings, 1));
  DMOE_ASSIGN_OR_RETURN(c.tie_word_embeddings, r.Bool("tie_word_embeddings", false));
  DMOE_RETURN_IF_ERROR(ParseSpecialTokens(r, d, &c));
  DMOE_RETURN_IF_ERROR(ParseQuantization(r, &c));
  DMOE_RETURN_IF_ERROR(Validate(r, c));
  return c;
}

}  // namespace

double ModelConfig::SoftmaxScale() const {
  const double dim = static_cast<double>(IsMla() ? qk_nope_head_dim + qk_rope_head_dim : head_dim);
  double scale = 1.0 / std::sqrt(dim);
  if (rope_scaling.type == RopeScalingType::kYarn && rope_scaling.mscale_all_dim != 0.0 &&
      rope_scaling.factor > 1.0) {
    const double m = 0.1 * rope_scaling.mscale_all_dim * std::log(rope_scaling.factor) + 1.0;
    scale *= m * m;
  }
  return scale;
}

absl::StatusOr<ModelConfig> ModelConfig::FromJson(const std::string& json_text) {
  return Parse(json_text, "config.json");
}

absl::StatusOr<ModelConfig> ModelConfig::FromFile(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) {
    return absl::NotFoundError(absl::StrCat(path, ": config file not found"));
  }
  if (std::filesystem::is_directory(path, ec)) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": is a directory, not a config.json"));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in.is_open()) {
    return absl::PermissionDeniedError(absl::StrCat(path, ": cannot open config file"));
  }
  std::stringstream buf;
  buf << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat(path, ": error reading config file"));
  return Parse(buf.str(), path);
}

std::string ModelTypeName(ModelType t) {
  switch (t) {
    case ModelType::kDeepseek:
      return "deepseek";
    case ModelType::kDeepseekV2:
      return "deepseek_v2";
    case ModelType::kDeepseekV3:
      return "deepseek_v3";
  }
  return "?";
}

}  // namespace dmoe::core
