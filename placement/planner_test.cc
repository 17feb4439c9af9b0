#include "placement/planner.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <string>

#include "absl/strings/str_format.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace dmoe::place {
namespace {

using ::testing::HasSubstr;

// Zipf(s) loads over `num_experts`: rank k gets 1e6 / k^s. With `shuffle`,
// ranks land on random expert ids (heavy experts scattered over groups).
std::vector<double> Zipf(int num_experts, double s, uint64_t seed, bool shuffle) {
  std::vector<double> loads(num_experts);
  for (int k = 0; k < num_experts; ++k) loads[k] = 1e6 / std::pow(k + 1, s);
  if (shuffle) {
    std::mt19937_64 rng(seed);
    std::shuffle(loads.begin(), loads.end(), rng);
  }
  return loads;
}

// Skewed experts in similar groups: each group of 32 gets Zipf(s) over its
// experts (shuffled), times a group weight uniform in [0.9, 1.1].
std::vector<double> SkewedInGroups(double s, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<double> loads;
  for (int g = 0; g < 8; ++g) {
    const double weight = std::uniform_real_distribution<double>(0.9, 1.1)(rng);
    for (double l : Zipf(32, s, rng(), /*shuffle=*/true)) loads.push_back(weight * l);
  }
  return loads;
}

// Every hard constraint of planner.h, and the reported numbers.
void ExpectValid(std::span<const double> loads, const PlanOptions& o, const LayerPlan& plan,
                 const ServerSlots* current = nullptr) {
  const int num_experts = static_cast<int>(loads.size());
  ASSERT_EQ(plan.servers.size(), static_cast<size_t>(o.num_servers));
  std::vector<std::set<int>> servers_of(num_experts);
  for (int s = 0; s < o.num_servers; ++s) {
    const auto& v = plan.servers[s];
    ASSERT_EQ(v.size(), static_cast<size_t>(o.slots_per_server)) << "server " << s;
    EXPECT_TRUE(std::is_sorted(v.begin(), v.end())) << "server " << s;
    for (int32_t e : v) {
      ASSERT_GE(e, 0);
      ASSERT_LT(e, num_experts);
      EXPECT_TRUE(servers_of[e].insert(s).second)
          << "server " << s << " holds expert " << e << " twice";
    }
  }
  for (int e = 0; e < num_experts; ++e) EXPECT_FALSE(servers_of[e].empty()) << "expert " << e;
  if (o.num_groups > 0) {
    const int group_size = num_experts / o.num_groups;
    auto node = [&](int s) {
      int i = 0;
      while (static_cast<int64_t>(i + 1) * o.num_servers / o.num_nodes <= s) ++i;
      return i;
    };
    for (int g = 0; g < o.num_groups; ++g) {
      std::set<int> nodes;
      for (int e = g * group_size; e < (g + 1) * group_size; ++e) {
        for (int s : servers_of[e]) nodes.insert(node(s));
      }
      EXPECT_EQ(nodes.size(), 1u) << "group " << g << " spans several nodes";
    }
  }
  EXPECT_NEAR(plan.max_over_mean, MaxOverMean(ServerLoads(loads, plan.servers)), 1e-12);
  if (current != nullptr) {
    EXPECT_EQ(plan.slots_moved, SlotsMoved(*current, plan.servers));
  } else {
    EXPECT_EQ(plan.slots_moved, int64_t{o.num_servers} * o.slots_per_server);
  }
  EXPECT_EQ(plan.bytes_moved, plan.slots_moved * o.expert_bytes);
}

// The public EPLB's hierarchical policy (deepseek-ai/EPLB,
// rebalance_experts_hierarchical), rewritten in float64 as the baseline:
// groups packed onto nodes (equal counts, heaviest into the lightest), replica
// counts per node, replicas packed onto a node's servers (equal counts,
// heaviest into the lightest; it may put two replicas of one expert on one
// server, which our constraints forbid: `duplicates` tells). Returns max/mean
// over servers.
double EplbHierarchicalMaxOverMean(const std::vector<double>& loads, int num_groups, int num_nodes,
                                   int num_servers, int slots_per_server, bool* duplicates) {
  *duplicates = false;
  auto balanced_packing = [](const std::vector<double>& w, int packs) {
    const int per_pack = static_cast<int>(w.size()) / packs;
    std::vector<int> order(w.size()), pack_of(w.size()), items(packs, 0);
    std::vector<double> load(packs, 0.0);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return w[a] > w[b]; });
    for (int i : order) {
      int best = -1;
      for (int p = 0; p < packs; ++p) {
        if (items[p] < per_pack && (best < 0 || load[p] < load[best])) best = p;
      }
      pack_of[i] = best;
      ++items[best];
      load[best] += w[i];
    }
    return std::pair(pack_of, load);
  };
  const int num_experts = static_cast<int>(loads.size());
  const int group_size = num_experts / num_groups;
  std::vector<double> group_loads(num_groups, 0.0);
  for (int e = 0; e < num_experts; ++e) group_loads[e / group_size] += loads[e];
  const std::vector<int> node_of = balanced_packing(group_loads, num_nodes).first;
  const int servers_per_node = num_servers / num_nodes;
  const int phys_per_node = num_servers * slots_per_server / num_nodes;
  std::vector<double> server_loads;
  for (int i = 0; i < num_nodes; ++i) {
    std::vector<double> w;
    for (int e = 0; e < num_experts; ++e) {
      if (node_of[e / group_size] == i) w.push_back(loads[e]);
    }
    std::vector<int> count(w.size(), 1);
    for (int k = static_cast<int>(w.size()); k < phys_per_node; ++k) {
      int best = 0;
      for (size_t e = 1; e < w.size(); ++e) {
        if (w[e] / count[e] > w[best] / count[best]) best = static_cast<int>(e);
      }
      ++count[best];
    }
    std::vector<double> phys;
    std::vector<int> phys_expert;
    for (size_t e = 0; e < w.size(); ++e) {
      for (int r = 0; r < count[e]; ++r) phys.push_back(w[e] / count[e]), phys_expert.push_back(e);
    }
    const auto [server_of, packed] = balanced_packing(phys, servers_per_node);
    std::set<std::pair<int, int>> seen;  // (server, expert)
    for (size_t k = 0; k < phys.size(); ++k)
      *duplicates |= !seen.insert({server_of[k], phys_expert[k]}).second;
    server_loads.insert(server_loads.end(), packed.begin(), packed.end());
  }
  return MaxOverMean(server_loads);
}

