#include "core/expert_backend.h"

#include <algorithm>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/status.h"

namespace dmoe::core {
namespace {

constexpr char kFailedTokensUrl[] = "type.dmoe.dev/dmoe.FailedTokens";

}  // namespace

absl::StatusOr<uint64_t> ExpertBackend::Submit(const ExpertBatch& batch, float* out) {
  DMOE_RETURN_IF_ERROR(Compute(batch, out));
  return uint64_t{0};
}

absl::Status ExpertBackend::Await(uint64_t /*ticket*/) { return absl::OkStatus(); }

void ExpertBackend::Cancel(uint64_t /*ticket*/) {}

std::string FfnName(int32_t layer, int32_t ffn_id) {
  if (ffn_id == kSharedFfn) return absl::StrFormat("layer %d shared FFN", layer);
  return absl::StrFormat("layer %d expert %d", layer, ffn_id);
}

absl::Status ValidateFfnWeights(int32_t layer, int32_t ffn_id, const FfnWeights& w) {
  const std::string name = FfnName(layer, ffn_id);
  if (ffn_id < kSharedFfn) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: invalid FFN id", name));
  }
  if (w.hidden <= 0 || w.intermediate <= 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: hidden %d and intermediate %d must be positive", name, w.hidden, w.intermediate));
  }
  const size_t expect = static_cast<size_t>(w.hidden * w.intermediate);
  auto check = [&](std::span<const float> s, const char* what, int64_t rows, int64_t cols) {
    if (s.size() == expect && s.data() != nullptr) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrFormat("%s: %s has %d elements, expected [%d,%d]",
                                                      name, what, s.size(), rows, cols));
  };
  DMOE_RETURN_IF_ERROR(check(w.gate, "gate_proj", w.intermediate, w.hidden));
  DMOE_RETURN_IF_ERROR(check(w.up, "up_proj", w.intermediate, w.hidden));
  return check(w.down, "down_proj", w.hidden, w.intermediate);
}

namespace {

// `full`: also the O(assignments) checks (decreasing offsets, ids below kSharedFfn).
absl::Status CheckExpertBatch(const ExpertBatch& b, const float* out, bool full) {
  const int32_t layer = b.layer;
  constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
  if (layer < 0) return absl::InvalidArgumentError(absl::StrFormat("layer %d is negative", layer));
  if (b.num_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("layer %d: num_tokens %d is negative", layer, b.num_tokens));
  }
  if (b.num_tokens >= kInt32Max) {
    return absl::InvalidArgumentError(
        absl::StrFormat("layer %d: %d tokens is too many", layer, b.num_tokens));
  }
  if (b.token_offsets.size() != static_cast<size_t>(b.num_tokens) + 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("layer %d: token_offsets has %d entries, expected num_tokens + 1 = %d",
                        layer, b.token_offsets.size(), b.num_tokens + 1));
  }
  const size_t num_assignments = b.ffn_ids.size();
  if (b.weights.size() != num_assignments) {
    return absl::InvalidArgumentError(absl::StrFormat("layer %d: %d weights for %d assignments",
                                                      layer, b.weights.size(), num_assignments));
  }
  if (num_assignments >= static_cast<size_t>(kInt32Max)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("layer %d: %d assignments is too many", layer, num_assignments));
  }
  if (b.token_offsets[0] != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("layer %d: token_offsets[0] is %d, expected 0", layer, b.token_offsets[0]));
  }
  for (int64_t t = 0; full && t < b.num_tokens; ++t) {
    if (b.token_offsets[t + 1] < b.token_offsets[t]) {
      return absl::InvalidArgumentError(
          absl::StrFormat("layer %d: token_offsets decrease at token %d (%d -> %d)", layer, t,
                          b.token_offsets[t], b.token_offsets[t + 1]));
    }
  }
  if (static_cast<size_t>(b.token_offsets[b.num_tokens]) != num_assignments) {
    return absl::InvalidArgumentError(
        absl::StrFormat("layer %d: token_offsets end at %d but there are %d assignments", layer,
                        b.token_offsets[b.num_tokens], num_assignments));
  }
  if (b.num_tokens == 0) return absl::OkStatus();
  if (b.hidden <= 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("layer %d: hidden %d must be positive", layer, b.hidden));
  }
  if (b.hidden >= kInt32Max / 2) {
    return absl::InvalidArgumentError(
        absl::StrFormat("layer %d: hidden %d is too large", layer, b.hidden));
  }
  if (b.x == nullptr || out == nullptr) {
    return absl::InvalidArgumentError(absl::StrFormat("layer %d: null x or out", layer));
  }
  for (size_t a = 0; full && a < num_assignments; ++a) {
    if (b.ffn_ids[a] < kSharedFfn) {
      return absl::InvalidArgumentError(
          absl::StrFormat("layer %d: invalid FFN id %d at assignment %d", layer, b.ffn_ids[a], a));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status FfnNotLoadedError(int32_t layer, int32_t ffn_id) {
  return absl::FailedPreconditionError(
      ffn_id == kSharedFfn
          ? absl::StrFormat("layer %d: shared FFN is not loaded on this backend", layer)
          : absl::StrFormat("layer %d: expert %d is not loaded on this backend", layer, ffn_id));
}

absl::Status ValidateExpertBatchShape(const ExpertBatch& b, const float* out) {
  return CheckExpertBatch(b, out, /*full=*/false);
}

absl::Status ValidateExpertBatch(const ExpertBatch& b, const float* out) {
  return CheckExpertBatch(b, out, /*full=*/true);
}

absl::Status WithFailedTokens(absl::Status status, std::span<const int32_t> tokens) {
  return WithInt32Payload(std::move(status), kFailedTokensUrl, tokens);
}

std::vector<int32_t> FailedTokens(const absl::Status& status) {
  return Int32Payload(status, kFailedTokensUrl);
}

absl::StatusOr<ComputeType> ParseExpertWeights(std::string_view name, ComputeType dtype) {
  if (name == "auto") return dtype;
  if (name == "f32") return ComputeType::kF32;
  if (name == "bf16") return ComputeType::kBF16;
  if (name == "int8") return ComputeType::kInt8;
  if (name == "fp8") {
    return absl::UnimplementedError(
        "expert-weights fp8: FP8 expert weights are not kept as FP8 yet (they load as bf16 "
        "with auto or bf16)");
  }
  return absl::InvalidArgumentError(
      absl::StrCat("expert-weights must be auto, f32, bf16 or int8, got '",
                   absl::string_view(name.data(), name.size()), "'"));
}

}  // namespace dmoe::core
