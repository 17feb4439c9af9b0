#include "placement/planner.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <queue>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "core/status.h"

namespace dmoe::place {
namespace {

// Sizes are bounded so that the [server][expert] bitmaps stay small (64 MiB).
constexpr int64_t kMaxServers = 1 << 16;
constexpr int64_t kMaxExperts = 1 << 16;
constexpr int64_t kMaxServerExperts = int64_t{1} << 26;

double Sum(std::span<const double> v) { return std::accumulate(v.begin(), v.end(), 0.0); }

// ---------------------------------------------------------------------------
// Replica counts

// One replica each, then every extra slot to the expert with the largest load
// per replica among those with fewer than `num_servers` (ties: fewer
// replicas, then the lowest id). `total_slots` <= E * num_servers.
std::vector<int> ReplicaCounts(std::span<const double> loads, int num_servers,
                               int64_t total_slots) {
  const int num_experts = static_cast<int>(loads.size());
  std::vector<int> count(num_experts, 1);
  using Item = std::tuple<double, int, int>;  // (load per replica, -count, -expert)
  std::priority_queue<Item> heap;
  if (num_servers > 1) {
    for (int e = 0; e < num_experts; ++e) heap.push({loads[e], -1, -e});
  }
  for (int64_t k = num_experts; k < total_slots && !heap.empty(); ++k) {
    const int e = -std::get<2>(heap.top());
    heap.pop();
    ++count[e];
    if (count[e] < num_servers) heap.push({loads[e] / count[e], -count[e], -e});
  }
  return count;
}

// Makes `count` (each in [1, num_servers]) sum to `total_slots`: takes replicas
// from the experts whose load per replica stays the smallest without one, and
// gives replicas to the ones with the largest load per replica.
void AdjustCounts(std::span<const double> loads, int num_servers, int64_t total_slots,
                  std::vector<int>& count) {
  int64_t sum = std::accumulate(count.begin(), count.end(), int64_t{0});
  const int num_experts = static_cast<int>(loads.size());
  for (; sum > total_slots; --sum) {
    int best = -1;
    for (int e = 0; e < num_experts; ++e) {
      if (count[e] < 2) continue;
      if (best < 0 || loads[e] / (count[e] - 1) < loads[best] / (count[best] - 1)) best = e;
    }
    --count[best];
  }
  for (; sum < total_slots; ++sum) {
    int best = -1;
    for (int e = 0; e < num_experts; ++e) {
      if (count[e] >= num_servers) continue;
      if (best < 0 || loads[e] / count[e] > loads[best] / count[best]) best = e;
    }
    ++count[best];
  }
}

// ---------------------------------------------------------------------------
// Packing

// Adds the replicas that `slots` lacks to reach `target[e]` for every expert,
// heaviest per-replica load (loads[e] / target[e]) first, each into the
// lightest server with fewer than `slots_per_server` that does not hold it.
// When every server with room holds it, a lighter expert of a full server
// without it moves to a server with room first (one exists: the full server
// has more experts than the one with room, so not all of them are there).
// Requires sum(target) == servers * slots_per_server and target[e] <= servers.
void FillLpt(std::span<const double> loads, const std::vector<int>& target, int slots_per_server,
             ServerSlots& slots) {
  const int n = static_cast<int>(slots.size());
  const int num_experts = static_cast<int>(loads.size());
  auto weight = [&](int e) { return loads[e] / target[e]; };
  std::vector<uint8_t> holds(static_cast<size_t>(n) * num_experts, 0);
  std::vector<int> placed(num_experts, 0);
  std::vector<double> load(n, 0.0);
  for (int s = 0; s < n; ++s) {
    for (int32_t e : slots[s]) {
      holds[static_cast<size_t>(s) * num_experts + e] = 1;
      ++placed[e];
      load[s] += weight(e);
    }
  }
  std::vector<int32_t> items;
  for (int e = 0; e < num_experts; ++e) {
    for (int k = placed[e]; k < target[e]; ++k) items.push_back(e);
  }
  std::stable_sort(items.begin(), items.end(),
                   [&](int32_t a, int32_t b) { return weight(a) > weight(b); });
  auto has = [&](int s, int e) -> uint8_t& {
    return holds[static_cast<size_t>(s) * num_experts + e];
  };
  auto put = [&](int s, int e) {
    slots[s].push_back(e);
    has(s, e) = 1;
    load[s] += weight(e);
  };
  for (int32_t e : items) {
    int best = -1;
    for (int s = 0; s < n; ++s) {
      if (static_cast<int>(slots[s].size()) < slots_per_server && !has(s, e) &&
          (best < 0 || load[s] < load[best])) {
        best = s;
      }
    }
    if (best < 0) {
      int room = -1, full = -1;
      for (int s = 0; s < n; ++s) {
        if (static_cast<int>(slots[s].size()) < slots_per_server) {
          if (room < 0 || load[s] < load[room]) room = s;
        } else if (!has(s, e) && (full < 0 || load[s] < load[full])) {
          full = s;
        }
      }
      int pos = -1;
      for (int p = 0; p < static_cast<int>(slots[full].size()); ++p) {
        const int32_t f = slots[full][p];
        if (!has(room, f) && (pos < 0 || weight(f) < weight(slots[full][pos]))) pos = p;
      }
      const int32_t f = slots[full][pos];
      slots[full].erase(slots[full].begin() + pos);
      has(full, f) = 0;
      load[full] -= weight(f);
      put(room, f);
      best = full;
    }
    put(best, e);
  }
}

// ---------------------------------------------------------------------------
// Local search

// Lowers the heaviest server step by step (see planner.h, step 3). With a
// current placement (`current`, [server * E + expert] = 1 where it is now),
// the step that lowers the most per slot moved is taken, steps that move
// nothing first; without one, the step that lowers the most.
class Search {
 public:
  Search(std::span<const double> loads, ServerSlots slots, const std::vector<uint8_t>* current)
      : loads_(loads),
        n_(static_cast<int>(slots.size())),
        e_(static_cast<int>(loads.size())),
        slots_(std::move(slots)),
        current_(current) {
    mean_ = Sum(loads) / n_;
    eps_ = 1e-9 * mean_;
    Rebuild();
  }

