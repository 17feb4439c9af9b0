// Random checkpoints in Hugging Face layout, for tests and benchmarks.
//
// `dmoe make-model` (RunMakeModel) and tests write a model directory that looks
// like a real DeepSeek-family release: config.json with the HF key names of the
// family, and weights in safetensors with the HF tensor names (MODEL_SPEC.md),
// either as one model.safetensors or as K shards
// "model-0000i-of-0000K.safetensors" with a model.safetensors.index.json.
// Weights are random but deterministic in the seed: each tensor draws from its
// own stream keyed by (seed, tensor name), so the values do not depend on
// sharding or on the order tensors are written.
//
// Writing streams: at most one tensor (plus, for FP8, one 128-row strip in
// float32) is in memory at a time, so the full-size presets can be written.
//
// Presets: tiny-v2lite, tiny-v3, tiny-moe16b (a few MB, for unit tests) and
// v2lite, v3 (real dimensions; use --layers to cut them down).
#ifndef DMOE_TOOLS_MAKE_MODEL_H_
#define DMOE_TOOLS_MAKE_MODEL_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/safetensors.h"
#include "nlohmann/json.hpp"

namespace dmoe::tools {

// How the weights are stored.
//  kBF16 (default): every tensor BF16 except mlp.gate.e_score_correction_bias
//  (F32). kF32, kF16: every tensor in that dtype. kFP8: every 2-D projection
//  inside a layer (attention projections, dense/expert/
//    shared gate/up/down) is F8_E4M3 with a F32 "<name>_scale_inv" of 128x128
//    block scales (w ~= q * scale_inv); embed_tokens, lm_head, norms and
//    mlp.gate.weight stay BF16, the correction bias F32. config.json gains
//    "quantization_config".
enum class WeightFormat { kBF16, kF32, kF16, kFP8 };

// "bf16" | "f32" | "f16" | "fp8"; InvalidArgument naming the valid values
// otherwise.
absl::StatusOr<WeightFormat> ParseWeightFormat(const std::string& s);

struct MakeModelOptions {
  std::string preset;
  std::string out_dir;  // created (with parents) when missing
  int layers = 0;       // > 0 overrides num_hidden_layers
  uint64_t seed = 0;
  int shards = 1;  // >= 1; must not exceed the number of tensors
  WeightFormat format = WeightFormat::kBF16;
  bool progress = false;  // "\rwriting i/n tensors (x GB)" on stderr
  // When set: a directory with a Hugging Face tokenizer.json (and optionally
  // tokenizer_config.json), validated with core::Tokenizer and copied into out_dir;
  // vocab_size becomes max(preset's, tokenizer's size) and bos/eos_token_id the
  // tokenizer's, so the model talks text with that tokenizer.
  std::string tokenizer_dir;
};

// What WriteRandomModel wrote.
struct MakeModelSummary {
  int64_t params = 0;       // elements of all weights (FP8 scales excluded)
  uint64_t data_bytes = 0;  // tensor bytes, as "total_size" in the index
  int64_t tensors = 0;      // tensors written, FP8 scales included
  std::vector<std::string> files;  // file names written into out_dir
};

// Names accepted by PresetConfig, in display order.
std::vector<std::string> PresetNames();

// config.json of `preset` (HF key names; e.g. q_lora_rank is JSON null for the
// V2 presets). `layers_override` > 0 replaces num_hidden_layers and clamps
// first_k_dense_replace to layers - 1 so at least one layer is MoE; 0 keeps the
// preset's layer count. Errors: InvalidArgument for an unknown preset (the
// message lists the valid ones) or a negative override. The config never
// contains quantization_config; WriteRandomModel adds it for kFP8.
absl::StatusOr<nlohmann::json> PresetConfig(const std::string& preset,
                                            int layers_override);

// Every tensor of the model described by `config` (as PresetConfig returns it)
// in the order WriteRandomModel writes them, with the dtype `format` gives it;
// for kFP8 each quantised weight is directly followed by its "_scale_inv".
absl::StatusOr<std::vector<core::SafetensorsWriter::Decl>> ModelTensors(
    const nlohmann::json& config, WeightFormat format);

// Writes config.json and the weights into options.out_dir, overwriting files of
// the same names (and removing a stale model.safetensors.index.json when
// writing a single file). Errors: InvalidArgument for bad options (unknown
// preset, shards < 1 or more shards than tensors, negative layers), an
// errno-derived status naming the path when a directory or file cannot be
// created or written.
absl::Status WriteRandomModel(const MakeModelOptions& options,
                              MakeModelSummary* summary = nullptr);

namespace internal {
// core::F32ToF8E4M3Fast (bit arithmetic, so large FP8 presets are written at
// disk speed). Exposed for tests.
uint8_t FastF32ToF8E4M3(float f);
// IEEE binary16, round to nearest even, overflow to infinity. (core/dtype.h has
// no F32 -> F16 conversion yet.)
uint16_t F32ToF16(float f);
}  // namespace internal

}  // namespace dmoe::tools

#endif  // DMOE_TOOLS_MAKE_MODEL_H_
