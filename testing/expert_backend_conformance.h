// One conformance suite that every core::ExpertBackend runs, like ggml's
// test-backend-ops: the same cases, the same inputs, the same error contract,
// whether the experts run in-process on the CPU (f32, bf16), on a GPU, or on
// remote expert servers over gRPC. A backend's own test file instantiates it:
//
//   INSTANTIATE_TEST_SUITE_P(Cpu, ExpertBackendConformance,
//                            ::testing::Values(ConformanceParam{...}), ConformanceName);
//
// and links the object library dmoe_backend_conformance (testing/CMakeLists.txt;
// an object library so that the TEST_Ps are linked although nothing names them).
//
// The cases (expert_backend_conformance.cc): results against the float64
// reference (testing/expert_reference.h) for several batch sizes and both
// layers; a token's result alone, in a batch and in a reversed batch (bitwise
// where the backend promises batch invariance, else within tolerance); the same
// bits run to run; several Submit tickets awaited out of order equal Compute;
// empty batches and tokens without assignments (zeros); per-assignment rows
// that SumAssignmentRows adds to Compute's bits; InvalidArgument for malformed
// batches and FailedPrecondition naming the layer and expert for FFNs the
// backend cannot compute, with `out` untouched.
#ifndef DMOE_TESTING_EXPERT_BACKEND_CONFORMANCE_H_
#define DMOE_TESTING_EXPERT_BACKEND_CONFORMANCE_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>

#include "absl/status/statusor.h"
#include "core/expert_backend.h"
#include "core/kernels/cpu/linear.h"
#include "gtest/gtest.h"
#include "testing/expert_batch.h"

namespace dmoe::testing {

// The FFNs every case computes: in each MoE layer (kLayers), routed experts
// [0, kExperts) of width kInter and a shared FFN of width kSharedInter, with
// RandomFfn weights (seed 1000 * layer + ffn id + 2). Layer 0 is a dense layer
// of a DeepSeek-V2-like model (first_k_dense_replace 1) and has none.
class ConformanceModel {
 public:
  static constexpr int64_t kHidden = 64, kInter = 48, kSharedInter = 96;
  static constexpr int kExperts = 8, kTopK = 3, kNumLayers = 3;
  static constexpr int32_t kLayers[2] = {1, 2};

  ConformanceModel();
  const HostFfn& Ffn(int32_t layer, int32_t ffn) const { return ffns_.at({layer, ffn}); }
  // The FFNs of one layer by id (for ExpectMatchesReference).
  std::map<int32_t, HostFfn> Layer(int32_t layer) const;
  // Loads every FFN of every MoE layer into `b`.
  absl::Status LoadInto(core::ExpertBackend& b) const;

 private:
  std::map<std::pair<int32_t, int32_t>, HostFfn> ffns_;
};

// A backend to test and whatever it needs to live (servers, ...): `backend`
// is destroyed first.
struct BackendUnderTest {
  std::shared_ptr<void> keep_alive;
  std::unique_ptr<core::ExpertBackend> backend;
};

struct ConformanceParam {
  std::string name;  // the instantiation's test-name suffix
  // A backend that computes every FFN of the model; Unavailable or
  // FailedPrecondition skip the suite (no GPU here), other errors fail it.
  std::function<absl::StatusOr<BackendUnderTest>(const ConformanceModel&)> make;
  // The precision the float64 reference models (bf16 rounding of inputs,
  // weights and h for kBF16).
  core::ComputeType reference_type = core::ComputeType::kF32;
  // Added to the reference's error bound, times the row's largest |y|: for
  // backends that round more than the CPU backend does (GPU GEMM outputs).
  double extra_rel_error = 0.0;
  // Whether a token's result is the same bits alone or in any batch.
  bool batch_invariant = true;
};

std::string ConformanceName(const ::testing::TestParamInfo<ConformanceParam>& info);

class ExpertBackendConformance : public ::testing::TestWithParam<ConformanceParam> {
 protected:
  void SetUp() override;

  // Top-k distinct routed experts (variable_k: 0..top_k) and the shared FFN
  // last with weight 1, activations in [-1, 1).
  HostBatch Batch(int32_t layer, int64_t tokens, uint32_t seed, bool variable_k = false) const;
  // out = Compute(b), asserting success.
  std::vector<float> Run(const HostBatch& b);
  void ExpectNearReference(const HostBatch& b, const std::vector<float>& out) const;

  static const ConformanceModel& model();
  BackendUnderTest under_test_;
  core::ExpertBackend* backend_ = nullptr;
};

}  // namespace dmoe::testing

#endif  // DMOE_TESTING_EXPERT_BACKEND_CONFORMANCE_H_