  // Steps until max/mean <= stop_ratio or no step lowers the heaviest server.
  void Run(double stop_ratio) {
    if (mean_ <= 0) return;
    const int64_t max_steps =
        20 * static_cast<int64_t>(n_) * std::max<size_t>(1, slots_[0].size()) + 100;
    for (int64_t k = 0; k < max_steps; ++k) {
      if (Ratio() <= stop_ratio || !Step()) return;
    }
  }
  double Ratio() const {
    return mean_ > 0 ? *std::max_element(load_.begin(), load_.end()) / mean_ : 1.0;
  }
  ServerSlots Take() { return std::move(slots_); }

 private:
  // kSwap: slots (s, i) and (t, j) trade experts. kReplace: slot (s, i) gets
  // `expert`.
  enum Kind { kNone, kSwap, kReplace };
  struct Action {
    Kind kind = kNone;
    int s = 0, i = 0, t = 0, j = 0, expert = 0;
  };

  bool Holds(int s, int e) const { return holds_[static_cast<size_t>(s) * e_ + e] != 0; }
  double Weight(int e) const { return weight_[e]; }
  // 1 when expert e on server s would be a moved slot.
  int Moved(int s, int e) const {
    return current_ != nullptr && (*current_)[static_cast<size_t>(s) * e_ + e] == 0 ? 1 : 0;
  }

  void Rebuild() {
    holds_.assign(static_cast<size_t>(n_) * e_, 0);
    count_.assign(e_, 0);
    where_.assign(e_, {});
    for (int s = 0; s < n_; ++s) {
      for (int32_t e : slots_[s]) {
        holds_[static_cast<size_t>(s) * e_ + e] = 1;
        ++count_[e];
        where_[e].push_back(s);
      }
    }
    weight_.assign(e_, 0.0);
    for (int e = 0; e < e_; ++e) {
      if (count_[e] > 0) weight_[e] = loads_[e] / count_[e];
    }
    load_.assign(n_, 0.0);
    for (int s = 0; s < n_; ++s) {
      for (int32_t e : slots_[s]) load_[s] += Weight(e);
    }
  }

  void Consider(double gain, int moved, const Action& a) {
    if (gain <= 0) return;
    if (moved <= 0) {
      if (free_.kind == kNone || gain > free_gain_) free_ = a, free_gain_ = gain;
    } else if (paid_.kind == kNone || gain / moved > paid_score_) {
      paid_ = a, paid_score_ = gain / moved;
    }
  }

  // Slot (s, i) gets expert b (not on s; the slot's expert keeps a replica).
  void EvalReplace(int h, double peak, int s, int i, int b) {
    const int a = slots_[s][i];
    const int ca = count_[a], cb = count_[b];
    const double grow_a = loads_[a] / (ca - 1) - loads_[a] / ca;
    const double new_b = loads_[b] / (cb + 1);
    const double shrink_b = loads_[b] / cb - new_b;
    auto new_load = [&](int x) {
      if (x == s) return load_[s] - Weight(a) + new_b;
      return load_[x] + (Holds(x, a) ? grow_a : 0.0) - (Holds(x, b) ? shrink_b : 0.0);
    };
    const double h_new = new_load(h);
    if (h_new >= peak - eps_) return;
    double worst = std::max(h_new, new_load(s));
    for (int x : where_[a]) worst = std::max(worst, new_load(x));
    if (peak - worst > eps_)
      Consider(peak - worst, Moved(s, b) - Moved(s, a), {kReplace, s, i, 0, 0, b});
  }

  // When the heaviest server is stuck: a swap between two servers that lowers
  // the sum of squared loads (by 2 d (gap - d) for load d moved across a
  // gap), never raising the heaviest. Servers are tried heaviest first and
  // the best swap with the lightest server that has any is taken; it unblocks
  // the heaviest (which then finds a partner for a swap of its own).
  void EvenOut() {
    const double min_gain = eps_ * mean_;
    std::vector<int> order(n_);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return load_[a] > load_[b]; });
    for (int s : order) {
      for (auto it = order.rbegin(); it != order.rend(); ++it) {
        const int t = *it;
        const double gap = load_[s] - load_[t];
        if (gap <= 2 * eps_) break;
        for (int i = 0; i < static_cast<int>(slots_[s].size()); ++i) {
          const int a = slots_[s][i];
          if (Holds(t, a)) continue;
          for (int j = 0; j < static_cast<int>(slots_[t].size()); ++j) {
            const int b = slots_[t][j];
            if (Holds(s, b)) continue;
            const double d = Weight(a) - Weight(b);
            if (d <= eps_ || d >= gap - eps_ || d * (gap - d) <= min_gain) continue;
            Consider(d * (gap - d), Moved(s, b) + Moved(t, a) - Moved(s, a) - Moved(t, b),
                     {kSwap, s, i, t, j, 0});
          }
        }
        if (free_.kind != kNone || paid_.kind != kNone) return;
      }
    }
  }

