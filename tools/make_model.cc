#include "tools/make_model.h"

#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/args.h"
#include "core/dtype.h"
#include "core/status.h"
#include "text/tokenizer.h"
#include "tools/commands.h"
#include "tools/generated_tokenizer.h"

namespace dmoe::tools {
namespace {

using json = nlohmann::json;
using core::DType;
using Decl = core::SafetensorsWriter::Decl;

constexpr int64_t kFp8Block = 128;
constexpr float kE4M3Max = 448.0f;

// ---------------------------------------------------------------------------
// Presets

struct Preset {
  const char* name;
  const char* model_type;  // "deepseek" | "deepseek_v2" | "deepseek_v3"
  int64_t vocab, hidden, intermediate, moe_intermediate, layers, heads;
  int64_t q_lora_rank;  // 0: JSON null (plain q_proj)
  int64_t kv_lora_rank, qk_nope, qk_rope, v_head;
  int64_t n_routed, n_shared, top_k, n_group, topk_group, first_k_dense;
  const char* topk_method;
  const char* scoring_func;
  bool norm_topk_prob;
  double routed_scaling_factor;
  double mscale, mscale_all_dim;  // YaRN; rope_scaling null when 0
  int64_t max_position_embeddings, bos, eos;
};

// clang-format off
constexpr Preset kPresets[] = {
  {.name = "tiny-v2lite", .model_type = "deepseek_v2",
   .vocab = 512, .hidden = 64, .intermediate = 128, .moe_intermediate = 32, .layers = 3, .heads = 4,
   .q_lora_rank = 0, .kv_lora_rank = 32, .qk_nope = 16, .qk_rope = 8, .v_head = 16,
   .n_routed = 16, .n_shared = 2, .top_k = 4, .n_group = 1, .topk_group = 1, .first_k_dense = 1,
   .topk_method = "greedy", .scoring_func = "softmax", .norm_topk_prob = false,
   .routed_scaling_factor = 1.0, .mscale = 0.707, .mscale_all_dim = 0.707,
   .max_position_embeddings = 163840, .bos = 0, .eos = 1},
  {.name = "tiny-v3", .model_type = "deepseek_v3",
   .vocab = 512, .hidden = 64, .intermediate = 128, .moe_intermediate = 32, .layers = 3, .heads = 4,
   .q_lora_rank = 48, .kv_lora_rank = 32, .qk_nope = 16, .qk_rope = 8, .v_head = 16,
   .n_routed = 16, .n_shared = 1, .top_k = 4, .n_group = 4, .topk_group = 2, .first_k_dense = 1,
   .topk_method = "noaux_tc", .scoring_func = "sigmoid", .norm_topk_prob = true,
   .routed_scaling_factor = 2.5, .mscale = 1.0, .mscale_all_dim = 1.0,
   .max_position_embeddings = 163840, .bos = 0, .eos = 1},
  // DeepSeekMoE 16B layout: multi-head attention, no MLA keys, no rope scaling.
  {.name = "tiny-moe16b", .model_type = "deepseek",
   .vocab = 512, .hidden = 64, .intermediate = 128, .moe_intermediate = 32, .layers = 3, .heads = 4,
   .q_lora_rank = 0, .kv_lora_rank = 0, .qk_nope = 0, .qk_rope = 0, .v_head = 0,
   .n_routed = 16, .n_shared = 2, .top_k = 4, .n_group = 1, .topk_group = 1, .first_k_dense = 1,
   .topk_method = "greedy", .scoring_func = "softmax", .norm_topk_prob = false,
   .routed_scaling_factor = 1.0, .mscale = 0.0, .mscale_all_dim = 0.0,
   .max_position_embeddings = 4096, .bos = 0, .eos = 1},
  {.name = "v2lite", .model_type = "deepseek_v2",
   .vocab = 102400, .hidden = 2048, .intermediate = 10944, .moe_intermediate = 1408, .layers = 27,
   .heads = 16, .q_lora_rank = 0, .kv_lora_rank = 512, .qk_nope = 128, .qk_rope = 64, .v_head = 128,
   .n_routed = 64, .n_shared = 2, .top_k = 6, .n_group = 1, .topk_group = 1, .first_k_dense = 1,
   .topk_method = "greedy", .scoring_func = "softmax", .norm_topk_prob = false,
   .routed_scaling_factor = 1.0, .mscale = 0.707, .mscale_all_dim = 0.707,
   .max_position_embeddings = 163840, .bos = 100000, .eos = 100001},
  {.name = "v3", .model_type = "deepseek_v3",
   .vocab = 129280, .hidden = 7168, .intermediate = 18432, .moe_intermediate = 2048, .layers = 61,
   .heads = 128, .q_lora_rank = 1536, .kv_lora_rank = 512, .qk_nope = 128, .qk_rope = 64,
   .v_head = 128, .n_routed = 256, .n_shared = 1, .top_k = 8, .n_group = 8, .topk_group = 4,
   .first_k_dense = 3, .topk_method = "noaux_tc", .scoring_func = "sigmoid", .norm_topk_prob = true,
   .routed_scaling_factor = 2.5, .mscale = 1.0, .mscale_all_dim = 1.0,
   .max_position_embeddings = 163840, .bos = 0, .eos = 1},
};
// clang-format on

const char* Architecture(std::string_view model_type) {
  if (model_type == "deepseek") return "DeepseekForCausalLM";
  if (model_type == "deepseek_v2") return "DeepseekV2ForCausalLM";
  return "DeepseekV3ForCausalLM";
}

// ---------------------------------------------------------------------------
// Random numbers: splitmix64, one stream per (seed, tensor name).

uint64_t SplitMix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t Fnv1a(std::string_view s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ull;
  return h;
}

// Uniform on [center - half, center + half).
class Uniform {
 public:
  Uniform(uint64_t seed, std::string_view name, float center, float half)
      : state_(seed ^ Fnv1a(name)), center_(center), half_(half) {
    SplitMix64(state_);  // decorrelate nearby seeds
  }
  float Next() {
    // 24 random bits -> [-1, 1) exactly representable in float.
    const float u = static_cast<float>(SplitMix64(state_) >> 40) * (2.0f / 16777216.0f) - 1.0f;
    return center_ + half_ * u;
  }