// The best max/mean any placement can reach when whole groups stay on one
// node: over every assignment of groups to nodes that fits (each node takes
// lo..hi groups), the heaviest node's load per server / the mean per server.
double NodeBound(const std::vector<double>& loads, int num_groups, int num_nodes, int num_servers,
                 int slots_per_server) {
  const int group_size = static_cast<int>(loads.size()) / num_groups;
  std::vector<double> group_loads(num_groups, 0.0);
  for (size_t e = 0; e < loads.size(); ++e) group_loads[e / group_size] += loads[e];
  const double mean = std::accumulate(loads.begin(), loads.end(), 0.0) / num_servers;
  double best = std::numeric_limits<double>::infinity();
  std::vector<int> node_of(num_groups, 0);
  while (true) {
    std::vector<double> load(num_nodes, 0.0);
    std::vector<int> taken(num_nodes, 0);
    for (int g = 0; g < num_groups; ++g) load[node_of[g]] += group_loads[g], ++taken[node_of[g]];
    bool fits = true;
    double worst = 0;
    for (int i = 0; i < num_nodes; ++i) {
      const int n = (i + 1) * num_servers / num_nodes - i * num_servers / num_nodes;
      fits &= taken[i] * group_size <= n * slots_per_server &&
              taken[i] * group_size >= slots_per_server;
      worst = std::max(worst, load[i] / n / mean);
    }
    if (fits) best = std::min(best, worst);
    int g = 0;
    while (g < num_groups && ++node_of[g] == num_nodes) node_of[g++] = 0;
    if (g == num_groups) break;
  }
  return best;
}