  bool Step() {
    const int h = static_cast<int>(std::max_element(load_.begin(), load_.end()) - load_.begin());
    const double peak = load_[h];
    free_ = paid_ = Action{};
    const auto& hs = slots_[h];
    // Swap a slot of h with a lighter one elsewhere.
    for (int i = 0; i < static_cast<int>(hs.size()); ++i) {
      const int a = hs[i];
      const double wa = Weight(a);
      for (int t = 0; t < n_; ++t) {
        if (t == h || load_[t] >= peak - eps_ || Holds(t, a)) continue;
        for (int j = 0; j < static_cast<int>(slots_[t].size()); ++j) {
          const int b = slots_[t][j];
          if (Holds(h, b)) continue;
          const double d = wa - Weight(b);
          if (d <= eps_ || load_[t] + d >= peak - eps_) continue;
          const double worst = std::max(peak - d, load_[t] + d);
          if (peak - worst > eps_)
            Consider(peak - worst, Moved(h, b) + Moved(t, a) - Moved(h, a) - Moved(t, b),
                     {kSwap, h, i, t, j, 0});
        }
      }
    }
    // Drop a replica on h (of an expert that has others) for another expert.
    for (int i = 0; i < static_cast<int>(hs.size()); ++i) {
      const int a = hs[i];
      if (count_[a] < 2) continue;
      const double wa = Weight(a);
      for (int b = 0; b < e_; ++b) {
        if (Holds(h, b) || loads_[b] / (count_[b] + 1) >= wa - eps_) continue;
        EvalReplace(h, peak, h, i, b);
      }
    }
    // Add a replica of an expert of h elsewhere, in place of a spare replica.
    for (int x : hs) {
      if (count_[x] >= n_) continue;
      for (int t = 0; t < n_; ++t) {
        if (t == h || Holds(t, x)) continue;
        for (int j = 0; j < static_cast<int>(slots_[t].size()); ++j) {
          if (count_[slots_[t][j]] >= 2) EvalReplace(h, peak, t, j, x);
        }
      }
    }
    if (free_.kind == kNone && paid_.kind == kNone) EvenOut();
    const Action& a = free_.kind != kNone ? free_ : paid_;
    if (a.kind == kNone) return false;
    Apply(a);
    return true;
  }

  // Applies `a`, updating only what it changes: the two servers of a swap; the
  // holders of both experts of a replace (their replica counts change).
  void Apply(const Action& a) {
    const int s = a.s, x = slots_[s][a.i];
    const int t = a.kind == kSwap ? a.t : s;
    const int y = a.kind == kSwap ? slots_[a.t][a.j] : a.expert;
    auto set = [&](int server, int e, bool on) {
      holds_[static_cast<size_t>(server) * e_ + e] = on ? 1 : 0;
      auto& w = where_[e];
      if (on) {
        w.push_back(server);
      } else {
        w.erase(std::find(w.begin(), w.end(), server));
      }
    };
    set(s, x, false);
    set(s, y, true);
    if (a.kind == kSwap) {
      set(t, y, false);
      set(t, x, true);
      std::swap(slots_[s][a.i], slots_[t][a.j]);
    } else {
      slots_[s][a.i] = y;
      weight_[x] = loads_[x] / --count_[x];
      weight_[y] = loads_[y] / ++count_[y];
    }
    auto reload = [&](int server) {
      load_[server] = 0;
      for (int32_t e : slots_[server]) load_[server] += Weight(e);
    };
    reload(s);
    reload(t);
    if (a.kind == kReplace) {
      for (int server : where_[x]) reload(server);
      for (int server : where_[y]) reload(server);
    }
  }

  // Const after construction.
  std::span<const double> loads_;
  const int n_, e_;
  double mean_ = 0, eps_ = 0;
  // The state and what follows from it (Rebuild).
  ServerSlots slots_;
  const std::vector<uint8_t>* current_;
  std::vector<uint8_t> holds_;           // [n * e]
  std::vector<int> count_;               // [e] replicas
  std::vector<double> weight_;           // [e] load per replica
  std::vector<std::vector<int>> where_;  // [e] -> servers holding it
  std::vector<double> load_;             // [n]
  // The best step found so far in Step().
  Action free_, paid_;
  double free_gain_ = 0, paid_score_ = 0;
};

// ---------------------------------------------------------------------------
// Relabelling

// Row i -> column perm[i] maximising sum w[i][perm[i]] (Hungarian, O(n^3)).
std::vector<int> MaxAssignment(const std::vector<std::vector<double>>& w) {
  const int n = static_cast<int>(w.size());
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<double> u(n + 1, 0), v(n + 1, 0);
  std::vector<int> p(n + 1, 0), way(n + 1, 0);
  for (int i = 1; i <= n; ++i) {
    p[0] = i;
    int j0 = 0;
    std::vector<double> minv(n + 1, inf);
    std::vector<char> used(n + 1, 0);
    do {
      used[j0] = 1;
      const int i0 = p[j0];
      double delta = inf;
      int j1 = 0;
      for (int j = 1; j <= n; ++j) {
        if (used[j]) continue;
        const double cur = -w[i0 - 1][j - 1] - u[i0] - v[j];
        if (cur < minv[j]) minv[j] = cur, way[j] = j0;
        if (minv[j] < delta) delta = minv[j], j1 = j;
      }
      for (int j = 0; j <= n; ++j) {
        if (used[j]) {
          u[p[j]] += delta;
          v[j] -= delta;
        } else {
          minv[j] -= delta;
        }
      }
      j0 = j1;
    } while (p[j0] != 0);
    do {
      const int j1 = way[j0];
      p[j0] = p[j1];
      j0 = j1;
    } while (j0 != 0);
  }
  std::vector<int> perm(n, 0);
  for (int j = 1; j <= n; ++j) perm[p[j] - 1] = j - 1;
  return perm;
}

