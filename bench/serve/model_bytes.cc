#include "bench/serve/model_bytes.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/config.h"
#include "core/safetensors.h"
#include "core/status.h"

namespace dmoe::bench::serve {

absl::StatusOr<TokenCostInfo> TokenCost(const std::string& model_dir, int elem_bytes) {
  DMOE_ASSIGN_OR_RETURN(core::ModelConfig cfg,
                        core::ModelConfig::FromFile(model_dir + "/config.json"));
  DMOE_ASSIGN_OR_RETURN(std::unique_ptr<core::Checkpoint> ckpt, core::Checkpoint::Open(model_dir));
  TokenCostInfo info;
  info.vocab = cfg.vocab_size;
  const double routed_fraction =
      cfg.n_routed_experts > 0
          ? static_cast<double>(cfg.num_experts_per_tok) / static_cast<double>(cfg.n_routed_experts)
          : 0.0;
  for (const std::string& name : ckpt->TensorNames()) {
    if (absl::EndsWith(name, "_scale_inv")) continue;
    DMOE_ASSIGN_OR_RETURN(core::TensorView t, ckpt->Get(name));
    const double n = static_cast<double>(t.NumElements());
    info.total_weights += n;
    const bool fp32 = absl::EndsWith(name, "norm.weight") ||
                      absl::EndsWith(name, ".mlp.gate.weight") ||
                      absl::EndsWith(name, "e_score_correction_bias") || t.shape.size() == 1;
    const double bytes = fp32 ? 4.0 : static_cast<double>(elem_bytes);
    double used = n;
    if (absl::StrContains(name, ".mlp.experts.")) {
      used = n * routed_fraction;
    } else if (name == "model.embed_tokens.weight" && !cfg.tie_word_embeddings) {
      used = t.shape.size() == 2 ? static_cast<double>(t.shape[1]) : n;  // one row
      info.decode_bytes += used * bytes;
      continue;  // a lookup, no multiply
    }
    info.decode_bytes += used * bytes;
    info.active_weights += used;
    if (name == "lm_head.weight" || name == "model.embed_tokens.weight") info.head_weights += used;
  }
  info.summary = absl::StrCat(cfg.num_hidden_layers, " layers, hidden ", cfg.hidden_size, ", ",
                              cfg.n_routed_experts, " routed experts (top ",
                              cfg.num_experts_per_tok, "), ", cfg.n_shared_experts, " shared; ",
                              absl::StrFormat("%.2f", info.total_weights / 1e6), "M weights, ",
                              absl::StrFormat("%.2f", info.active_weights / 1e6), "M per token");
  return info;
}

}  // namespace dmoe::bench::serve
