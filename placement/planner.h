// The placement planner: which routed experts each expert server holds in one
// MoE layer, so that the load over servers is even (docs/placement.md, "The planner";
// "Load window and balance"). The idea is EPLB's (replicate the heaviest experts, then pack);
// the implementation, the constraints and the incremental mode are our own.
//
// The planner works on plain vectors, one layer at a time: `loads[e]` (tokens
// routed to expert e, any non-negative finite unit) in, `servers[s]` (the
// experts server s holds, exactly S of them) out. The controller converts a
// place::Placement layer to and from ServerSlots; `dmoe plan` reads JSON.
//
// Model. An expert with r replicas serves load[e] / r on each of them (the
// router splits an expert's tokens over its replicas). The load of a server is
// the sum of that over its slots. Balance is max / mean over servers, where
// mean = sum(loads) / N; 1.0 is perfect (and is reported when all loads are 0).
//
// Hard constraints, always met by a returned plan:
//   - every server holds exactly S experts (every slot is filled);
//   - every expert has at least one replica;
//   - no server holds an expert twice (so an expert has at most N replicas);
//   - weight memory: a server holds S * expert_bytes <= server_bytes. All
//     routed experts of a DeepSeek layer have the same shapes and dtype, so
//     weight memory per server IS the slot count; the byte budget only caps S
//     (SlotsForBudget) and prices moves (bytes_moved).
//   - hierarchical mode: every replica of an expert stays on the servers of the
//     node its group is assigned to.
//
// Algorithm (from scratch).
//   1. Replica counts: one each; each of the N*S - E extra slots goes to the
//      expert with the largest load per replica that has fewer than N.
//      (S <= E makes N*S <= N*E, so every slot gets an expert this way.)
//   2. Packing: replicas by per-replica load, heaviest first, each into the
//      lightest server that has room and does not hold that expert; when none
//      is left (rare: the servers with room all hold it) a replica already
//      placed is moved to make room, which always exists.
//   3. Local search on the heaviest server: swap one of its slots with a slot
//      of a lighter server, drop one of its replicas for another expert, or
//      add a replica of one of its experts elsewhere (in place of a replica of
//      an expert that has several). Each step lowers the heaviest server and
//      keeps every changed server below it. When the heaviest server is
//      stuck, a swap between two other servers that lowers the sum of
//      squared loads (the heaviest server that has one, with its lightest
//      partner; never raising the heaviest) unblocks it; the search stops
//      when neither kind of step exists (or after 20 * N * S steps).
//      Step 3 may change the replica counts of step 1 where that packs better.
//   Steps 1-3 run up to 8 times, from the loads as given and from loads
//   jittered by up to +-10% with fixed seeds (other counts and packing orders
//   to start from), until max/mean <= 1.001; the plan with the best max/mean
//   for the true loads wins.
//   Measured (planner_test): Zipf(1.2) over 64 experts, 80 slots: max/mean
//   1.0001 (8 servers x 10), 1.0009 (16 x 5), 1.00001 (4 x 20), 1.009-1.026
//   (20 x 4: too few slots around the top replicas). 58 layers of 256
//   experts on 32 x 9 servers: 85 ms for `dmoe plan`.
//
// Hierarchical (num_groups G > 0 and num_nodes M > 0), for group-limited
// routing: experts [g*E/G, (g+1)*E/G) form group g (E % G == 0); servers
// [i*N/M, (i+1)*N/M) form node i (M <= N; nodes differ in size by at most one
// server when M does not divide N). Whole groups are assigned to nodes, each
// node getting as many groups as its slots allow: at least ceil(S / group
// size) (a server needs S distinct experts), at most floor(servers * S /
// group size); G need not be a multiple of M. The assignment minimises the
// heaviest node's load per server: greedy (heaviest group first into the
// node lightest after taking it), group swaps/moves, then a branch and bound
// that is exact for real shapes (8 groups on 4 nodes: a few hundred visits)
// and gives up after 2^20 visits. Then the flat planner runs inside each node
// on that node's experts. Since a node's load is fixed by its groups, no plan
// that keeps groups on one node beats the "node bound" (the heaviest node's
// load per server over the best assignment, / the mean); the planner is
// within 0.1% of it (planner_test) except where a node's top expert would
// need more replicas than the node has servers. When whole groups differ in
// load, hierarchical plans are therefore worse than global ones, for any
// planner: on DeepSeek-V3 shapes with 8 groups of similar load (+-10%) and
// Zipf(1.2) experts inside them, hierarchical/global <= 1.023; with the
// ranks of Zipf(1.0) scattered over groups, up to 1.38 (node bound 1.38;
// the public EPLB's hierarchical policy 1.47).
//
// Incremental (a `current` placement is given). A slot "moves" when the plan
// puts expert e on server s and `current` does not have e on s: its weights
// must be loaded there (bytes_moved = slots_moved * expert_bytes). Removing an
// expert costs nothing. Three candidates are built:
//   A. the current placement repaired: slots of servers >= N dropped, servers
//      with more than S slots trimmed, missing experts added, empty slots
//      (new or resized servers) filled; then the local search of step 3, each
//      step chosen for the most load lowered per slot moved (steps that move
//      nothing, e.g. moving an expert back, first), stopping as soon as
//      max/mean <= target;
//   B. the same from the current placement trimmed to the replica counts of
//      step 1, the missing replicas packed as in step 2;
//   C. the plan from scratch, its servers relabelled (an optimal assignment)
//      to share the most slots with `current`.
// target = (1 + balance_slack) * max/mean of C. The plan that moves the fewest
// slots among those with max/mean <= target wins (C always qualifies), so
// balance_slack is the trade-off: 0 = the best balance found, then the fewest
// moves; 0.02 (default) = up to 2% worse max/mean to move less; a large value
// = only the repairs (never worse than no plan at all: every constraint met).
// Hierarchical: the candidates are C (nodes of one size relabelled to where
// their groups are now, servers relabelled inside nodes), the fresh group
// assignment planned incrementally inside nodes, and, when its node bound is
// within the slack of the fresh one, groups staying on the node that holds
// most of their slots now, planned incrementally inside nodes; a node may use
// the slack up to the fresh plan's heaviest server * (1 + balance_slack), and
// the same rule picks among the candidates, so the target holds overall.
// Measured (planner_test, V3 shapes, loads +-10%): 8-16 of 288 slots moved
// at max/mean <= 1.02 vs ~270 for a fresh plan; hierarchical 7 vs 257.
//
// Deterministic (no randomness; ties go to the lowest id). Thread-compatible:
// the functions share no state.
#ifndef DMOE_PLACEMENT_PLANNER_H_
#define DMOE_PLACEMENT_PLANNER_H_

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace dmoe::place {

// One layer: [server] -> the logical expert ids it holds.
using ServerSlots = std::vector<std::vector<int32_t>>;

struct PlanOptions {
  int num_servers = 0;       // N >= 1
  int slots_per_server = 0;  // S: 1 <= S <= E, N * S >= E
  // Weight memory (see above): bytes of one routed expert of this layer, and
  // each server's budget for them (0 = no budget beyond the S slots).
  int64_t expert_bytes = 1;
  int64_t server_bytes = 0;
  // Hierarchical mode when both are > 0 (see above); M <= N, E % G == 0.
  int num_groups = 0;
  int num_nodes = 0;
  // Incremental mode only: how much worse max/mean may be than the fresh
  // plan's to move fewer slots (>= 0).
  double balance_slack = 0.02;
};

struct LayerPlan {
  ServerSlots servers;         // [N][S], each server's experts ascending
  double max_over_mean = 1.0;  // predicted, from the loads given
  // Slots whose expert is not on that server in `current` (all N * S when
  // there is no current placement), and their weight bytes.
  int64_t slots_moved = 0;
  int64_t bytes_moved = 0;
};

// Checks the options against a layer of `num_experts` experts without
// planning. InvalidArgument naming the option: num_servers, slots_per_server,
// expert_bytes / server_bytes, num_groups / num_nodes, balance_slack.
absl::Status ValidatePlanOptions(int64_t num_experts, const PlanOptions& options);

// Plans one layer. `loads` must be finite and >= 0 (InvalidArgument naming the
// expert otherwise). `current`, when given, is the layer's placement now: any
// number of servers (extra ones are dropped, missing ones start empty), any
// number of slots each; InvalidArgument for an expert id out of [0, E) or an
// expert twice on one server.
absl::StatusOr<LayerPlan> PlanLayer(std::span<const double> loads, const PlanOptions& options,
                                    const ServerSlots* current = nullptr);

// Load of each server: sum over its slots of loads[e] / replicas of e.
// `servers` must hold valid ids.
std::vector<double> ServerLoads(std::span<const double> loads, const ServerSlots& servers);
// max / mean of `server_loads` (1.0 when they sum to 0).
double MaxOverMean(std::span<const double> server_loads);
// Slots (s, e) of `to` whose expert is not on server s in `from`.
int64_t SlotsMoved(const ServerSlots& from, const ServerSlots& to);
// How many experts of `expert_bytes` fit in `server_bytes`.
int64_t SlotsForBudget(int64_t server_bytes, int64_t expert_bytes);

}  // namespace dmoe::place

#endif  // DMOE_PLACEMENT_PLANNER_H_