int Overlap(const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
  int k = 0;
  for (int32_t x : a) k += std::count(b.begin(), b.end(), x);
  return k;
}

// Permutes the servers of `plan` to share the most slots with `current`.
ServerSlots Relabel(const ServerSlots& plan, const ServerSlots& current) {
  const int n = static_cast<int>(plan.size());
  std::vector<std::vector<double>> w(n, std::vector<double>(n));
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < n; ++j) w[i][j] = Overlap(plan[i], current[j]);
  }
  const std::vector<int> perm = MaxAssignment(w);
  ServerSlots out(n);
  for (int i = 0; i < n; ++i) out[perm[i]] = plan[i];
  return out;
}

// ---------------------------------------------------------------------------
// Flat planning (one set of servers)

std::vector<uint8_t> Mask(const ServerSlots& slots, int num_experts) {
  std::vector<uint8_t> m(slots.size() * num_experts, 0);
  for (size_t s = 0; s < slots.size(); ++s) {
    for (int32_t e : slots[s]) m[s * num_experts + e] = 1;
  }
  return m;
}

// `current` trimmed to at most target[e] replicas per expert (the ones on the
// heaviest servers go) and `slots_per_server` per server (the lightest
// replicas go), then filled up to `target` by FillLpt.
ServerSlots StartFrom(std::span<const double> loads, const ServerSlots& current,
                      const std::vector<int>& target, int slots_per_server) {
  const int n = static_cast<int>(current.size());
  const int num_experts = static_cast<int>(loads.size());
  ServerSlots slots = current;
  auto weight = [&](int e) { return loads[e] / target[e]; };
  std::vector<double> load(n, 0.0);
  std::vector<std::vector<int>> where(num_experts);
  for (int s = 0; s < n; ++s) {
    for (int32_t e : slots[s]) {
      load[s] += weight(e);
      where[e].push_back(s);
    }
  }
  for (int e = 0; e < num_experts; ++e) {
    auto& w = where[e];
    if (static_cast<int>(w.size()) <= target[e]) continue;
    std::stable_sort(w.begin(), w.end(), [&](int a, int b) { return load[a] > load[b]; });
    for (size_t k = 0; k < w.size() - target[e]; ++k) {
      auto& v = slots[w[k]];
      v.erase(std::find(v.begin(), v.end(), e));
      load[w[k]] -= weight(e);
    }
  }
  for (auto& v : slots) {
    while (static_cast<int>(v.size()) > slots_per_server) {
      v.erase(std::min_element(v.begin(), v.end(),
                               [&](int32_t a, int32_t b) { return weight(a) < weight(b); }));
    }
  }
  FillLpt(loads, target, slots_per_server, slots);
  return slots;
}

