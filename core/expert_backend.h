// The expert-compute stage of a MoE layer, behind a small interface so that the
// same model code can run experts in-process on the CPU, on a GPU, or (router
// service) on remote expert servers.
//
// An FFN is a SwiGLU MLP: down( silu(gate(x)) * up(x) ). Each MoE layer has routed
// experts with ids 0..n_routed-1 and one fused shared FFN with id kSharedFfn.
// A backend holds the FFNs it was given (possibly a subset of a layer's experts)
// and computes, for each token of a batch, the weighted sum over that token's
// assignments:  out[t] = sum_a weight_a * FFN_{ffn_a}(x[t]).
//
// Accumulation is in fp32 and deterministic: the result for a token does not
// depend on which other tokens share the batch or on the thread count. The sum
// is one fixed sequence of fp32 operations in the token's assignment order,
// multiply then add (no FMA):
//   c_a = weight_a * FFN_{ffn_a}(x[t]);  out[t] = ((c_0 + c_1) + c_2) + ...
// so a caller that receives the c_a rows (per_assignment_out) and adds them in
// the same order (SumAssignmentRows, core/combine.h) gets the same bits, however the assignments
// were split over backends or servers.
#ifndef DMOE_CORE_EXPERT_BACKEND_H_
#define DMOE_CORE_EXPERT_BACKEND_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/kernels/cpu/linear.h"

namespace dmoe::core {

inline constexpr int32_t kSharedFfn = -1;

// Row-major float32 weights of one SwiGLU FFN, as stored in the checkpoint.
struct FfnWeights {
  int64_t hidden = 0;           // model hidden size
  int64_t intermediate = 0;     // FFN width
  std::span<const float> gate;  // [intermediate, hidden]
  std::span<const float> up;    // [intermediate, hidden]
  std::span<const float> down;  // [hidden, intermediate]
};

// One batch of expert work for one layer; token-major ("CSR") assignments.
struct ExpertBatch {
  int32_t layer = 0;
  int64_t num_tokens = 0;
  int64_t hidden = 0;
  const float* x = nullptr;                // [num_tokens, hidden]
  std::span<const int32_t> token_offsets;  // [num_tokens + 1]; token t owns [off[t], off[t+1])
  std::span<const int32_t> ffn_ids;        // [num_assignments] expert id or kSharedFfn
  std::span<const float> weights;          // [num_assignments]
  // When true, `out` is [num_assignments, hidden]: row a = weight_a *
  // FFN_{ffn_a}(x[token of a]) (the c_a above), not summed per token.
  // Backends that cannot do this answer Unimplemented.
  bool per_assignment_out = false;
};

class ExpertBackend {
 public:
  virtual ~ExpertBackend() = default;
  virtual std::string Name() const = 0;
  // Copies/packs `w` for (layer, ffn_id). Replaces an FFN already loaded there.
  virtual absl::Status LoadFfn(int32_t layer, int32_t ffn_id, const FfnWeights& w) = 0;
  virtual absl::Status UnloadFfn(int32_t layer, int32_t ffn_id) = 0;
  virtual bool HasFfn(int32_t layer, int32_t ffn_id) const = 0;
  // out: [num_tokens, hidden] float32 (or [num_assignments, hidden] with
  // per_assignment_out), overwritten. Errors (InvalidArgument /
  // FailedPrecondition) name the layer and expert: an assignment to an FFN that is
  // not loaded, inconsistent offsets or sizes. Nothing is written on error.
  virtual absl::Status Compute(const ExpertBatch& batch, float* out) = 0;