 private:
  uint64_t state_;
  float center_, half_;
};

// ---------------------------------------------------------------------------
// Tensor list

struct Spec {
  Decl decl;
  float center = 0.0f, half = 0.0f;  // value distribution
  bool is_scale = false;             // FP8 "_scale_inv", computed with the previous tensor
};

absl::StatusOr<int64_t> GetInt(const json& c, const char* key, bool allow_null = false) {
  auto it = c.find(key);
  if (it == c.end()) return absl::InvalidArgumentError(absl::StrCat("config: missing '", key, "'"));
  if (allow_null && it->is_null()) return 0;
  if (!it->is_number_integer() || it->get<int64_t>() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("config: '", key, "' must be a non-negative integer, got ", it->dump()));
  }
  return it->get<int64_t>();
}

float UniformHalfWidth(double stddev) { return static_cast<float>(stddev * std::sqrt(3.0)); }

class SpecBuilder {
 public:
  explicit SpecBuilder(WeightFormat f) : format_(f) {}

  // A matrix [rows, cols] with std 1/sqrt(cols) (or `stddev`), FP8-quantised in
  // layers.
  void Matrix(const std::string& name, int64_t rows, int64_t cols, bool quantizable,
              double stddev = 0.0) {
    if (stddev == 0.0) stddev = 1.0 / std::sqrt(static_cast<double>(cols));
    const bool fp8 = quantizable && format_ == WeightFormat::kFP8;
    specs_.push_back({{name, fp8 ? DType::kF8E4M3 : PlainDType(), {rows, cols}},
                      0.0f,
                      UniformHalfWidth(stddev),
                      false});
    if (fp8) {
      specs_.push_back({{name + "_scale_inv",
                         DType::kF32,
                         {(rows + kFp8Block - 1) / kFp8Block, (cols + kFp8Block - 1) / kFp8Block}},
                        0.0f,
                        0.0f,
                        true});
    }
  }
  void Norm(const std::string& name, int64_t n) {
    specs_.push_back({{name, PlainDType(), {n}}, 1.0f, 0.1f, false});
  }
  void Bias(const std::string& name, int64_t n) {
    const DType t = (format_ == WeightFormat::kF16) ? DType::kF16 : DType::kF32;
    specs_.push_back({{name, t, {n}}, 0.0f, 0.05f, false});
  }
  std::vector<Spec> Take() { return std::move(specs_); }