uint64_t SplitMix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Fresh plans tried: the loads as given, then jittered by up to +-10% (fixed
// seeds), which changes the replica counts and packing order the local search
// starts from; the best by the true loads wins. Stops early once max/mean is
// within kGoodEnough of perfect (well below the noise of measured loads).
constexpr int kStarts = 8;
constexpr double kGoodEnough = 1.001;

struct Candidate {
  ServerSlots slots;
  double ratio = 1.0;
  int64_t moved = 0;
};

// Plans `loads` over current.size() servers (or `num_servers` without a
// current placement); see planner.h. With a current placement the plan may
// have max/mean up to (1 + slack) times the fresh plan's or, when
// `max_load` > 0, servers up to `max_load` (a node of a hierarchical plan may
// use the slack of the heaviest node).
ServerSlots PlanFlat(std::span<const double> loads, int num_servers, int slots_per_server,
                     const ServerSlots* current, double slack, double max_load = 0) {
  const int num_experts = static_cast<int>(loads.size());
  const int64_t total = static_cast<int64_t>(num_servers) * slots_per_server;
  const std::vector<int> counts = ReplicaCounts(loads, num_servers, total);
  ServerSlots best;
  double best_ratio = std::numeric_limits<double>::infinity();
  for (int start = 0; start < kStarts && best_ratio > kGoodEnough; ++start) {
    std::vector<double> jittered(loads.begin(), loads.end());
    uint64_t state = start;
    for (double& l : jittered)
      l *= start == 0 ? 1.0 : 0.9 + 0.2 * (SplitMix64(state) >> 11) * 0x1.0p-53;
    ServerSlots fresh(num_servers);
    FillLpt(jittered, start == 0 ? counts : ReplicaCounts(jittered, num_servers, total),
            slots_per_server, fresh);
    Search scratch(loads, std::move(fresh), nullptr);
    scratch.Run(0.0);
    if (scratch.Ratio() < best_ratio) best_ratio = scratch.Ratio(), best = scratch.Take();
  }
  if (current == nullptr) return best;
  const double mean = Sum(loads) / num_servers;
  const double limit_ratio =
      max_load > 0 && mean > 0 ? std::max(best_ratio, max_load / mean) : best_ratio * (1 + slack);

  std::vector<Candidate> candidates;
  candidates.push_back({Relabel(best, *current), best_ratio, 0});
  const std::vector<uint8_t> mask = Mask(*current, num_experts);
  std::vector<int> kept(num_experts, 0);
  for (const auto& v : *current) {
    for (int32_t e : v) ++kept[e];
  }
  for (int& c : kept) c = std::max(c, 1);
  AdjustCounts(loads, num_servers, total, kept);
  for (const std::vector<int>* target : {static_cast<const std::vector<int>*>(&kept), &counts}) {
    Search s(loads, StartFrom(loads, *current, *target, slots_per_server), &mask);
    s.Run(limit_ratio);
    candidates.push_back({s.Take(), s.Ratio(), 0});
  }
  const double limit = limit_ratio * (1 + 1e-12);
  const Candidate* pick = nullptr;
  for (Candidate& c : candidates) {
    c.moved = SlotsMoved(*current, c.slots);
    if (c.ratio > limit) continue;
    if (pick == nullptr || c.moved < pick->moved ||
        (c.moved == pick->moved && c.ratio < pick->ratio)) {
      pick = &c;
    }
  }
  return pick->slots;
}

// ---------------------------------------------------------------------------
// Hierarchical planning

struct Nodes {
  std::vector<int> first;   // [M + 1] node i = servers [first[i], first[i+1])
  std::vector<int> lo, hi;  // [M] groups a node can take
  int size(int i) const { return first[i + 1] - first[i]; }
};

Nodes MakeNodes(int num_servers, int num_nodes, int slots_per_server, int group_size) {
  Nodes nodes;
  for (int i = 0; i <= num_nodes; ++i) {
    nodes.first.push_back(static_cast<int>(static_cast<int64_t>(i) * num_servers / num_nodes));
  }
  for (int i = 0; i < num_nodes; ++i) {
    nodes.lo.push_back((slots_per_server + group_size - 1) / group_size);
    nodes.hi.push_back(
        static_cast<int>(static_cast<int64_t>(nodes.size(i)) * slots_per_server / group_size));
  }
  return nodes;
}

double NodeRatio(std::span<const double> group_loads, const Nodes& nodes,
                 const std::vector<int>& node_of) {
  const int num_nodes = static_cast<int>(nodes.lo.size());
  std::vector<double> load(num_nodes, 0.0);
  for (size_t g = 0; g < node_of.size(); ++g) load[node_of[g]] += group_loads[g];
  const double mean = Sum(group_loads) / nodes.first.back();
  if (mean <= 0) return 1.0;
  double worst = 0;
  for (int i = 0; i < num_nodes; ++i) worst = std::max(worst, load[i] / nodes.size(i) / mean);
  return worst;
}

// Depth-first search over group -> node assignments for the least heaviest
// node (load per server), pruning any branch already as heavy as the best.
struct ExactGroups {
  static constexpr int64_t kMaxVisits = 1 << 20;
  std::span<const double> group_loads;
  const Nodes& nodes;
  const std::vector<int>& order;  // groups, heaviest first
  std::vector<int> best;          // the best assignment so far
  double best_peak = 0, eps = 0;
  std::vector<int> cur, taken;
  std::vector<double> load;
  int64_t visits = 0;

  void Visit(int k, double peak, int deficit) {
    const int num_groups = static_cast<int>(order.size());
    const int num_nodes = static_cast<int>(load.size());
    if (++visits > kMaxVisits) return;
    if (k == num_groups) {
      best_peak = peak;
      best = cur;
      return;
    }
    const int g = order[k];
    const bool must_fill = num_groups - k <= deficit;
    for (int i = 0; i < num_nodes; ++i) {
      if (taken[i] >= nodes.hi[i] || (must_fill && taken[i] >= nodes.lo[i])) continue;
      bool same_as_earlier = false;  // empty nodes of one size are interchangeable
      for (int j = 0; j < i && taken[i] == 0; ++j)
        same_as_earlier |= taken[j] == 0 && nodes.size(j) == nodes.size(i);
      if (same_as_earlier) continue;
      const double next = std::max(peak, (load[i] + group_loads[g]) / nodes.size(i));
      if (next >= best_peak - eps) continue;
      const int next_deficit = deficit - (taken[i] < nodes.lo[i] ? 1 : 0);
      cur[g] = i;
      ++taken[i];
      load[i] += group_loads[g];
      Visit(k + 1, next, next_deficit);
      load[i] -= group_loads[g];
      --taken[i];
    }
  }
};

// Node of each group: heaviest group first into the eligible node lightest per
// server after taking it (its `preferred` node when given and eligible), never
// leaving too few groups for the nodes still under their minimum. Without
// `preferred`, then swaps and moves of groups that lower the heaviest node.
std::vector<int> AssignGroups(std::span<const double> group_loads, const Nodes& nodes,
                              const std::vector<int>* preferred) {
  const int num_groups = static_cast<int>(group_loads.size());
  const int num_nodes = static_cast<int>(nodes.lo.size());
  std::vector<int> order(num_groups), node_of(num_groups, -1), taken(num_nodes, 0);
  std::vector<double> load(num_nodes, 0.0);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return group_loads[a] > group_loads[b]; });
  int deficit = std::accumulate(nodes.lo.begin(), nodes.lo.end(), 0);
  for (int k = 0; k < num_groups; ++k) {
    const int g = order[k];
    const bool must_fill = num_groups - k <= deficit;
    auto eligible = [&](int i) {
      return taken[i] < nodes.hi[i] && (!must_fill || taken[i] < nodes.lo[i]);
    };
    int best = -1;
    if (preferred != nullptr && (*preferred)[g] >= 0 && eligible((*preferred)[g])) {
      best = (*preferred)[g];
    } else {
      for (int i = 0; i < num_nodes; ++i) {
        if (eligible(i) && (best < 0 || (load[i] + group_loads[g]) / nodes.size(i) <
                                            (load[best] + group_loads[g]) / nodes.size(best))) {
          best = i;
        }
      }
    }
    if (taken[best] < nodes.lo[best]) --deficit;
    node_of[g] = best;
    ++taken[best];
    load[best] += group_loads[g];
  }
  if (preferred != nullptr) return node_of;
  const double eps = 1e-9 * (Sum(group_loads) + 1) / nodes.first.back();
  for (int step = 0; step < 100 * num_groups * num_nodes; ++step) {
    int a = 0;
    for (int i = 1; i < num_nodes; ++i) {
      if (load[i] / nodes.size(i) > load[a] / nodes.size(a)) a = i;
    }
    const double peak = load[a] / nodes.size(a);
    double best_worst = peak - eps;
    int best_g = -1, best_b = -1, best_g2 = -1;  // best_g2 < 0: a move
    for (int g = 0; g < num_groups; ++g) {
      if (node_of[g] != a) continue;
      for (int b = 0; b < num_nodes; ++b) {
        if (b == a) continue;
        auto consider = [&](double moved, int g2) {
          const double worst =
              std::max((load[a] - moved) / nodes.size(a), (load[b] + moved) / nodes.size(b));
          if (worst < best_worst) best_worst = worst, best_g = g, best_b = b, best_g2 = g2;
        };
        if (taken[a] > nodes.lo[a] && taken[b] < nodes.hi[b]) consider(group_loads[g], -1);
        for (int g2 = 0; g2 < num_groups; ++g2) {
          if (node_of[g2] == b) consider(group_loads[g] - group_loads[g2], g2);
        }
      }
    }
    if (best_g < 0) break;
    load[a] -= group_loads[best_g];
    load[best_b] += group_loads[best_g];
    node_of[best_g] = best_b;
    if (best_g2 < 0) {
      --taken[a];
      ++taken[best_b];
    } else {
      load[best_b] -= group_loads[best_g2];
      load[a] += group_loads[best_g2];
      node_of[best_g2] = a;
    }
  }
  // Then branch and bound (heaviest group first, the local search's result as
  // the first bound): optimal for the small G and M of real models (8 groups,
  // 4 nodes: a few hundred visits), the local search's result where it gives
  // up.
  ExactGroups exact{group_loads, nodes, order, node_of, 0, 0, {}, {}, {}, 0};
  exact.best_peak = NodeRatio(group_loads, nodes, node_of) * Sum(group_loads) / nodes.first.back();
  exact.eps = eps;
  exact.load.assign(num_nodes, 0.0);
  exact.taken.assign(num_nodes, 0);
  exact.cur.assign(num_groups, -1);
  exact.Visit(0, 0.0, std::accumulate(nodes.lo.begin(), nodes.lo.end(), 0));
  return exact.best;
}