// Expert loads from simulated DeepSeek-V3 routing: every token scores each
// expert log(p_e) + Gumbel noise, keeps the 4 of 8 groups with the best sum of
// their top-2 scores, and takes the top 8 experts of those groups. p is Zipf(s)
// over randomly permuted ids, so experts are skewed but no expert can take more
// than one slot of a token (a share of at most 1/8).
std::vector<double> RoutedLoads(double zipf_s, uint64_t seed, int tokens) {
  constexpr int kExperts = 256, kGroups = 8, kGroupSize = 32, kTopGroups = 4, kTopK = 8;
  const std::vector<double> p = Zipf(kExperts, zipf_s, seed, /*shuffle=*/true);
  std::mt19937_64 rng(seed * 7919 + 1);
  std::uniform_real_distribution<double> uni(1e-12, 1.0);
  std::vector<double> loads(kExperts, 0.0), score(kExperts);
  std::vector<int> groups(kGroups), experts;
  for (int t = 0; t < tokens; ++t) {
    std::vector<double> group_score(kGroups);
    for (int e = 0; e < kExperts; ++e) score[e] = std::log(p[e]) - std::log(-std::log(uni(rng)));
    for (int g = 0; g < kGroups; ++g) {
      std::vector<double> s(score.begin() + g * kGroupSize, score.begin() + (g + 1) * kGroupSize);
      std::partial_sort(s.begin(), s.begin() + 2, s.end(), std::greater<>());
      group_score[g] = s[0] + s[1];
    }
    std::iota(groups.begin(), groups.end(), 0);
    std::partial_sort(groups.begin(), groups.begin() + kTopGroups, groups.end(),
                      [&](int a, int b) { return group_score[a] > group_score[b]; });
    experts.clear();
    for (int k = 0; k < kTopGroups; ++k) {
      for (int e = groups[k] * kGroupSize; e < (groups[k] + 1) * kGroupSize; ++e)
        experts.push_back(e);
    }
    std::partial_sort(experts.begin(), experts.begin() + kTopK, experts.end(),
                      [&](int a, int b) { return score[a] > score[b]; });
    for (int k = 0; k < kTopK; ++k) loads[experts[k]] += 1;
  }
  return loads;
}

TEST(Planner, ConstraintsHoldOnRandomInputs) {
  std::mt19937_64 rng(7);
  int planned = 0, hierarchical = 0, incremental = 0;
  for (int trial = 0; trial < 400; ++trial) {
    // Every third trial hierarchical: G groups of 1..8 experts, M nodes
    // (G % M need not be 0), drawn until the shapes fit.
    const bool want_groups = trial % 3 == 0;
    int num_experts = 0;
    PlanOptions o;
    for (int attempt = 0; attempt < 100; ++attempt) {
      o = PlanOptions{};
      if (want_groups) {
        o.num_groups = 1 + static_cast<int>(rng() % 8);
        o.num_nodes = 1 + static_cast<int>(rng() % 4);
        num_experts = o.num_groups * (1 + static_cast<int>(rng() % 8));
      } else {
        num_experts = 1 + static_cast<int>(rng() % 48);
      }
      o.num_servers = 1 + static_cast<int>(rng() % 12);
      const int min_s = (num_experts + o.num_servers - 1) / o.num_servers;
      if (min_s > num_experts) continue;
      o.slots_per_server = min_s + static_cast<int>(rng() % (num_experts - min_s + 1));
      if (ValidatePlanOptions(num_experts, o).ok()) break;
    }
    ASSERT_TRUE(ValidatePlanOptions(num_experts, o).ok());
    o.expert_bytes = 1 + static_cast<int64_t>(rng() % 1000);
    o.balance_slack = (rng() % 3) * 0.05;
    std::vector<double> loads(num_experts);
    const int shape = static_cast<int>(rng() % 4);
    for (int e = 0; e < num_experts; ++e) {
      const double u = std::uniform_real_distribution<double>(0, 1)(rng);
      loads[e] = shape == 0   ? 0.0
                 : shape == 1 ? std::floor(u * 10)
                 : shape == 2 ? u
                              : std::exp(8 * u);
    }
    SCOPED_TRACE(::testing::Message()
                 << "trial " << trial << ": E " << num_experts << " N " << o.num_servers << " S "
                 << o.slots_per_server << " G " << o.num_groups << " M " << o.num_nodes);
    absl::StatusOr<LayerPlan> plan = PlanLayer(loads, o);
    ASSERT_TRUE(plan.ok()) << plan.status();
    ExpectValid(loads, o, *plan);
    ++planned;
    hierarchical += o.num_groups > 0;

    // Incremental from a random current placement: other server and slot
    // counts, experts missing, then from the plan itself with new loads.
    ServerSlots current(1 + rng() % 14);
    for (auto& v : current) {
      for (int e = 0; e < num_experts; ++e) {
        if (rng() % 3 == 0) v.push_back(e);
      }
      std::shuffle(v.begin(), v.end(), rng);
    }
    for (const ServerSlots* cur : {&current, &plan->servers}) {
      for (double& l : loads) l *= 0.5 + std::uniform_real_distribution<double>(0, 1)(rng);
      absl::StatusOr<LayerPlan> next = PlanLayer(loads, o, cur);
      ASSERT_TRUE(next.ok()) << next.status();
      ExpectValid(loads, o, *next, cur);
      ++incremental;
    }
  }
  std::printf("random inputs: %d plans (%d hierarchical), %d incremental\n", planned, hierarchical,
              incremental);
  EXPECT_EQ(planned, 400);
  EXPECT_GT(hierarchical, 100);
}

