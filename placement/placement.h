// Which expert server holds which routed experts, per MoE layer, and how a
// layer's routed batch is split across servers (docs/placement.md, "Splitting a batch").
//
// A Placement has a version; every request sent to an expert server names it,
// and a server that does not hold the planned slots refuses the request. A
// server's slots in a layer are logical expert ids; an expert may have replicas
// on several servers but never two on one server.
#ifndef DMOE_PLACEMENT_PLACEMENT_H_
#define DMOE_PLACEMENT_PLACEMENT_H_

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/config.h"
#include "core/expert_backend.h"
#include "nlohmann/json.hpp"

namespace dmoe::place {

class Placement {
 public:
  Placement() = default;
  // Every routed expert of every MoE layer on exactly one server, spread
  // contiguously: server s holds experts [s*E/N, (s+1)*E/N).
  static absl::StatusOr<Placement> Contiguous(const core::ModelConfig& cfg, int num_servers,
                                              uint64_t version = 1);
  // {"version": V, "num_servers": N, "layers": [{"layer": l, "servers": [[e, ...], ...]}, ...]}
  // Validated against `cfg`: every MoE layer present, ids in range, every expert
  // at least once, no expert twice on one server.
  static absl::StatusOr<Placement> FromJson(const nlohmann::json& j, const core::ModelConfig& cfg);
  static absl::StatusOr<Placement> FromFile(const std::string& path, const core::ModelConfig& cfg);
  nlohmann::json ToJson() const;

  uint64_t version() const { return version_; }
  int num_servers() const { return num_servers_; }
  // Logical experts held by `server` in `layer` (empty for dense layers).
  const std::vector<int32_t>& Slots(int64_t layer, int server) const;
  // Servers holding expert `e` of `layer`, ascending.
  const std::vector<int32_t>& Replicas(int64_t layer, int32_t e) const;
  bool Holds(int64_t layer, int server, int32_t e) const;

 private:
  absl::Status Index(const core::ModelConfig& cfg);
  uint64_t version_ = 0;
  int num_servers_ = 0;
  // [layer][server] -> experts; [layer][expert] -> servers.
  std::vector<std::vector<std::vector<int32_t>>> slots_;
  std::vector<std::vector<std::vector<int32_t>>> replicas_;
};

// The part of a layer's batch that goes to one server: its tokens (indices into
// the full batch, ascending) with, per token, the local (expert, weight) pairs
// and the shared duty as an assignment to kSharedFfn with weight 1.
struct ServerShare {
  int server = 0;
  std::vector<int32_t> tokens;            // [n] indices into the batch
  std::vector<int32_t> token_offsets;     // [n + 1]
  std::vector<int32_t> ffn_ids;           // [assignments]
  std::vector<float> weights;             // [assignments]
  std::vector<int32_t> assignment_index;  // [assignments] index into the batch's
};

enum class SharedDuty { kExpertServers, kRouter };

// A server as SplitByServer sees it: up; to be avoided (it failed recently:
// used only for experts that have no replica on an up server); or excluded
// (it failed during this very batch: never used).
enum class ServerState : uint8_t { kUp, kAvoid, kExcluded };

// Splits `batch` (assignments with logical expert ids and kSharedFfn) by server:
// each token goes once to every server it visits. For an expert with several
// replicas, an up server is preferred to an avoided one, then a server the
// token already visits, then the one with the least queued work
// (`queued_tokens`, per server, updated as tokens are placed). Shared duty goes
// to a server the token already visits (the least loaded one) or, with
// SharedDuty::kRouter, is dropped from the shares (the caller computes it).
// `states` (per server; empty = all up) marks servers to avoid or exclude. A
// token with an expert that has no replica outside the excluded servers is
// "stranded": with `stranded` given, it is appended there (ascending) and left
// out of every share; otherwise it is an error, as is an expert with no replica.
absl::StatusOr<std::vector<ServerShare>> SplitByServer(const core::ExpertBatch& batch,
                                                       const Placement& placement,
                                                       std::span<const int64_t> queued_tokens,
                                                       SharedDuty duty,
                                                       std::span<const ServerState> states = {},
                                                       std::vector<int32_t>* stranded = nullptr);

}  // namespace dmoe::place

#endif  // DMOE_PLACEMENT_PLACEMENT_H_