// Runs the flat planner inside every node for the groups `node_of` puts there.
ServerSlots PlanNodes(std::span<const double> loads, const PlanOptions& o, const Nodes& nodes,
                      int group_size, const std::vector<int>& node_of, const ServerSlots* current,
                      double max_load) {
  const int num_experts = static_cast<int>(loads.size());
  ServerSlots out(o.num_servers);
  for (int i = 0; i < static_cast<int>(nodes.lo.size()); ++i) {
    std::vector<int32_t> experts;  // local id -> global id
    std::vector<int32_t> local(num_experts, -1);
    for (int e = 0; e < num_experts; ++e) {
      if (node_of[e / group_size] != i) continue;
      local[e] = static_cast<int32_t>(experts.size());
      experts.push_back(e);
    }
    std::vector<double> node_loads;
    for (int32_t e : experts) node_loads.push_back(loads[e]);
    ServerSlots node_current;
    if (current != nullptr) {
      for (int s = nodes.first[i]; s < nodes.first[i + 1]; ++s) {
        node_current.emplace_back();
        for (int32_t e : (*current)[s]) {
          if (local[e] >= 0) node_current.back().push_back(local[e]);
        }
      }
    }
    ServerSlots plan =
        PlanFlat(node_loads, nodes.size(i), o.slots_per_server,
                 current != nullptr ? &node_current : nullptr, o.balance_slack, max_load);
    for (int k = 0; k < nodes.size(i); ++k) {
      for (int32_t e : plan[k]) out[nodes.first[i] + k].push_back(experts[e]);
    }
  }
  return out;
}