TEST(Planner, ZipfOver64ExpertsWith25PercentSpareSlotsIsWithinOnePercent) {
  // 64 experts, 80 slots: 8 servers x 10, 16 x 5, 4 x 20, 20 x 4.
  for (auto [n, s] : {std::pair{8, 10}, {16, 5}, {4, 20}, {20, 4}}) {
    for (bool shuffle : {false, true}) {
      const std::vector<double> loads = Zipf(64, 1.2, n, shuffle);
      PlanOptions o;
      o.num_servers = n;
      o.slots_per_server = s;
      absl::StatusOr<LayerPlan> plan = PlanLayer(loads, o);
      ASSERT_TRUE(plan.ok()) << plan.status();
      ExpectValid(loads, o, *plan);
      std::printf("Zipf(1.2), 64 experts, %2d servers x %2d slots%s: max/mean %.5f\n", n, s,
                  shuffle ? " (ids shuffled)" : "", plan->max_over_mean);
      // 4 slots per server is coarse: a server holding a replica of the top
      // experts has 2 or 3 slots left for the rest.
      EXPECT_LE(plan->max_over_mean, s >= 5 ? 1.01 : 1.03) << n << " x " << s;
    }
  }
}

// DeepSeek-V3 shapes: 256 experts in 8 groups, 32 servers in 4 nodes, 9 slots
// each (32 spare). Prints global, hierarchical, the node bound and the public
// EPLB's hierarchical policy; returns {hierarchical / global, hierarchical /
// node bound, EPLB / global}, each the worst over `seeds`.
struct Gaps {
  double global = 0, bound = 0, eplb = 0;
};
Gaps CompareOnV3Shapes(const char* name, const std::function<std::vector<double>(uint64_t)>& make,
                       int seeds) {
  PlanOptions global;
  global.num_servers = 32;
  global.slots_per_server = 9;
  PlanOptions hier = global;
  hier.num_groups = 8;
  hier.num_nodes = 4;
  Gaps worst;
  for (uint64_t seed = 1; seed <= static_cast<uint64_t>(seeds); ++seed) {
    const std::vector<double> loads = make(seed);
    absl::StatusOr<LayerPlan> g = PlanLayer(loads, global);
    absl::StatusOr<LayerPlan> h = PlanLayer(loads, hier);
    EXPECT_TRUE(g.ok() && h.ok());
    if (!g.ok() || !h.ok()) return worst;
    ExpectValid(loads, global, *g);
    ExpectValid(loads, hier, *h);
    bool duplicates = false;
    const double eplb = EplbHierarchicalMaxOverMean(loads, 8, 4, 32, 9, &duplicates);
    const double bound = NodeBound(loads, 8, 4, 32, 9);
    const double top = *std::max_element(loads.begin(), loads.end()) /
                       std::accumulate(loads.begin(), loads.end(), 0.0);
    std::printf(
        "  %s seed %llu (top expert %4.1f%%): global %.4f, hierarchical %.4f "
        "(node bound %.4f), "
        "public EPLB hierarchical %.4f%s\n",
        name, static_cast<unsigned long long>(seed), 100 * top, g->max_over_mean, h->max_over_mean,
        bound, eplb, duplicates ? " (puts two replicas of an expert on one server)" : "");
    // EPLB's duplicates split an expert unevenly, which the planner's model
    // (an expert's tokens split evenly over its replicas) does not allow.
    if (!duplicates) {
      EXPECT_LE(h->max_over_mean, eplb + 1e-9) << name << " seed " << seed;
    }
    worst.global = std::max(worst.global, h->max_over_mean / g->max_over_mean);
    worst.bound = std::max(worst.bound, h->max_over_mean / bound);
    worst.eplb = std::max(worst.eplb, eplb / g->max_over_mean);
  }
  std::printf(
      "%s: hierarchical / global <= %.4f, hierarchical / node bound <= %.4f, "
      "public EPLB hierarchical / "
      "global <= %.4f\n",
      name, worst.global, worst.bound, worst.eplb);
  return worst;
}

