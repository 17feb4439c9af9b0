// A DeepSeek-family causal LM loaded from a Hugging Face checkpoint directory,
// run on the CPU with the experts behind an ExpertBackend.
//
// Load copies and packs every weight into the process's own memory one tensor at
// a time (the file pages of each tensor are dropped right after), so loading
// needs little more than the packed weights. Forward runs one step for a batch of
// sequences: each sequence appends its new tokens (a whole prompt for prefill, or
// one token for decode; sequences may mix both) to its KV cache entry, and
// logits come back for the last new token or, on request, for every new token.
//
// Thread safety: one Forward at a time per Model (it owns per-step scratch).
#ifndef DMOE_CORE_MODEL_H_
#define DMOE_CORE_MODEL_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/attention.h"
#include "core/config.h"
#include "core/dispatch_plan.h"
#include "core/expert_backend.h"
#include "core/gating.h"
#include "core/kv_cache.h"
#include "core/moe_gate.h"
#include "core/rope.h"
#include "core/stage_times.h"

namespace dmoe::core {

struct ModelOptions {
  ComputeType compute = ComputeType::kBF16;
  // Called after each loaded unit (embedding, attention of a layer, one expert, ...).
  std::function<void(int64_t done, int64_t total)> progress;
  // Backend for routed and shared experts; null = the CPU backend.
  std::unique_ptr<ExpertBackend> experts;
  // Whether Load hands the checkpoint's routed / shared experts to `experts`. A
  // router whose experts live on expert servers loads neither (or only the shared
  // ones, when it computes the shared expert itself).
  bool load_routed_experts = true;
  bool load_shared_experts = true;
  // Forward splits each step's tokens into up to this many micro-batches and
  // pipelines them through the layers: while one micro-batch's experts are
  // computed (ExpertBackend::Submit ... Await), the next one's attention runs.
  // Worth it when the experts are remote; 1 = no split. Results do not depend
  // on it beyond rounding (each token's arithmetic is the same).
  int micro_batches = 1;
  // Called on the Forward thread with each MoE layer's routing of a
  // micro-batch, after its experts answered (load metrics, the placement
  // controller's load windows). Must be quick.
  std::function<void(int64_t layer, const GateResult& routing)> on_route;
  // Testing: added to every MoE layer's router logits ([n_routed] or empty;
  // see MoeGate::set_logit_bias_for_testing). Changes the model's outputs.
  std::vector<float> gate_bias_for_testing;
};

struct SeqInput {
  int32_t seq = 0;                  // KV cache sequence id
  std::span<const int32_t> tokens;  // new tokens, at least one
  bool all_logits = false;          // logits for every new token, else only the last
};

class Model {
 public:
  static absl::StatusOr<std::unique_ptr<Model>> Load(const std::string& dir, ModelOptions opts);

  const ModelConfig& config() const { return cfg_; }
  ComputeType compute() const { return compute_; }

  // Runs one step. `logits` receives, for each input in order, one row per
  // requested position: [rows, vocab]. On error nothing is appended to any
  // sequence. Errors: unknown/duplicate sequence, empty input, token id out of
  // the vocabulary, sequence over its cache capacity (InvalidArgument /
  // ResourceExhausted), expert backend failures. An expert failure that
  // concerns only some tokens (core::FailedTokens) names their sequences
  // (FailedSequences); the others can run again in a later step.
  absl::Status Forward(std::span<const SeqInput> batch, KvCache& cache, std::vector<float>* logits);

  size_t WeightBytes() const;
  int micro_batches() const { return micro_batches_; }
  // The backend computing this model's MoE experts.
  ExpertBackend& experts() { return *experts_; }
  // Routed assignments counted per (layer, expert) since load: [layers][n_routed].
  const std::vector<std::vector<int64_t>>& expert_load() const { return expert_load_; }
  // The stages of the last Forward call (embed .. lm_head; core/stage_times.h).
  const StageTimes& last_stage_times() const { return stages_; }

 private:
  Model() = default;
  absl::Status LoadWeights(const Checkpoint& ckpt, ModelOptions& opts);

  ModelConfig cfg_;
  ComputeType compute_ = ComputeType::kBF16;
  std::unique_ptr<RopeTable> rope_;
  std::vector<float> embed_f32_;      // [vocab, hidden] (f32 mode)
  std::vector<uint16_t> embed_bf16_;  // [vocab, hidden] (bf16 mode)
  std::vector<std::vector<float>> input_norm_, post_norm_;
  std::vector<std::unique_ptr<Attention>> attn_;
  std::vector<std::unique_ptr<MoeGate>> gates_;  // null for dense layers
  std::unique_ptr<ExpertBackend> experts_;       // routed + shared FFNs of MoE layers
  std::unique_ptr<ExpertBackend> dense_;         // dense MLPs, as kSharedFfn of their layer
  std::vector<float> final_norm_;
  PackedLinear lm_head_;
  std::vector<std::vector<int64_t>> expert_load_;

  // One micro-batch of a step: token rows [t0, t0 + n) of the step's buffers.
  struct MicroBatch {
    int64_t t0 = 0, n = 0;
    TokenLayout tokens;
    GateResult routing;
    DispatchPlan plan;
    ExpertBackend* backend = nullptr;  // with a ticket in flight, else null
    uint64_t ticket = 0;
    int64_t layer = -1;  // of the ticket in flight
  };
  // Runs layer `l`'s attention and submits its FFN for `mb`.
  absl::Status SubmitLayer(int64_t l, MicroBatch& mb, KvCache& cache);
  // Awaits `mb`'s FFN and adds it to the residual stream.
  absl::Status AwaitLayer(MicroBatch& mb);
  // For an error of `mb`'s experts: the sequences concerned, as a payload.
  absl::Status Annotate(absl::Status st, const MicroBatch& mb) const;

  int micro_batches_ = 1;
  std::function<void(int64_t, const GateResult&)> on_route_;
  std::vector<float> x_, xn_, tmp_, last_;
  StageTimes stages_;
  std::vector<MicroBatch> mbs_;
  std::vector<int32_t> dense_offsets_, dense_ids_;
  std::vector<float> dense_weights_;
};

// Attaches / reads the KV cache sequence ids an error concerns (Model::Forward).
absl::Status WithFailedSequences(absl::Status status, std::span<const int32_t> seqs);
std::vector<int32_t> FailedSequences(const absl::Status& status);

}  // namespace dmoe::core

#endif  // DMOE_CORE_MODEL_H_