ServerSlots PlanHierarchical(std::span<const double> loads, const PlanOptions& o,
                             const ServerSlots* current) {
  const int num_experts = static_cast<int>(loads.size());
  const int num_groups = o.num_groups, num_nodes = o.num_nodes;
  const int group_size = num_experts / num_groups;
  const Nodes nodes = MakeNodes(o.num_servers, num_nodes, o.slots_per_server, group_size);
  std::vector<double> group_loads(num_groups, 0.0);
  for (int e = 0; e < num_experts; ++e) group_loads[e / group_size] += loads[e];
  const std::vector<int> fresh = AssignGroups(group_loads, nodes, nullptr);
  ServerSlots scratch = PlanNodes(loads, o, nodes, group_size, fresh, nullptr, 0);
  if (current == nullptr) return scratch;
  const std::vector<double> scratch_loads = ServerLoads(loads, scratch);
  const double max_load =
      *std::max_element(scratch_loads.begin(), scratch_loads.end()) * (1 + o.balance_slack);

  // held[g][i]: slots of group g on node i now.
  std::vector<std::vector<int>> held(num_groups, std::vector<int>(num_nodes, 0));
  for (int i = 0; i < num_nodes; ++i) {
    for (int s = nodes.first[i]; s < nodes.first[i + 1]; ++s) {
      for (int32_t e : (*current)[s]) ++held[e / group_size][i];
    }
  }
  // The fresh assignment's nodes relabelled (among nodes of one size) to
  // where their groups are now.
  std::vector<std::vector<double>> w(num_nodes, std::vector<double>(num_nodes, 0.0));
  for (int i = 0; i < num_nodes; ++i) {
    for (int j = 0; j < num_nodes; ++j) {
      if (nodes.size(i) != nodes.size(j)) {
        w[i][j] = -1e15;
        continue;
      }
      for (int g = 0; g < num_groups; ++g) {
        if (fresh[g] == i) w[i][j] += held[g][j];
      }
    }
  }
  const std::vector<int> perm = MaxAssignment(w);
  std::vector<int> fresh_moved = fresh;
  for (int& n : fresh_moved) n = perm[n];

  // Candidates: C (the fresh plan, nodes and servers relabelled), the fresh
  // assignment planned incrementally inside nodes, and groups staying where
  // most of them are when that assignment is within the slack.
  std::vector<ServerSlots> candidates(1, ServerSlots(o.num_servers));
  for (int i = 0; i < num_nodes; ++i) {
    const int j = perm[i];
    const ServerSlots mine(scratch.begin() + nodes.first[i], scratch.begin() + nodes.first[i + 1]);
    const ServerSlots now(current->begin() + nodes.first[j], current->begin() + nodes.first[j + 1]);
    const ServerSlots relabelled = Relabel(mine, now);
    std::copy(relabelled.begin(), relabelled.end(), candidates[0].begin() + nodes.first[j]);
  }
  candidates.push_back(PlanNodes(loads, o, nodes, group_size, fresh_moved, current, max_load));
  std::vector<int> preferred(num_groups, -1);
  for (int g = 0; g < num_groups; ++g) {
    const auto it = std::max_element(held[g].begin(), held[g].end());
    if (*it > 0) preferred[g] = static_cast<int>(it - held[g].begin());
  }
  const std::vector<int> sticky = AssignGroups(group_loads, nodes, &preferred);
  if (NodeRatio(group_loads, nodes, sticky) <=
      NodeRatio(group_loads, nodes, fresh) * (1 + o.balance_slack) * (1 + 1e-12)) {
    candidates.push_back(PlanNodes(loads, o, nodes, group_size, sticky, current, max_load));
  }
  const double limit = MaxOverMean(scratch_loads) * (1 + o.balance_slack) * (1 + 1e-12);
  int pick = 0;
  int64_t pick_moved = SlotsMoved(*current, candidates[0]);
  double pick_ratio = MaxOverMean(ServerLoads(loads, candidates[0]));
  for (int c = 1; c < static_cast<int>(candidates.size()); ++c) {
    const double ratio = MaxOverMean(ServerLoads(loads, candidates[c]));
    const int64_t moved = SlotsMoved(*current, candidates[c]);
    if (ratio <= limit && (moved < pick_moved || (moved == pick_moved && ratio < pick_ratio))) {
      pick = c, pick_moved = moved, pick_ratio = ratio;
    }
  }
  return candidates[pick];
}

}  // namespace

// ---------------------------------------------------------------------------
// Public API