 private:
  DType PlainDType() const {
    switch (format_) {
      case WeightFormat::kF32:
        return DType::kF32;
      case WeightFormat::kF16:
        return DType::kF16;
      default:
        return DType::kBF16;
    }
  }
  WeightFormat format_;
  std::vector<Spec> specs_;
};

absl::StatusOr<std::vector<Spec>> BuildSpecs(const json& c, WeightFormat format) {
  if (!c.is_object() || !c.contains("model_type") || !c["model_type"].is_string()) {
    return absl::InvalidArgumentError("config: missing string 'model_type'");
  }
  const std::string type = c["model_type"].get<std::string>();
  if (type != "deepseek" && type != "deepseek_v2" && type != "deepseek_v3") {
    return absl::InvalidArgumentError(absl::StrCat("config: unsupported model_type '", type, "'"));
  }
  const bool mla = type != "deepseek";
  DMOE_ASSIGN_OR_RETURN(const int64_t vocab, GetInt(c, "vocab_size"));
  DMOE_ASSIGN_OR_RETURN(const int64_t hidden, GetInt(c, "hidden_size"));
  DMOE_ASSIGN_OR_RETURN(const int64_t inter, GetInt(c, "intermediate_size"));
  DMOE_ASSIGN_OR_RETURN(const int64_t moe_inter, GetInt(c, "moe_intermediate_size"));
  DMOE_ASSIGN_OR_RETURN(const int64_t layers, GetInt(c, "num_hidden_layers"));
  DMOE_ASSIGN_OR_RETURN(const int64_t heads, GetInt(c, "num_attention_heads"));
  DMOE_ASSIGN_OR_RETURN(const int64_t kv_heads, GetInt(c, "num_key_value_heads"));
  DMOE_ASSIGN_OR_RETURN(const int64_t n_routed, GetInt(c, "n_routed_experts", true));
  DMOE_ASSIGN_OR_RETURN(const int64_t n_shared, GetInt(c, "n_shared_experts", true));
  DMOE_ASSIGN_OR_RETURN(const int64_t fkdr, GetInt(c, "first_k_dense_replace"));
  DMOE_ASSIGN_OR_RETURN(const int64_t freq, GetInt(c, "moe_layer_freq"));
  if (heads == 0 || freq == 0) {
    return absl::InvalidArgumentError("config: num_attention_heads and moe_layer_freq must be > 0");
  }
  const bool noaux = c.value("topk_method", std::string()) == "noaux_tc";

  int64_t q_lora = 0, kv_lora = 0, nope = 0, rope = 0, v_head = 0;
  if (mla) {
    DMOE_ASSIGN_OR_RETURN(q_lora, GetInt(c, "q_lora_rank", true));
    DMOE_ASSIGN_OR_RETURN(kv_lora, GetInt(c, "kv_lora_rank"));
    DMOE_ASSIGN_OR_RETURN(nope, GetInt(c, "qk_nope_head_dim"));
    DMOE_ASSIGN_OR_RETURN(rope, GetInt(c, "qk_rope_head_dim"));
    DMOE_ASSIGN_OR_RETURN(v_head, GetInt(c, "v_head_dim"));
  }

  SpecBuilder b(format);
  b.Matrix("model.embed_tokens.weight", vocab, hidden, false);
  for (int64_t i = 0; i < layers; ++i) {
    const std::string p = absl::StrCat("model.layers.", i, ".");
    b.Norm(p + "input_layernorm.weight", hidden);
    const std::string a = p + "self_attn.";
    if (mla) {
      if (q_lora > 0) {
        b.Matrix(a + "q_a_proj.weight", q_lora, hidden, true);
        b.Norm(a + "q_a_layernorm.weight", q_lora);
        b.Matrix(a + "q_b_proj.weight", heads * (nope + rope), q_lora, true);
      } else {
        b.Matrix(a + "q_proj.weight", heads * (nope + rope), hidden, true);
      }
      b.Matrix(a + "kv_a_proj_with_mqa.weight", kv_lora + rope, hidden, true);
      b.Norm(a + "kv_a_layernorm.weight", kv_lora);
      b.Matrix(a + "kv_b_proj.weight", heads * (nope + v_head), kv_lora, true);
      b.Matrix(a + "o_proj.weight", hidden, heads * v_head, true);
    } else {
      const int64_t head_dim = hidden / heads;
      b.Matrix(a + "q_proj.weight", heads * head_dim, hidden, true);
      b.Matrix(a + "k_proj.weight", kv_heads * head_dim, hidden, true);
      b.Matrix(a + "v_proj.weight", kv_heads * head_dim, hidden, true);
      b.Matrix(a + "o_proj.weight", hidden, heads * head_dim, true);
    }
    b.Norm(p + "post_attention_layernorm.weight", hidden);
    const std::string m = p + "mlp.";
    const bool moe = n_routed > 0 && i >= fkdr && i % freq == 0;
    if (!moe) {
      b.Matrix(m + "gate_proj.weight", inter, hidden, true);
      b.Matrix(m + "up_proj.weight", inter, hidden, true);
      b.Matrix(m + "down_proj.weight", hidden, inter, true);
      continue;
    }
    // Twice the projection std so the router logits spread and routing is
    // non-trivial.
    b.Matrix(m + "gate.weight", n_routed, hidden, false,
             2.0 / std::sqrt(static_cast<double>(hidden)));
    if (noaux) b.Bias(m + "gate.e_score_correction_bias", n_routed);
    for (int64_t e = 0; e < n_routed; ++e) {
      const std::string x = absl::StrCat(m, "experts.", e, ".");
      b.Matrix(x + "gate_proj.weight", moe_inter, hidden, true);
      b.Matrix(x + "up_proj.weight", moe_inter, hidden, true);
      b.Matrix(x + "down_proj.weight", hidden, moe_inter, true);
    }
    if (n_shared > 0) {
      const int64_t s = n_shared * moe_inter;
      b.Matrix(m + "shared_experts.gate_proj.weight", s, hidden, true);
      b.Matrix(m + "shared_experts.up_proj.weight", s, hidden, true);
      b.Matrix(m + "shared_experts.down_proj.weight", hidden, s, true);
    }
  }
  b.Norm("model.norm.weight", hidden);
  b.Matrix("lm_head.weight", vocab, hidden, false);
  return b.Take();
}

uint64_t NumBytes(const Decl& d) {
  uint64_t n = core::DTypeSize(d.dtype);
  for (int64_t x : d.shape) n *= static_cast<uint64_t>(x);
  return n;
}

uint64_t NumElements(const Decl& d) {
  uint64_t n = 1;
  for (int64_t x : d.shape) n *= static_cast<uint64_t>(x);
  return n;
}

// ---------------------------------------------------------------------------
// Generating one tensor

void Store(DType t, float v, uint8_t* dst, size_t i) {
  switch (t) {
    case DType::kF32:
      std::memcpy(dst + 4 * i, &v, 4);
      return;
    case DType::kBF16: {
      const uint16_t h = core::F32ToBF16(v);
      std::memcpy(dst + 2 * i, &h, 2);
      return;
    }
    case DType::kF16: {
      const uint16_t h = internal::F32ToF16(v);
      std::memcpy(dst + 2 * i, &h, 2);
      return;
    }
    case DType::kF8E4M3:
      dst[i] = internal::FastF32ToF8E4M3(v);
      return;
  }
}

// Fills `out` with the tensor's bytes; for FP8 also fills `scales` (row-major
// [ceil(rows/128), ceil(cols/128)]) with max|w|/448 per block.
void Generate(const Spec& s, uint64_t seed, std::vector<uint8_t>& out, std::vector<float>& scales) {
  out.resize(NumBytes(s.decl));
  Uniform rng(seed, s.decl.name, s.center, s.half);
  if (s.decl.dtype != DType::kF8E4M3) {
    const uint64_t n = NumElements(s.decl);
    for (uint64_t i = 0; i < n; ++i) Store(s.decl.dtype, rng.Next(), out.data(), i);
    return;
  }
  const int64_t rows = s.decl.shape[0], cols = s.decl.shape[1];
  const int64_t scols = (cols + kFp8Block - 1) / kFp8Block;
  scales.assign(static_cast<size_t>((rows + kFp8Block - 1) / kFp8Block * scols), 0.0f);
  std::vector<float> strip;
  for (int64_t r0 = 0; r0 < rows; r0 += kFp8Block) {
    const int64_t nr = std::min(kFp8Block, rows - r0);
    strip.resize(static_cast<size_t>(nr * cols));
    for (float& v : strip) v = rng.Next();
    float* srow = scales.data() + (r0 / kFp8Block) * scols;
    for (int64_t r = 0; r < nr; ++r) {
      for (int64_t c = 0; c < cols; ++c) {
        srow[c / kFp8Block] = std::max(srow[c / kFp8Block], std::fabs(strip[r * cols + c]));
      }
    }
    for (int64_t j = 0; j < scols; ++j) srow[j] = srow[j] > 0.0f ? srow[j] / kE4M3Max : 1.0f;
    for (int64_t r = 0; r < nr; ++r) {
      for (int64_t c = 0; c < cols; ++c) {
        out[(r0 + r) * cols + c] =
            internal::FastF32ToF8E4M3(strip[r * cols + c] / srow[c / kFp8Block]);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Files

absl::Status ErrnoError(int err, const std::string& what) {
  return absl::Status(absl::ErrnoToStatusCode(err), absl::StrCat(what, ": ", std::strerror(err)));
}

absl::Status WriteTextFile(const std::string& path, const std::string& text) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) return ErrnoError(errno, absl::StrCat("cannot create ", path));
  const bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size();
  const int err = errno;
  if (std::fclose(f) != 0 || !ok)
    return ErrnoError(ok ? errno : err, absl::StrCat("writing ", path));
  return absl::OkStatus();
}

std::string HumanBytes(double b) {
  const char* units[] = {"B", "KB", "MB", "GB", "TB"};
  int u = 0;
  while (b >= 1000.0 && u < 4) {
    b /= 1000.0;
    ++u;
  }
  return u == 0 ? absl::StrFormat("%.0f B", b) : absl::StrFormat("%.1f %s", b, units[u]);
}

std::string HumanCount(double n) {
  if (n >= 1e9) return absl::StrFormat("%.2fB", n / 1e9);
  if (n >= 1e6) return absl::StrFormat("%.2fM", n / 1e6);
  if (n >= 1e3) return absl::StrFormat("%.1fK", n / 1e3);
  return absl::StrFormat("%.0f", n);
}

// Splits the tensors (an FP8 weight stays with its scale) into `k` contiguous,
// non-empty shards of roughly equal bytes. Returns the first spec index of each
// shard.
std::vector<size_t> ShardStarts(const std::vector<Spec>& specs, int k) {
  std::vector<size_t> units;  // spec index where each unit starts
  for (size_t i = 0; i < specs.size(); ++i) {
    if (!specs[i].is_scale) units.push_back(i);
  }
  uint64_t total = 0;
  for (const Spec& s : specs) total += NumBytes(s.decl);
  std::vector<size_t> starts = {0};
  uint64_t cum = 0;
  size_t in_shard = 0;
  for (size_t u = 0; u < units.size(); ++u) {
    const size_t shard = starts.size() - 1;
    const size_t shards_left = static_cast<size_t>(k) - 1 - shard;
    const bool full = static_cast<double>(cum) >= static_cast<double>(total) * (shard + 1) / k;
    if (in_shard > 0 && shards_left > 0 && (full || units.size() - u == shards_left)) {
      starts.push_back(units[u]);
      in_shard = 0;
    }
    const size_t end = u + 1 < units.size() ? units[u + 1] : specs.size();
    for (size_t i = units[u]; i < end; ++i) cum += NumBytes(specs[i].decl);
    ++in_shard;
  }
  return starts;
}

class Progress {
 public:
  Progress(bool enabled, size_t total) : enabled_(enabled), total_(total) {}
  void Update(size_t done, uint64_t bytes) {
    if (!enabled_) return;
    const auto now = std::chrono::steady_clock::now();
    if (done != total_ && now - last_ < std::chrono::milliseconds(200)) return;
    last_ = now;
    std::fprintf(stderr, "\rwriting %zu/%zu tensors (%s)   ", done, total_,
                 HumanBytes(static_cast<double>(bytes)).c_str());
    if (done == total_) std::fputc('\n', stderr);
    std::fflush(stderr);
  }

 private:
  bool enabled_;
  size_t total_;
  std::chrono::steady_clock::time_point last_{};
};

}  // namespace

// ---------------------------------------------------------------------------
// Public API

namespace internal {

uint8_t FastF32ToF8E4M3(float f) { return core::F32ToF8E4M3Fast(f); }

uint16_t F32ToF16(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return sign | 0x7e00u;   // NaN
  if (ax >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to infinity
  if (ax < 0x38800000u) {
    // Below 2^-14: subnormal, a multiple of 2^-24. Scaling by 2^24 is exact and
    // nearbyint rounds to nearest even in the default rounding mode.
    const float m = std::nearbyint(std::bit_cast<float>(ax) * 16777216.0f);
    return sign | static_cast<uint16_t>(m);
  }
  // Normal: round the 23-bit mantissa to 10 bits (nearest even); a carry moves
  // into the exponent, which is rebiased from 127 to 15.
  const uint32_t r = ax + 0xfffu + ((ax >> 13) & 1u) - (112u << 23);
  return sign | static_cast<uint16_t>(r >> 13);
}

}  // namespace internal

absl::StatusOr<WeightFormat> ParseWeightFormat(const std::string& s) {
  if (s == "bf16") return WeightFormat::kBF16;
  if (s == "f32") return WeightFormat::kF32;
  if (s == "f16") return WeightFormat::kF16;
  if (s == "fp8") return WeightFormat::kFP8;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown weight dtype '", s, "' (valid: bf16, f32, f16, fp8)"));
}

std::vector<std::string> PresetNames() {
  std::vector<std::string> names;
  for (const Preset& p : kPresets) names.push_back(p.name);
  return names;
}

absl::StatusOr<json> PresetConfig(const std::string& preset, int layers_override) {
  const Preset* p = nullptr;
  for (const Preset& q : kPresets) {
    if (preset == q.name) p = &q;
  }
  if (p == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        "unknown preset '", preset, "' (valid: ", absl::StrJoin(PresetNames(), ", "), ")"));
  }
  if (layers_override < 0) {
    return absl::InvalidArgumentError(absl::StrCat("layers must be >= 1, got ", layers_override));
  }
  const int64_t layers = layers_override > 0 ? layers_override : p->layers;
  // first_k_dense_replace < layers, so that a cut-down model keeps a MoE layer.
  const int64_t fkdr = std::min<int64_t>(p->first_k_dense, layers - 1);
  const std::string type = p->model_type;

  json c = {
      {"architectures", json::array({Architecture(type)})},
      {"model_type", type},
      {"vocab_size", p->vocab},
      {"hidden_size", p->hidden},
      {"intermediate_size", p->intermediate},
      {"moe_intermediate_size", p->moe_intermediate},
      {"num_hidden_layers", layers},
      {"num_attention_heads", p->heads},
      {"num_key_value_heads", p->heads},
      {"n_routed_experts", p->n_routed},
      {"n_shared_experts", p->n_shared},
      {"num_experts_per_tok", p->top_k},
      {"first_k_dense_replace", fkdr},
      {"moe_layer_freq", 1},
      {"scoring_func", p->scoring_func},
      {"norm_topk_prob", p->norm_topk_prob},
      {"aux_loss_alpha", 0.001},
      {"seq_aux", true},
      {"hidden_act", "silu"},
      {"rms_norm_eps", 1e-6},
      {"rope_theta", 10000},
      {"max_position_embeddings", p->max_position_embeddings},
      {"bos_token_id", p->bos},
      {"eos_token_id", p->eos},
      {"tie_word_embeddings", false},
      {"attention_bias", false},
      {"attention_dropout", 0.0},
      {"initializer_range", 0.02},
      {"pretraining_tp", 1},
      {"use_cache", true},
      {"torch_dtype", "bfloat16"},
  };
  if (p->mscale > 0.0) {
    c["rope_scaling"] = {{"type", "yarn"},
                         {"factor", 40},
                         {"original_max_position_embeddings", 4096},
                         {"beta_fast", 32},
                         {"beta_slow", 1},
                         {"mscale", p->mscale},
                         {"mscale_all_dim", p->mscale_all_dim}};
  } else {
    c["rope_scaling"] = nullptr;
  }
  if (type != "deepseek") {
    c["q_lora_rank"] = p->q_lora_rank > 0 ? json(p->q_lora_rank) : json(nullptr);
    c["kv_lora_rank"] = p->kv_lora_rank;
    c["qk_nope_head_dim"] = p->qk_nope;
    c["qk_rope_head_dim"] = p->qk_rope;
    c["v_head_dim"] = p->v_head;
    c["n_group"] = p->n_group;
    c["topk_group"] = p->topk_group;
    c["topk_method"] = p->topk_method;
    c["routed_scaling_factor"] = p->routed_scaling_factor;
    c["ep_size"] = 1;
  }
  if (type == "deepseek_v3") c["num_nextn_predict_layers"] = 0;
  return c;
}

absl::StatusOr<std::vector<Decl>> ModelTensors(const json& config, WeightFormat format) {
  DMOE_ASSIGN_OR_RETURN(std::vector<Spec> specs, BuildSpecs(config, format));
  std::vector<Decl> decls;
  decls.reserve(specs.size());
  for (Spec& s : specs) decls.push_back(std::move(s.decl));
  return decls;
}

absl::Status WriteRandomModel(const MakeModelOptions& o, MakeModelSummary* summary) {
  namespace fs = std::filesystem;
  if (o.layers < 0)
    return absl::InvalidArgumentError(absl::StrCat("--layers must be >= 1, got ", o.layers));
  if (o.shards < 1)
    return absl::InvalidArgumentError(absl::StrCat("--shards must be >= 1, got ", o.shards));
  DMOE_ASSIGN_OR_RETURN(json config, PresetConfig(o.preset, o.layers));
  std::unique_ptr<text::Tokenizer> tokenizer;
  std::optional<GeneratedTokenizer> generated;
  if (!o.tokenizer_dir.empty()) {
    DMOE_ASSIGN_OR_RETURN(tokenizer, text::Tokenizer::Load(o.tokenizer_dir));
    config["vocab_size"] =
        std::max<int64_t>(config["vocab_size"].get<int64_t>(), tokenizer->vocab_size());
    if (tokenizer->bos_id()) config["bos_token_id"] = *tokenizer->bos_id();
    if (tokenizer->eos_id()) config["eos_token_id"] = *tokenizer->eos_id();
  } else if (o.generate_tokenizer) {
    GeneratedTokenizerOptions g;
    g.vocab_size = config["vocab_size"].get<int64_t>();
    g.bos_id = config["bos_token_id"].get<int64_t>();
    g.eos_id = config["eos_token_id"].get<int64_t>();
    g.model_max_length = config["max_position_embeddings"].get<int64_t>();
    DMOE_ASSIGN_OR_RETURN(generated, GenerateTokenizer(g));
    // Never write a tokenizer the servers would refuse.
    absl::StatusOr<std::unique_ptr<text::Tokenizer>> check =
        text::Tokenizer::FromJson(generated->tokenizer_json, generated->tokenizer_config_json);
    if (!check.ok()) {
      return absl::InternalError(
          absl::StrCat("the generated tokenizer does not load: ", check.status().message()));
    }
  }
  switch (o.format) {
    case WeightFormat::kF32:
      config["torch_dtype"] = "float32";
      break;
    case WeightFormat::kF16:
      config["torch_dtype"] = "float16";
      break;
    case WeightFormat::kFP8:
      config["quantization_config"] = {{"activation_scheme", "dynamic"},
                                       {"fmt", "e4m3"},
                                       {"quant_method", "fp8"},
                                       {"weight_block_size", {kFp8Block, kFp8Block}}};
      break;
    case WeightFormat::kBF16:
      break;
  }
  DMOE_ASSIGN_OR_RETURN(std::vector<Spec> specs, BuildSpecs(config, o.format));
  size_t units = 0;
  for (const Spec& s : specs) units += s.is_scale ? 0 : 1;
  if (static_cast<size_t>(o.shards) > units) {
    return absl::InvalidArgumentError(absl::StrCat("--shards ", o.shards, " exceeds the ", units,
                                                   " weight tensors of the model"));
  }

  std::error_code ec;
  fs::create_directories(o.out_dir, ec);
  if (ec || !fs::is_directory(o.out_dir)) {
    return absl::Status(ec ? absl::ErrnoToStatusCode(ec.value()) : absl::StatusCode::kAlreadyExists,
                        absl::StrCat("cannot create output directory ", o.out_dir, ": ",
                                     ec ? ec.message() : "a file of that name exists"));
  }
  const fs::path dir(o.out_dir);
  DMOE_RETURN_IF_ERROR(WriteTextFile((dir / "config.json").string(), config.dump(2) + "\n"));

  MakeModelSummary sum;
  const std::vector<size_t> starts = ShardStarts(specs, o.shards);
  json weight_map = json::object();
  Progress progress(o.progress, specs.size());
  std::vector<uint8_t> bytes;
  std::vector<float> scales;
  size_t done = 0;
  for (size_t k = 0; k < starts.size(); ++k) {
    const size_t begin = starts[k];
    const size_t end = k + 1 < starts.size() ? starts[k + 1] : specs.size();
    const std::string fname =
        o.shards == 1 ? "model.safetensors"
                      : absl::StrFormat("model-%05d-of-%05d.safetensors", k + 1, o.shards);
    const std::string path = (dir / fname).string();
    std::vector<Decl> decls;
    for (size_t i = begin; i < end; ++i) decls.push_back(specs[i].decl);
    DMOE_ASSIGN_OR_RETURN(
        auto writer, core::SafetensorsWriter::Create(path, std::move(decls), {{"format", "pt"}}));
    for (size_t i = begin; i < end; ++i) {
      const Spec& s = specs[i];
      if (s.is_scale) {
        // Block scales of the FP8 weight generated just before.
        DMOE_RETURN_IF_ERROR(
            writer->Write(s.decl.name, scales.data(), scales.size() * sizeof(float)));
      } else {
        Generate(s, o.seed, bytes, scales);
        DMOE_RETURN_IF_ERROR(writer->Write(s.decl.name, bytes.data(), bytes.size()));
        sum.params += static_cast<int64_t>(NumElements(s.decl));
      }
      sum.data_bytes += NumBytes(s.decl);
      weight_map[s.decl.name] = fname;
      progress.Update(++done, sum.data_bytes);
    }
    DMOE_RETURN_IF_ERROR(writer->Finish());
    sum.files.push_back(fname);
  }
  // Free the largest buffer before the next step.
  std::vector<uint8_t>().swap(bytes);

  const fs::path index_path = dir / "model.safetensors.index.json";
  if (o.shards > 1) {
    json index = {{"metadata", {{"total_size", sum.data_bytes}}}, {"weight_map", weight_map}};
    DMOE_RETURN_IF_ERROR(WriteTextFile(index_path.string(), index.dump(2) + "\n"));
    sum.files.push_back(index_path.filename().string());
  } else {
    // A stale index from an earlier sharded run would hide model.safetensors.
    fs::remove(index_path, ec);
  }
  sum.files.insert(sum.files.begin(), "config.json");
  if (generated.has_value()) {
    DMOE_RETURN_IF_ERROR(
        WriteTextFile((dir / "tokenizer.json").string(), generated->tokenizer_json));
    DMOE_RETURN_IF_ERROR(
        WriteTextFile((dir / "tokenizer_config.json").string(), generated->tokenizer_config_json));
    sum.files.push_back("tokenizer.json");
    sum.files.push_back("tokenizer_config.json");
  } else if (tokenizer == nullptr) {
    // Token ids only: a tokenizer from an earlier run would not match.
    for (const char* name : {"tokenizer.json", "tokenizer_config.json"}) {
      fs::remove(dir / name, ec);
    }
  }
  if (tokenizer != nullptr) {
    for (const char* name : {"tokenizer.json", "tokenizer_config.json"}) {
      const fs::path from = fs::path(o.tokenizer_dir) / name;
      const fs::path to = fs::path(o.out_dir) / name;
      if (!fs::exists(from)) {
        fs::remove(to, ec);  // not one left by an earlier run
        continue;
      }
      if (!fs::copy_file(from, to, fs::copy_options::overwrite_existing, ec) || ec) {
        return absl::InternalError(
            absl::StrCat("copying ", from.string(), " to ", to.string(), ": ", ec.message()));
      }
      sum.files.push_back(name);
    }
  }
  sum.tensors = static_cast<int64_t>(specs.size());
  if (summary != nullptr) *summary = std::move(sum);
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// dmoe make-model

int RunMakeModel(int argc, char** argv) {
  Args args("make-model",
            "write a random checkpoint in Hugging Face layout (config.json + "
            "safetensors)");
  args.Flag("preset", "NAME", absl::StrCat("model preset: ", absl::StrJoin(PresetNames(), ", ")),
            std::nullopt, /*required=*/true)
      .Flag("out", "DIR", "output directory (created if missing)", std::nullopt, true)
      .Flag("layers", "N", "number of layers (default: the preset's)")
      .Flag("seed", "S", "random seed", "0")
      .Flag("shards", "K", "number of safetensors files (K > 1 adds an index json)", "1")
      .Flag("weight-dtype", "T", "bf16, f32, f16 or fp8 (e4m3 with 128x128 block scales)", "bf16")
      .Flag("tokenizer", "DIR",
            "copy DIR's tokenizer.json and tokenizer_config.json into the model "
            "(vocab_size grows to the tokenizer's size); default: a generated "
            "byte-level BPE tokenizer (256 bytes + merges learned from a small "
            "English corpus, <｜begin▁of▁sentence｜>/<｜end▁of▁sentence｜> "
            "at the preset's bos/eos ids, a DeepSeek-style chat template)")
      .Flag("no-tokenizer", "", "write no tokenizer: the model takes and gives token ids only");
  if (absl::Status s = args.Parse(argc, argv, 2); !s.ok()) {
    std::fprintf(stderr, "dmoe %s\n", std::string(s.message()).c_str());
    return 2;
  }
  if (args.help_requested()) return 0;

  auto fail = [](const absl::Status& s) {
    std::fprintf(stderr, "dmoe make-model: %s\n", std::string(s.message()).c_str());
    return 1;
  };
  MakeModelOptions o;
  o.preset = args.Str("preset");
  o.out_dir = args.Str("out");
  if (args.Has("layers")) {
    absl::StatusOr<int64_t> layers = args.Int("layers");
    if (!layers.ok()) return fail(layers.status());
    if (*layers < 1 || *layers > 100000) {
      return fail(absl::InvalidArgumentError(absl::StrCat("--layers must be >= 1, got ", *layers)));
    }
    o.layers = static_cast<int>(*layers);
  }
  absl::StatusOr<int64_t> seed = args.Int("seed");
  if (!seed.ok()) return fail(seed.status());
  o.seed = static_cast<uint64_t>(*seed);
  absl::StatusOr<int64_t> shards = args.Int("shards");
  if (!shards.ok()) return fail(shards.status());
  if (*shards < 1 || *shards > 99999) {
    return fail(absl::InvalidArgumentError(absl::StrCat("--shards must be >= 1, got ", *shards)));
  }
  o.shards = static_cast<int>(*shards);
  absl::StatusOr<WeightFormat> format = ParseWeightFormat(args.Str("weight-dtype"));
  if (!format.ok()) return fail(format.status());
  o.format = *format;
  if (args.Has("tokenizer")) o.tokenizer_dir = args.Str("tokenizer");
  if (args.Bool("no-tokenizer")) {
    if (!o.tokenizer_dir.empty()) {
      std::fprintf(stderr,
                   "dmoe make-model: --tokenizer and --no-tokenizer exclude "
                   "each other\n");
      return 2;
    }
    o.generate_tokenizer = false;
  }

  // Show progress on a terminal, or when the model is big enough to take a
  // while.
  absl::StatusOr<json> config = PresetConfig(o.preset, o.layers);
  if (!config.ok()) return fail(config.status());
  absl::StatusOr<std::vector<Decl>> decls = ModelTensors(*config, o.format);
  if (!decls.ok()) return fail(decls.status());
  uint64_t total = 0;
  for (const Decl& d : *decls) total += NumBytes(d);
  o.progress = isatty(STDERR_FILENO) || total > (uint64_t{1} << 30);

  MakeModelSummary sum;
  if (absl::Status s = WriteRandomModel(o, &sum); !s.ok()) return fail(s);
  std::fprintf(stderr,
               "dmoe make-model: %s (%lld layers, %s) -> %s: %s params, %s in %zu files "
               "(%s)\n",
               o.preset.c_str(),
               static_cast<long long>((*config)["num_hidden_layers"].get<int64_t>()),
               args.Str("weight-dtype").c_str(), o.out_dir.c_str(),
               HumanCount(static_cast<double>(sum.params)).c_str(),
               HumanBytes(static_cast<double>(sum.data_bytes)).c_str(), sum.files.size(),
               absl::StrJoin(sum.files, ", ").c_str());
  return 0;
}

}  // namespace dmoe::tools