TEST(Planner, HierarchicalStaysCloseToGlobalOnDeepSeekV3Shapes) {
  // Skewed experts (Zipf(1.2) inside each group: the top expert of a group
  // takes a third of its load) in groups of similar load (+-10%).
  for (double zipf_s : {1.0, 1.2}) {
    const std::string name = absl::StrFormat("Zipf(%.1f) in groups of similar load", zipf_s);
    const Gaps gaps = CompareOnV3Shapes(
        name.c_str(), [&](uint64_t seed) { return SkewedInGroups(zipf_s, seed); }, 5);
    EXPECT_LE(gaps.global, 1.03) << name;
    EXPECT_LE(gaps.bound, 1.01) << name;
  }
}

TEST(Planner, HierarchicalReachesTheNodeBoundOnSkewedGroups) {
  // When whole groups differ in load, no placement that keeps a group on one
  // node beats the node bound (the heaviest node's load per server, over the
  // best assignment of groups to nodes); the planner's assignment is optimal
  // and its packing inside nodes gets within 1% of the bound, until the top
  // expert of a node needs more replicas than the node has servers.
  for (double zipf_s : {0.6, 0.8, 1.0, 1.2}) {
    const std::string routed = absl::StrFormat("routed Zipf(%.1f)", zipf_s);
    const Gaps r = CompareOnV3Shapes(
        routed.c_str(), [&](uint64_t seed) { return RoutedLoads(zipf_s, seed, 4000); }, 4);
    if (zipf_s <= 1.0) {
      EXPECT_LE(r.bound, 1.01) << routed;
    }
    const std::string raw = absl::StrFormat("raw Zipf(%.1f)", zipf_s);
    const Gaps w = CompareOnV3Shapes(
        raw.c_str(), [&](uint64_t seed) { return Zipf(256, zipf_s, seed, true); }, 4);
    if (zipf_s <= 1.0) {
      EXPECT_LE(w.bound, 1.01) << raw;
    }
  }
}