  // The same work, split in two so that the caller can overlap it with its own
  // (micro-batching: attention of one micro-batch while another one's experts
  // run elsewhere). Submit starts `batch` and returns a ticket; Await(ticket)
  // finishes it and writes `out`, under the same contract as Compute. The
  // batch's arrays and `out` must stay valid until Await or Cancel returns.
  // Several tickets may be outstanding; each is awaited or cancelled exactly
  // once, from the thread that submitted it. The default computes in Submit.
  virtual absl::StatusOr<uint64_t> Submit(const ExpertBatch& batch, float* out);
  virtual absl::Status Await(uint64_t ticket);
  // Gives up on a submitted ticket (its `out` may be partly written).
  virtual void Cancel(uint64_t ticket);
  // Bytes of resident weights.
  virtual size_t WeightBytes() const = 0;
  // Whether Compute honours ExpertBatch::per_assignment_out (else it answers
  // Unimplemented; callers can get the same rows by giving every assignment
  // its own token, whose sum of one term is weight * FFN(x)).
  virtual bool SupportsPerAssignmentOut() const { return false; }
  // True when LoadFfn / UnloadFfn / HasFfn / WeightBytes may run concurrently
  // with Compute (the backend locks internally); else callers serialise them.
  virtual bool LoadsConcurrently() const { return false; }
};

// "layer 3 expert 7" / "layer 3 shared FFN": how errors name an FFN.
std::string FfnName(int32_t layer, int32_t ffn_id);

// LoadFfn's argument checks shared by the backends: InvalidArgument naming the
// FFN for an invalid id, non-positive sizes, or a matrix of the wrong size.
absl::Status ValidateFfnWeights(int32_t layer, int32_t ffn_id, const FfnWeights& w);

// The checks of an ExpertBatch every backend makes before computing, the same
// words everywhere: InvalidArgument naming the layer for a negative layer or
// token count, offsets or weights of the wrong length, offsets that do not
// start at 0 or do not end at the number of assignments, counts beyond int32,
// a non-positive or too large hidden size, null x or out. ValidateExpertBatch
// adds the O(assignments) checks: offsets that decrease, FFN ids below
// kSharedFfn. A backend that checks those elsewhere (the CUDA backend, on the
// device) calls ValidateExpertBatchShape alone. A batch of 0 tokens is valid
// whatever its hidden size and pointers.
// FailedPrecondition for a batch that assigns tokens to an FFN the backend
// does not hold ("layer 3: expert 7 is not loaded on this backend").
absl::Status FfnNotLoadedError(int32_t layer, int32_t ffn_id);
absl::Status ValidateExpertBatchShape(const ExpertBatch& b, const float* out);
absl::Status ValidateExpertBatch(const ExpertBatch& b, const float* out);

// A Compute / Await error that concerns only some tokens of the batch (e.g.
// their experts' only server is down): the status carries those token indices.
// Without the payload an error concerns the whole batch.
absl::Status WithFailedTokens(absl::Status status, std::span<const int32_t> tokens);
// The token indices of WithFailedTokens, or empty.
std::vector<int32_t> FailedTokens(const absl::Status& status);

// The CPU backend: groups the batch's assignments per FFN (permute), runs one
// fused gate|up GEMM and one down GEMM per FFN through PackedLinear, applies
// SwiGLU, then combines back to token order with the weights (unpermute).
// Safe to call Compute from one thread at a time per backend; Load/Unload may
// run concurrently with it (LoadsConcurrently: packing happens outside the
// backend's lock, so a Compute waits at most for the insertion).
std::unique_ptr<ExpertBackend> MakeCpuExpertBackend(ComputeType type);

// The format routed and shared expert weights are held in, from an
// `--expert-weights` flag: "auto" (the compute type `dtype`, today's default),
// "f32", "bf16" or "int8" (per-channel symmetric, quantised at load; CPU
// backend only). "fp8" is Unimplemented (not yet kept as FP8); anything else
// is InvalidArgument naming the accepted values.
absl::StatusOr<ComputeType> ParseExpertWeights(std::string_view name, ComputeType dtype);

}  // namespace dmoe::core

#endif  // DMOE_CORE_EXPERT_BACKEND_H_
