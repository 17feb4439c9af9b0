// Which routed experts an expert server holds, per placement version and MoE
// layer, and how many tokens each (layer, expert) has computed.
//
// A server serves at most two placement versions at a time: the newest one and
// the one before it (so that routers can switch between steps while the old
// slots drain). The expert set of a version only grows by AddSlots and shrinks
// by RemoveSlots; the backend holds the union of all held versions' experts.
//
// Thread-safe: every method may be called concurrently.
#ifndef DMOE_EXPERT_SERVICE_INTERNAL_SLOT_TABLE_H_
#define DMOE_EXPERT_SERVICE_INTERNAL_SLOT_TABLE_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "core/config.h"

namespace dmoe::expert::internal {

// [layer] -> ascending logical expert ids (empty for dense layers).
using LayerSlots = std::vector<std::vector<int32_t>>;

struct LayerExpert {
  int32_t layer = 0;
  int32_t expert = 0;
  bool operator==(const LayerExpert&) const = default;
};

class SlotTable {
 public:
  // `slots` has one entry per model layer; ids are checked against `cfg`.
  static absl::StatusOr<std::unique_ptr<SlotTable>> Create(const core::ModelConfig& cfg,
                                                           int server_index, uint64_t version,
                                                           LayerSlots slots);

  // OK when `version` is held and every id of `experts` (routed ids) is a slot
  // of `layer` in it. FAILED_PRECONDITION "placement version 3 not held
  // (holding 2)" or "layer 1 expert 5 not held by server 1 in placement
  // version 2"; INVALID_ARGUMENT for ids out of range.
  absl::Status CheckHeld(uint64_t version, int32_t layer, std::span<const int32_t> experts) const;

  // Validates a slot list from a LoadSlots/UnloadSlots request: MoE layers, ids
  // in range, no duplicates within a layer. Returns it as (layer, expert)
  // pairs.
  absl::StatusOr<std::vector<LayerExpert>> CheckSlotList(
      const std::vector<std::pair<int64_t, std::vector<int32_t>>>& slots) const;

  // Makes `version` (>= newest) hold the newest version's slots plus `add`.
  // version > newest: the previous newest stays held, older ones are dropped.
  // FAILED_PRECONDITION when version < newest.
  absl::Status AddSlots(uint64_t version, std::span<const LayerExpert> add);
  // Checks that AddSlots(version, ...) would be accepted.
  absl::Status CheckAddVersion(uint64_t version) const;

  // Removes `remove` from `version`, which must be the newest held version
  // (FAILED_PRECONDITION otherwise), and drops every older version. NOT_FOUND
  // when an entry is not a slot of `version` (nothing changes then). Returns
  // the (layer, expert) pairs no longer held by any version.
  absl::StatusOr<std::vector<LayerExpert>> RemoveSlots(uint64_t version,
                                                       std::span<const LayerExpert> remove);

  // True when some held version has (layer, expert).
  bool Referenced(int32_t layer, int32_t expert) const;

  // Adds n tokens to the counter of (layer, expert).
  void CountTokens(std::span<const std::pair<LayerExpert, uint64_t>> counts);

  struct Snapshot {
    uint64_t version = 0;                   // newest held version
    std::vector<uint64_t> held_versions;    // ascending
    LayerSlots slots;                       // of the newest version
    std::vector<uint64_t> tokens_computed;  // per slot of `slots`, flattened in order
    int64_t num_slots = 0;
  };
  Snapshot Get() const;

  uint64_t newest_version() const;

 private:
  struct Version {
    uint64_t version = 0;
    LayerSlots slots;
  };
  SlotTable(const core::ModelConfig& cfg, int server_index)
      : num_layers_(cfg.num_hidden_layers),
        num_experts_(cfg.n_routed_experts),
        server_index_(server_index),
        moe_layer_(cfg.num_hidden_layers) {}
  std::string HeldList() const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  const Version* Find(uint64_t version) const ABSL_SHARED_LOCKS_REQUIRED(mu_);

  // Const after construction.
  const int64_t num_layers_;
  const int64_t num_experts_;
  const int server_index_;
  std::vector<bool> moe_layer_;  // [layer]

  mutable absl::Mutex mu_;
  std::vector<Version> versions_ ABSL_GUARDED_BY(mu_);  // ascending by version, 1 or 2
  // [layer][expert] tokens computed (assignments), since start.
  std::vector<std::vector<uint64_t>> tokens_ ABSL_GUARDED_BY(mu_);
};

}  // namespace dmoe::expert::internal

#endif  // DMOE_EXPERT_SERVICE_INTERNAL_SLOT_TABLE_H_