TEST(Planner, IncrementalMovesFewerBytesThanFromScratch) {
  const int64_t kExpertBytes = 3 * 7168 * 2048;  // a V3 routed expert in fp8
  PlanOptions o;
  o.num_servers = 32;
  o.slots_per_server = 9;
  o.expert_bytes = kExpertBytes;
  std::mt19937_64 rng(3);
  for (uint64_t seed = 1; seed <= 5; ++seed) {
    std::vector<double> loads = Zipf(256, 0.8, seed, true);
    absl::StatusOr<LayerPlan> before = PlanLayer(loads, o);
    ASSERT_TRUE(before.ok());
    // A small change: every load moves by up to +-10%.
    for (double& l : loads) l *= 0.9 + 0.2 * std::uniform_real_distribution<double>(0, 1)(rng);
    absl::StatusOr<LayerPlan> scratch = PlanLayer(loads, o);
    absl::StatusOr<LayerPlan> incr = PlanLayer(loads, o, &before->servers);
    ASSERT_TRUE(scratch.ok());
    ASSERT_TRUE(incr.ok());
    ExpectValid(loads, o, *incr, &before->servers);
    const int64_t scratch_moved = SlotsMoved(before->servers, scratch->servers);
    std::printf(
        "V3 shapes, Zipf(0.8) seed %llu, loads +-10%%: before %.4f, from "
        "scratch %.4f moving %lld slots "
        "(%.2f GB), incremental %.4f moving %lld slots (%.2f GB)\n",
        static_cast<unsigned long long>(seed), MaxOverMean(ServerLoads(loads, before->servers)),
        scratch->max_over_mean, static_cast<long long>(scratch_moved),
        scratch_moved * kExpertBytes / 1e9, incr->max_over_mean,
        static_cast<long long>(incr->slots_moved), incr->bytes_moved / 1e9);
    EXPECT_LT(incr->bytes_moved, scratch_moved * kExpertBytes);
    EXPECT_LE(incr->max_over_mean, scratch->max_over_mean * (1 + o.balance_slack) + 1e-12);
  }
}

TEST(Planner, SlackTradesBalanceForMoves) {
  PlanOptions o;
  o.num_servers = 16;
  o.slots_per_server = 5;
  std::vector<double> loads = Zipf(64, 1.0, 1, true);
  absl::StatusOr<LayerPlan> before = PlanLayer(loads, o);
  ASSERT_TRUE(before.ok());
  std::reverse(loads.begin(), loads.end());  // a big change
  absl::StatusOr<LayerPlan> scratch = PlanLayer(loads, o);
  ASSERT_TRUE(scratch.ok());
  int64_t last_moved = std::numeric_limits<int64_t>::max();
  for (double slack : {0.0, 0.02, 0.1, 0.5, 1e9}) {
    o.balance_slack = slack;
    absl::StatusOr<LayerPlan> p = PlanLayer(loads, o, &before->servers);
    ASSERT_TRUE(p.ok());
    ExpectValid(loads, o, *p, &before->servers);
    std::printf(
        "reversed Zipf(1.0), 16 x 5, slack %g: max/mean %.4f (fresh %.4f), "
        "%lld slots moved\n",
        slack, p->max_over_mean, scratch->max_over_mean, static_cast<long long>(p->slots_moved));
    EXPECT_LE(p->max_over_mean, scratch->max_over_mean * (1 + slack) * (1 + 1e-12));
    EXPECT_LE(p->slots_moved, last_moved);
    last_moved = p->slots_moved;
  }
  EXPECT_EQ(last_moved, 0);  // a complete placement needs no repair
}