absl::Status ValidatePlanOptions(int64_t num_experts, const PlanOptions& o) {
  const int64_t n = o.num_servers, s = o.slots_per_server, e = num_experts;
  if (e < 1 || e > kMaxExperts) {
    return absl::InvalidArgumentError(
        absl::StrCat("a layer needs 1 to ", kMaxExperts, " experts, got ", e));
  }
  if (n < 1 || n > kMaxServers) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_servers must be in [1, ", kMaxServers, "], got ", n));
  }
  if (n * e > kMaxServerExperts) {
    return absl::InvalidArgumentError(absl::StrCat("num_servers ", n, " x ", e, " experts exceeds ",
                                                   kMaxServerExperts, " (too large to plan)"));
  }
  if (s < 1)
    return absl::InvalidArgumentError(absl::StrCat("slots_per_server must be >= 1, got ", s));
  if (s > e) {
    return absl::InvalidArgumentError(
        absl::StrCat("slots_per_server ", s, " exceeds the ", e,
                     " experts of the layer (a server holds an expert at most once)"));
  }
  if (n * s < e) {
    return absl::InvalidArgumentError(absl::StrCat("num_servers ", n, " x slots_per_server ", s,
                                                   " = ", n * s, " slots < ", e,
                                                   " experts (every expert needs a slot)"));
  }
  if (o.expert_bytes < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("expert_bytes must be >= 1, got ", o.expert_bytes));
  }
  if (o.server_bytes < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("server_bytes must be >= 0, got ", o.server_bytes));
  }
  if (o.server_bytes > 0 && SlotsForBudget(o.server_bytes, o.expert_bytes) < s) {
    return absl::InvalidArgumentError(absl::StrCat("slots_per_server ", s, " x expert_bytes ",
                                                   o.expert_bytes, " exceeds server_bytes ",
                                                   o.server_bytes));
  }
  if (!std::isfinite(o.balance_slack) || o.balance_slack < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("balance_slack must be finite and >= 0, got ", o.balance_slack));
  }
  if (o.num_groups == 0 && o.num_nodes == 0) return absl::OkStatus();
  if (o.num_groups < 1 || o.num_nodes < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_groups and num_nodes go together and must be >= 1, got ", o.num_groups,
                     " and ", o.num_nodes));
  }
  if (e % o.num_groups != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "num_groups ", o.num_groups, " does not divide the ", e, " experts of the layer"));
  }
  if (o.num_nodes > n) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_nodes ", o.num_nodes, " exceeds num_servers ", n));
  }
  const int group_size = static_cast<int>(e / o.num_groups);
  const Nodes nodes = MakeNodes(o.num_servers, o.num_nodes, o.slots_per_server, group_size);
  int lo = 0, hi = 0;
  for (int i = 0; i < o.num_nodes; ++i) {
    if (nodes.hi[i] < nodes.lo[i]) {
      return absl::InvalidArgumentError(absl::StrCat(
          "node ", i, " (", nodes.size(i), " servers x ", s, " slots) cannot hold whole groups of ",
          group_size, " experts: it needs at least ", nodes.lo[i], " group(s) for ", s,
          " distinct experts per server but has slots for ", nodes.hi[i]));
    }
    lo += nodes.lo[i];
    hi += nodes.hi[i];
  }
  if (o.num_groups < lo || o.num_groups > hi) {
    return absl::InvalidArgumentError(absl::StrCat(
        "num_groups ", o.num_groups, " of ", group_size, " experts do not fit num_nodes ",
        o.num_nodes, ": the nodes hold ", lo, " to ", hi, " groups in all (each server needs ", s,
        " distinct experts of its node's groups; every expert needs a slot)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<LayerPlan> PlanLayer(std::span<const double> loads, const PlanOptions& o,
                                    const ServerSlots* current) {
  const int64_t num_experts = static_cast<int64_t>(loads.size());
  DMOE_RETURN_IF_ERROR(ValidatePlanOptions(num_experts, o));
  for (int64_t e = 0; e < num_experts; ++e) {
    if (!std::isfinite(loads[e]) || loads[e] < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("load of expert ", e, " is ", loads[e], "; loads must be finite and >= 0"));
    }
  }
  ServerSlots cur;
  if (current != nullptr) {
    cur.assign(o.num_servers, {});
    std::vector<uint8_t> seen(num_experts, 0);
    for (size_t s = 0; s < current->size(); ++s) {
      std::fill(seen.begin(), seen.end(), 0);
      for (int32_t e : (*current)[s]) {
        if (e < 0 || e >= num_experts) {
          return absl::InvalidArgumentError(absl::StrCat("current placement: server ", s,
                                                         ": expert id ", e, " out of range [0, ",
                                                         num_experts, ")"));
        }
        if (seen[e]++) {
          return absl::InvalidArgumentError(
              absl::StrCat("current placement: server ", s, " holds expert ", e, " twice"));
        }
        if (s < cur.size()) cur[s].push_back(e);
      }
    }
  }
  LayerPlan plan;
  const ServerSlots* cur_ptr = current != nullptr ? &cur : nullptr;
  plan.servers = o.num_groups > 0
                     ? PlanHierarchical(loads, o, cur_ptr)
                     : PlanFlat(loads, o.num_servers, o.slots_per_server, cur_ptr, o.balance_slack);
  for (auto& v : plan.servers) std::sort(v.begin(), v.end());
  plan.max_over_mean = MaxOverMean(ServerLoads(loads, plan.servers));
  plan.slots_moved = current != nullptr ? SlotsMoved(cur, plan.servers)
                                        : static_cast<int64_t>(o.num_servers) * o.slots_per_server;
  plan.bytes_moved = plan.slots_moved * o.expert_bytes;
  return plan;
}

std::vector<double> ServerLoads(std::span<const double> loads, const ServerSlots& servers) {
  std::vector<int> count(loads.size(), 0);
  for (const auto& v : servers) {
    for (int32_t e : v) ++count[e];
  }
  std::vector<double> out(servers.size(), 0.0);
  for (size_t s = 0; s < servers.size(); ++s) {
    for (int32_t e : servers[s]) out[s] += loads[e] / count[e];
  }
  return out;
}

double MaxOverMean(std::span<const double> server_loads) {
  if (server_loads.empty()) return 1.0;
  const double mean = Sum(server_loads) / server_loads.size();
  if (mean <= 0) return 1.0;
  return *std::max_element(server_loads.begin(), server_loads.end()) / mean;
}

int64_t SlotsMoved(const ServerSlots& from, const ServerSlots& to) {
  int64_t moved = 0;
  for (size_t s = 0; s < to.size(); ++s) {
    for (int32_t e : to[s]) {
      if (s >= from.size() || std::find(from[s].begin(), from[s].end(), e) == from[s].end())
        ++moved;
    }
  }
  return moved;
}

int64_t SlotsForBudget(int64_t server_bytes, int64_t expert_bytes) {
  return expert_bytes > 0 ? server_bytes / expert_bytes : 0;
}

}  // namespace dmoe::place