TEST(Planner, ServerLeavingMovesOnlyWhatItHeld) {
  PlanOptions o;
  o.num_servers = 8;
  o.slots_per_server = 10;
  const std::vector<double> loads = Zipf(64, 1.2, 2, true);
  absl::StatusOr<LayerPlan> before = PlanLayer(loads, o);
  ASSERT_TRUE(before.ok());
  // Server 7 leaves: its experts with no other replica must land elsewhere.
  o.num_servers = 7;
  o.slots_per_server = 12;  // the survivors have room for more
  int orphans = 0;
  for (int32_t e : before->servers[7]) {
    bool elsewhere = false;
    for (int s = 0; s < 7; ++s)
      elsewhere |= std::count(before->servers[s].begin(), before->servers[s].end(), e) > 0;
    orphans += !elsewhere;
  }
  o.balance_slack = 1e9;
  absl::StatusOr<LayerPlan> repair = PlanLayer(loads, o, &before->servers);
  ASSERT_TRUE(repair.ok()) << repair.status();
  ExpectValid(loads, o, *repair, &before->servers);
  // 14 new slots: the orphans first, then replicas of the heaviest experts.
  EXPECT_EQ(repair->slots_moved, 7 * 12 - 7 * 10);
  for (int32_t e : before->servers[7]) {
    bool placed = false;
    for (const auto& v : repair->servers) placed |= std::count(v.begin(), v.end(), e) > 0;
    EXPECT_TRUE(placed) << "expert " << e;
  }
  o.balance_slack = 0.02;
  absl::StatusOr<LayerPlan> balanced = PlanLayer(loads, o, &before->servers);
  ASSERT_TRUE(balanced.ok());
  ExpectValid(loads, o, *balanced, &before->servers);
  std::printf(
      "server 7 of 8 leaves (%d orphaned experts): repair only %.4f moving "
      "%lld slots, "
      "slack 0.02 %.4f moving %lld slots\n",
      orphans, repair->max_over_mean, static_cast<long long>(repair->slots_moved),
      balanced->max_over_mean, static_cast<long long>(balanced->slots_moved));
}

TEST(Planner, HierarchicalIncrementalKeepsGroupsOnTheirNodes) {
  PlanOptions o;
  o.num_servers = 32;
  o.slots_per_server = 9;
  o.num_groups = 8;
  o.num_nodes = 4;
  std::vector<double> loads = SkewedInGroups(1.2, 3);
  absl::StatusOr<LayerPlan> before = PlanLayer(loads, o);
  ASSERT_TRUE(before.ok());
  std::mt19937_64 rng(5);
  for (double& l : loads) l *= 0.9 + 0.2 * std::uniform_real_distribution<double>(0, 1)(rng);
  absl::StatusOr<LayerPlan> scratch = PlanLayer(loads, o);
  absl::StatusOr<LayerPlan> incr = PlanLayer(loads, o, &before->servers);
  ASSERT_TRUE(scratch.ok());
  ASSERT_TRUE(incr.ok());
  ExpectValid(loads, o, *incr, &before->servers);
  const int64_t scratch_moved = SlotsMoved(before->servers, scratch->servers);
  std::printf(
      "hierarchical V3 shapes, loads +-10%%: from scratch %.4f moving %lld "
      "slots, incremental %.4f moving "
      "%lld slots\n",
      scratch->max_over_mean, static_cast<long long>(scratch_moved), incr->max_over_mean,
      static_cast<long long>(incr->slots_moved));
  EXPECT_LT(incr->slots_moved * 4, scratch_moved);
  EXPECT_LE(incr->max_over_mean, scratch->max_over_mean * (1 + o.balance_slack) + 1e-12);
}

TEST(Planner, EdgeCases) {
  PlanOptions o;
  o.num_servers = 1;
  o.slots_per_server = 4;
  absl::StatusOr<LayerPlan> one = PlanLayer(std::vector<double>{3, 1, 0, 2}, o);
  ASSERT_TRUE(one.ok());
  EXPECT_EQ(one->servers, (ServerSlots{{0, 1, 2, 3}}));
  EXPECT_DOUBLE_EQ(one->max_over_mean, 1.0);

  // All loads zero: any valid plan, balanced by definition.
  o.num_servers = 3;
  o.slots_per_server = 2;
  absl::StatusOr<LayerPlan> zero = PlanLayer(std::vector<double>(5, 0.0), o);
  ASSERT_TRUE(zero.ok());
  ExpectValid(std::vector<double>(5, 0.0), o, *zero);
  EXPECT_DOUBLE_EQ(zero->max_over_mean, 1.0);

  // S == E: every server holds every expert.
  o.slots_per_server = 5;
  absl::StatusOr<LayerPlan> full = PlanLayer(std::vector<double>{5, 4, 3, 2, 1}, o);
  ASSERT_TRUE(full.ok());
  for (const auto& v : full->servers) EXPECT_EQ(v, (std::vector<int32_t>{0, 1, 2, 3, 4}));

  // Deterministic.
  o.num_servers = 8;
  o.slots_per_server = 10;
  const std::vector<double> loads = Zipf(64, 1.2, 4, true);
  EXPECT_EQ(PlanLayer(loads, o)->servers, PlanLayer(loads, o)->servers);

  EXPECT_EQ(SlotsForBudget(10'000, 3'000), 3);
  o.expert_bytes = 3'000;
  o.server_bytes = 30'000;
  EXPECT_TRUE(PlanLayer(loads, o).ok());
}

TEST(Planner, ErrorsNameTheOption) {
  const std::vector<double> loads(16, 1.0);
  auto error = [&](PlanOptions o, std::span<const double> l = {},
                   const ServerSlots* cur = nullptr) {
    absl::StatusOr<LayerPlan> p = PlanLayer(l.empty() ? std::span<const double>(loads) : l, o, cur);
    EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
    return std::string(p.status().message());
  };
  PlanOptions ok;
  ok.num_servers = 4;
  ok.slots_per_server = 5;
  PlanOptions o = ok;
  o.num_servers = 0;
  EXPECT_THAT(error(o), HasSubstr("num_servers must be in [1,"));
  o = ok;
  o.slots_per_server = 3;
  EXPECT_THAT(error(o), HasSubstr("num_servers 4 x slots_per_server 3 = 12 slots < 16 experts"));
  o = ok;
  o.slots_per_server = 17;
  EXPECT_THAT(error(o), HasSubstr("slots_per_server 17 exceeds the 16 experts"));
  o = ok;
  o.expert_bytes = 100;
  o.server_bytes = 499;
  EXPECT_THAT(error(o),
              HasSubstr("slots_per_server 5 x expert_bytes 100 exceeds server_bytes 499"));
  o = ok;
  o.balance_slack = -1;
  EXPECT_THAT(error(o), HasSubstr("balance_slack must be finite and >= 0"));
  o = ok;
  o.num_groups = 4;
  EXPECT_THAT(error(o), HasSubstr("num_groups and num_nodes go together"));
  o.num_nodes = 5;
  EXPECT_THAT(error(o), HasSubstr("num_nodes 5 exceeds num_servers 4"));
  o.num_groups = 3;
  o.num_nodes = 2;
  EXPECT_THAT(error(o), HasSubstr("num_groups 3 does not divide the 16 experts"));
  o.num_groups = 2;  // groups of 8, nodes of 2 servers x 5 slots: 1 group each fits
  EXPECT_TRUE(ValidatePlanOptions(16, o).ok());
  o.num_groups = 16;  // groups of 1: a node takes 5..10, 16 fit; 4 nodes take 20..
  o.num_nodes = 4;
  EXPECT_THAT(error(o), HasSubstr("num_groups 16 of 1 experts do not fit "
                                  "num_nodes 4: the nodes hold 20 to 20"));
  o.num_groups = 2;
  o.num_nodes = 4;  // 8 experts per group, 1 server x 5 slots per node: at most 0 groups
  EXPECT_THAT(error(o), HasSubstr("node 0 (1 servers x 5 slots) cannot hold "
                                  "whole groups of 8 experts"));

  std::vector<double> bad = loads;
  bad[3] = -1;
  EXPECT_THAT(error(ok, bad), HasSubstr("load of expert 3 is -1; loads must be finite and >= 0"));
  bad[3] = std::numeric_limits<double>::quiet_NaN();
  EXPECT_THAT(error(ok, bad), HasSubstr("load of expert 3 is nan"));
  ServerSlots cur = {{0, 1}, {2, 16}};
  EXPECT_THAT(error(ok, {}, &cur),
              HasSubstr("current placement: server 1: expert id 16 out of range [0, 16)"));
  cur = {{0, 1, 0}};
  EXPECT_THAT(error(ok, {}, &cur), HasSubstr("current placement: server 0 holds expert 0 twice"));
}

}  // namespace
}  // namespace dmoe::place
