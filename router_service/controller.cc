#include "router_service/controller.h"

#include <algorithm>
#include <cstdio>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/grpc_status.h"
#include "core/status.h"
#include "grpcpp/grpcpp.h"
#include "placement/planner.h"

namespace dmoe::router {
namespace {

// Runs fn(i) for i in [0, n) on n threads; returns their statuses.
std::vector<absl::Status> ParallelFor(int n, const std::function<absl::Status(int)>& fn) {
  std::vector<absl::Status> out(n);
  std::vector<std::thread> threads;
  threads.reserve(n);
  for (int i = 0; i < n; ++i) threads.emplace_back([&, i] { out[i] = fn(i); });
  for (auto& t : threads) t.join();
  return out;
}

void AddSlots(google::protobuf::RepeatedPtrField<v1::LayerSlots>* out, int64_t layer,
              const std::vector<int32_t>& experts) {
  if (experts.empty()) return;
  v1::LayerSlots* ls = out->Add();
  ls->set_layer(static_cast<uint32_t>(layer));
  for (int32_t e : experts) ls->add_experts(e);
}

std::vector<int32_t> Minus(const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
  std::vector<int32_t> out;
  for (int32_t e : a) {
    if (std::find(b.begin(), b.end(), e) == b.end()) out.push_back(e);
  }
  return out;
}

// The routed experts server `status` says it holds in `layer`.
std::vector<int32_t> Reported(const v1::ServerStatusResponse& status, int64_t layer) {
  std::vector<int32_t> out;
  for (const v1::LayerSlots& ls : status.slots()) {
    if (static_cast<int64_t>(ls.layer()) == layer)
      out.insert(out.end(), ls.experts().begin(), ls.experts().end());
  }
  return out;
}

// How many of the slots `placement` gives server `s` it does not hold by its
// `status`: > 0 for a server restarted at its address (it holds nothing until
// the controller loads its slots again).
int64_t MissingSlots(const core::ModelConfig& cfg, const place::Placement& placement, int s,
                     const v1::ServerStatusResponse& status) {
  if (s >= placement.num_servers()) return 0;
  int64_t missing = 0;
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    if (!cfg.IsMoeLayer(l)) continue;
    missing += static_cast<int64_t>(Minus(placement.Slots(l, s), Reported(status, l)).size());
  }
  return missing;
}

}  // namespace

int DefaultSlotsPerServer(int64_t num_experts, int num_servers, int initial_max) {
  const int64_t e = std::max<int64_t>(num_experts, 1);
  const int64_t leave_tolerant = num_servers <= 1 ? e : (e + num_servers - 2) / (num_servers - 1);
  return static_cast<int>(std::min<int64_t>(e, std::max<int64_t>(leave_tolerant, initial_max)));
}

std::string LeaveRefusal(const core::ModelConfig& cfg, const place::Placement& placement,
                         const std::vector<bool>& active, int server, int slots) {
  int others = 0;
  for (int s = 0; s < static_cast<int>(active.size()); ++s) others += active[s] && s != server;
  const int64_t E = cfg.n_routed_experts;
  if (static_cast<int64_t>(others) * slots >= E) return "";
  int64_t sole = 0;
  std::vector<std::string> named;
  if (server < placement.num_servers()) {
    for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
      if (!cfg.IsMoeLayer(l)) continue;
      for (int32_t e : placement.Slots(l, server)) {
        bool elsewhere = false;
        for (int32_t r : placement.Replicas(l, e)) {
          elsewhere |= r != server && r < static_cast<int>(active.size()) && active[r];
        }
        if (elsewhere) continue;
        if (++sole <= 4) named.push_back(absl::StrCat("layer ", l, " expert ", e));
      }
    }
  }
  return absl::StrCat(others, " other active expert servers x ", slots, " slots cannot hold ", E,
                      " experts per layer; this server holds the only copy of ", sole, " experts (",
                      absl::StrJoin(named, ", "), sole > 4 ? ", ..." : "",
                      "): add an expert server or raise the router's --slots-per-server");
}

absl::StatusOr<std::unique_ptr<PlacementController>> PlacementController::Create(
    const core::ModelConfig& cfg, LoadWindow* window, RemoteExpertControl* experts,
    ControllerOptions o) {
  if (window == nullptr || experts == nullptr) {
    return absl::InvalidArgumentError("controller: needs a load window and remote experts");
  }
  if (!(o.trigger > 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("controller: trigger must be > 1 (a max/mean), got ", o.trigger));
  }
  if (o.hysteresis < 0 || o.hysteresis >= o.trigger - 1.0) {
    return absl::InvalidArgumentError(
        absl::StrCat("controller: hysteresis must be in [0, trigger - 1), got ", o.hysteresis));
  }
  if (o.min_gain < 0 || o.min_tokens < 0 || o.balance_slack < 0) {
    return absl::InvalidArgumentError(
        "controller: min_gain, min_tokens and balance_slack must be >= 0");
  }
  if (o.sustain < absl::ZeroDuration() || o.min_interval < absl::ZeroDuration() ||
      o.check_interval <= absl::ZeroDuration() || o.lost_after <= absl::ZeroDuration() ||
      o.load_deadline <= absl::ZeroDuration() || o.rpc_deadline <= absl::ZeroDuration() ||
      o.switch_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("controller: durations must be positive");
  }
  const place::Placement p = experts->placement();
  int initial_max = 0, holding = 0;
  for (int s = 0; s < p.num_servers(); ++s) {
    bool holds = false;
    for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
      initial_max = std::max(initial_max, static_cast<int>(p.Slots(l, s).size()));
      holds |= !p.Slots(l, s).empty();
    }
    holding += holds;
  }
  int slots = o.slots_per_server;
  if (slots == 0) slots = DefaultSlotsPerServer(cfg.n_routed_experts, holding, initial_max);
  if (slots < 1 || slots > cfg.n_routed_experts) {
    return absl::InvalidArgumentError(absl::StrCat("controller: slots_per_server must be in [1, ",
                                                   cfg.n_routed_experts, "], got ", slots));
  }
  if (static_cast<int64_t>(slots) * p.num_servers() < cfg.n_routed_experts) {
    return absl::InvalidArgumentError(absl::StrCat("controller: ", p.num_servers(), " servers x ",
                                                   slots, " slots cannot hold ",
                                                   cfg.n_routed_experts, " experts per layer"));
  }
  if ((o.num_groups > 0) != (o.num_nodes > 0)) {
    return absl::InvalidArgumentError("controller: groups and nodes go together");
  }
  if (holding > 1 && static_cast<int64_t>(slots) * (holding - 1) < cfg.n_routed_experts) {
    std::fprintf(stderr,
                 "dmoe-router: controller: warning: %d slots per server: %d expert servers "
                 "cannot hold %lld experts per layer, so a leave (scale-in, eviction) is refused "
                 "until a server joins (%d slots would allow one)\n",
                 slots, holding - 1, static_cast<long long>(cfg.n_routed_experts),
                 DefaultSlotsPerServer(cfg.n_routed_experts, holding, 0));
  }
  return std::unique_ptr<PlacementController>(
      new PlacementController(cfg, window, experts, o, slots));
}

PlacementController::PlacementController(const core::ModelConfig& cfg, LoadWindow* window,
                                         RemoteExpertControl* experts, ControllerOptions options,
                                         int slots)
    : cfg_(cfg),
      window_(window),
      experts_(experts),
      options_(options),
      slots_per_server_(slots),
      expert_bytes_(3 * cfg.hidden_size * cfg.moe_intermediate_size * 2) {
  const place::Placement p = experts_->placement();
  next_version_ = p.version() + 1;
  const std::vector<std::string> addresses = experts_->servers();
  for (int s = 0; s < static_cast<int>(addresses.size()); ++s) {
    ServerState st;
    st.address = addresses[s];
    st.active = false;
    for (int64_t l = 0; l < cfg_.num_hidden_layers; ++l) st.active |= !p.Slots(l, s).empty();
    servers_.push_back(st);
  }
}

PlacementController::~PlacementController() { Stop(); }

void PlacementController::Start() {
  if (thread_.joinable()) return;
  thread_ = std::thread([this] { Loop(); });
}

void PlacementController::Stop() {
  if (!stop_.HasBeenNotified()) stop_.Notify();
  if (thread_.joinable()) thread_.join();
}

void PlacementController::set_on_replacement(std::function<void(const v1::RebalanceResponse&)> f) {
  absl::MutexLock lock(&mu_);
  on_replacement_ = std::move(f);
}

std::vector<PlacementController::ServerState> PlacementController::Servers() const {
  absl::MutexLock lock(&mu_);
  return servers_;
}

v1::ExpertService::Stub* PlacementController::Stub(const std::string& address) {
  absl::MutexLock lock(&mu_);
  auto& stub = stubs_[address];
  if (!stub) {
    stub = v1::ExpertService::NewStub(
        grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  }
  return stub.get();
}

void PlacementController::Loop() {
  while (!stop_.WaitForNotificationWithTimeout(options_.check_interval)) {
    PollServers();
    CheckImbalance(absl::Now());
  }
}

void PlacementController::set_on_leave_refused(std::function<void(const std::string&)> f) {
  absl::MutexLock lock(&mu_);
  on_leave_refused_ = std::move(f);
}

void PlacementController::PollServers() {
  const std::vector<ServerState> servers = Servers();
  const int n = static_cast<int>(servers.size());
  std::vector<v1::ServerStatusResponse> status(n);
  std::vector<absl::Status> st = ParallelFor(n, [&](int i) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(2)));
    v1::ServerStatusRequest req;
    // The reply to a leaving server whose leave is refused: it stays.
    if (servers[i].leaving) req.set_leave_refused(servers[i].leave_refused);
    return common::FromGrpc(Stub(servers[i].address)->GetStatus(&ctx, req, &status[i]),
                            servers[i].address);
  });
  const absl::Time now = absl::Now();
  const place::Placement cur = experts_->placement();
  // address, trigger: a removal, or (server-restarted) slots to load again
  std::vector<std::pair<std::string, std::string>> remove;
  {
    absl::MutexLock lock(&mu_);
    for (int i = 0; i < n && i < static_cast<int>(servers_.size()); ++i) {
      ServerState& s = servers_[i];
      if (!s.active || (st[i].ok() && !status[i].leaving())) s.remove_error.clear();
      if (st[i].ok()) {
        s.last_seen = now;
        s.first_failure = absl::InfiniteFuture();
        s.leaving = status[i].leaving();
        if (!s.leaving || !s.active) s.leave_refused.clear();
        if (s.active && s.leaving) remove.emplace_back(s.address, "server-leaving");
        if (s.active && !s.leaving && MissingSlots(cfg_, cur, i, status[i]) > 0) {
          remove.emplace_back(s.address, "server-restarted");
        }
      } else {
        s.first_failure = std::min(s.first_failure, now);
        if (s.active && now - s.first_failure >= options_.lost_after) {
          remove.emplace_back(s.address, "server-lost");
        }
      }
    }
  }
  for (const auto& [address, trigger] : remove) {
    if (trigger == "server-leaving" && RefuseLeave(address)) continue;
    absl::StatusOr<v1::RebalanceResponse> r =
        trigger == "server-restarted" ? ReloadServer(address) : RemoveServer(address, trigger);
    if (r.ok()) continue;
    // Retried every poll: log when the reason changes, not once a second.
    const std::string why = absl::StrCat(trigger, ": ", r.status().message());
    bool changed = false;
    {
      absl::MutexLock lock(&mu_);
      for (ServerState& s : servers_) {
        if (s.address != address || s.remove_error == why) continue;
        s.remove_error = why;
        changed = true;
      }
    }
    if (changed) {
      std::fprintf(stderr,
                   "dmoe-router: controller: could not move the slots of %s (%s); retrying every "
                   "poll\n",
                   address.c_str(), why.c_str());
    }
  }
}

bool PlacementController::RefuseLeave(const std::string& address) {
  std::function<void(const std::string&)> cb;
  const place::Placement placement = experts_->placement();
  {
    // Against the servers as they are now: an earlier leave of this poll
    // round may have made a server inactive.
    absl::MutexLock lock(&mu_);
    std::vector<bool> active;
    int server = -1;
    for (int s = 0; s < static_cast<int>(servers_.size()); ++s) {
      active.push_back(servers_[s].active);
      if (servers_[s].address == address) server = s;
    }
    if (server < 0) return false;
    const std::string why = LeaveRefusal(cfg_, placement, active, server, slots_per_server_);
    ServerState& s = servers_[server];
    if (why.empty()) {
      s.leave_refused.clear();
      return false;
    }
    if (!s.leave_refused.empty()) return true;  // told and counted already
    s.leave_refused = why;
    std::fprintf(stderr,
                 "dmoe-router: controller: refusing the leave of expert server %d (%s): %s; it "
                 "keeps its slots and serves, and leaves once they can move\n",
                 server, address.c_str(), why.c_str());
    cb = on_leave_refused_;
  }
  if (cb) cb(address);
  return true;
}

void PlacementController::CheckImbalance(absl::Time now) {
  if (!options_.auto_rebalance) return;
  const place::Placement p = experts_->placement();
  const LoadSnapshot snap = window_->Get(now);
  double worst = 0;
  for (int64_t l = 0; l < cfg_.num_hidden_layers; ++l) {
    if (!cfg_.IsMoeLayer(l) || snap.tokens[l] < std::max(options_.min_tokens, 1.0)) continue;
    worst =
        std::max(worst, ComputeBalance(snap, l, cfg_.num_experts_per_tok, p).server_max_over_mean);
  }
  {
    absl::MutexLock lock(&mu_);
    if (worst > options_.trigger) {
      if (armed_since_ == absl::InfiniteFuture()) armed_since_ = now;
    } else if (worst < options_.trigger - options_.hysteresis) {
      armed_since_ = absl::InfiniteFuture();
    }
    if (armed_since_ == absl::InfiniteFuture() || now - armed_since_ < options_.sustain ||
        now - last_replacement_ < options_.min_interval) {
      return;
    }
  }
  absl::MutexLock op(&op_mu_);
  absl::StatusOr<Plan> plan = MakePlan(Servers(), "imbalance");
  if (!plan.ok()) {
    std::fprintf(stderr, "dmoe-router: controller: planning failed: %s\n",
                 std::string(plan.status().message()).c_str());
    absl::MutexLock lock(&mu_);
    last_replacement_ = now;  // retry after min_interval
    return;
  }
  double cur = 0, pred = 0;
  const v1::RebalanceResponse& r = plan->report;
  for (int i = 0; i < r.layers_size(); ++i) {
    if (snap.tokens[r.layers(i)] < std::max(options_.min_tokens, 1.0)) continue;
    cur = std::max(cur, r.current_max_over_mean(i));
    pred = std::max(pred, r.predicted_max_over_mean(i));
  }
  if (pred > cur - options_.min_gain) {
    std::fprintf(stderr,
                 "dmoe-router: controller: imbalance %.3f but the best plan reaches %.3f; "
                 "not re-placing\n",
                 cur, pred);
    absl::MutexLock lock(&mu_);
    last_replacement_ = now;
    return;
  }
  absl::Status st = Apply(*plan);
  if (!st.ok()) {
    std::fprintf(stderr, "dmoe-router: controller: re-placement failed: %s\n",
                 std::string(st.message()).c_str());
    absl::MutexLock lock(&mu_);
    last_replacement_ = now;
  }
}

absl::StatusOr<PlacementController::Plan> PlacementController::MakePlan(
    const std::vector<ServerState>& servers, const std::string& trigger) {
  const place::Placement cur = experts_->placement();
  std::vector<int> active;
  for (int s = 0; s < static_cast<int>(servers.size()); ++s) {
    if (servers[s].active) active.push_back(s);
  }
  const int64_t E = cfg_.n_routed_experts;
  if (static_cast<int64_t>(active.size()) * slots_per_server_ < E) {
    return absl::FailedPreconditionError(absl::StrCat(active.size(), " active expert servers x ",
                                                      slots_per_server_, " slots cannot hold ", E,
                                                      " experts per layer"));
  }
  const LoadSnapshot snap = window_->Get(absl::Now());
  place::PlanOptions po;
  po.num_servers = static_cast<int>(active.size());
  po.slots_per_server = slots_per_server_;
  po.expert_bytes = expert_bytes_;
  po.num_groups = options_.num_groups;
  po.num_nodes = options_.num_nodes;
  po.balance_slack = options_.balance_slack;

  Plan plan;
  plan.report.set_trigger(trigger);
  uint64_t version = next_version_;
  plan.report.set_version(version);
  nlohmann::json layers = nlohmann::json::array();
  int64_t moved = 0;
  for (int64_t l = 0; l < cfg_.num_hidden_layers; ++l) {
    if (!cfg_.IsMoeLayer(l)) continue;
    std::vector<double> loads(E, 1.0);  // uniform without enough data
    if (snap.tokens[l] >= std::max(options_.min_tokens, 1.0)) {
      for (int64_t e = 0; e < E; ++e) loads[e] = snap.Assignments(l, e);
    }
    place::ServerSlots current;
    for (int s : active) {
      current.push_back(s < cur.num_servers() ? cur.Slots(l, s) : std::vector<int32_t>{});
    }
    DMOE_ASSIGN_OR_RETURN(place::LayerPlan lp, place::PlanLayer(loads, po, &current));
    place::ServerSlots all(servers.size());
    for (size_t k = 0; k < active.size(); ++k) all[active[k]] = lp.servers[k];
    // Moves against what each server holds now (a re-activated server may
    // still hold nothing).
    for (size_t s = 0; s < servers.size(); ++s) {
      const std::vector<int32_t> none;
      const auto& held = static_cast<int>(s) < cur.num_servers() ? cur.Slots(l, s) : none;
      moved += static_cast<int64_t>(Minus(all[s], held).size());
    }
    place::ServerSlots now_slots;
    for (int s = 0; s < cur.num_servers(); ++s) {
      if (!cur.Slots(l, s).empty()) now_slots.push_back(cur.Slots(l, s));
    }
    plan.report.add_layers(static_cast<uint32_t>(l));
    plan.report.add_current_max_over_mean(place::MaxOverMean(place::ServerLoads(loads, now_slots)));
    plan.report.add_predicted_max_over_mean(lp.max_over_mean);
    layers.push_back({{"layer", l}, {"servers", all}});
  }
  nlohmann::json j = {{"version", version}, {"num_servers", servers.size()}, {"layers", layers}};
  DMOE_ASSIGN_OR_RETURN(plan.placement, place::Placement::FromJson(j, cfg_));
  for (const ServerState& s : servers) plan.servers.push_back(s.address);
  plan.report.set_placement_json(j.dump());
  plan.report.set_slots_moved(static_cast<uint64_t>(moved));
  plan.report.set_bytes_moved(static_cast<uint64_t>(moved * expert_bytes_));
  return plan;
}

absl::Status PlacementController::Apply(Plan& plan) {
  const place::Placement cur = experts_->placement();
  const place::Placement& next = plan.placement;
  const int n = static_cast<int>(plan.servers.size());
  const absl::Time start = absl::Now();

  // A server may already be at a newer version (an earlier attempt that did
  // not switch, or a restarted controller): V' must not be older.
  std::vector<v1::ServerStatusResponse> status(n);
  std::vector<absl::Status> st = ParallelFor(n, [&](int s) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + options_.rpc_deadline));
    return common::FromGrpc(
        Stub(plan.servers[s])->GetStatus(&ctx, v1::ServerStatusRequest(), &status[s]),
        plan.servers[s]);
  });
  uint64_t version = plan.placement.version();
  for (int s = 0; s < n; ++s) {
    if (st[s].ok()) version = std::max<uint64_t>(version, status[s].placement_version());
  }
  if (version != plan.placement.version()) {
    nlohmann::json j = nlohmann::json::parse(plan.report.placement_json());
    j["version"] = version;
    DMOE_ASSIGN_OR_RETURN(plan.placement, place::Placement::FromJson(j, cfg_));
    plan.report.set_placement_json(j.dump());
    plan.report.set_version(version);
  }
  auto has_slots = [&](int s) {
    for (int64_t l = 0; l < cfg_.num_hidden_layers; ++l) {
      if (!next.Slots(l, s).empty()) return true;
    }
    return false;
  };

  // 1. Load: every server starts serving V' (with the slots it gains against
  // what it says it holds: a server restarted at its address holds nothing).
  const std::vector<absl::Status> status_st = st;
  st = ParallelFor(n, [&](int s) {
    v1::LoadSlotsRequest req;
    req.set_placement_version(version);
    for (int64_t l = 0; l < cfg_.num_hidden_layers; ++l) {
      if (!cfg_.IsMoeLayer(l)) continue;
      const std::vector<int32_t> none;
      const std::vector<int32_t> held = status_st[s].ok()       ? Reported(status[s], l)
                                        : s < cur.num_servers() ? cur.Slots(l, s)
                                                                : none;
      AddSlots(req.mutable_slots(), l, Minus(next.Slots(l, s), held));
    }
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + options_.load_deadline));
    v1::SlotsResponse resp;
    return common::FromGrpc(
        Stub(plan.servers[s])->LoadSlots(&ctx, req, &resp),
        absl::StrCat("expert server ", s, " (", plan.servers[s], "): load slots"));
  });
  for (int s = 0; s < n; ++s) {
    if (!st[s].ok() && has_slots(s)) return st[s];
  }

  // 2. Switch the routers between two steps: the followers, then this one.
  std::vector<std::pair<std::string, v1::RouterService::Stub*>> peers;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [address, seen] : peers_) {
      auto& stub = peer_stubs_[address];
      if (!stub) {
        stub = v1::RouterService::NewStub(
            grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
      }
      peers.emplace_back(address, stub.get());
    }
  }
  v1::SetPlacementRequest push;
  push.set_version(version);
  push.set_placement_json(plan.placement.ToJson().dump());
  for (const std::string& a : plan.servers) push.add_server_addresses(a);
  std::vector<absl::Status> pushed = ParallelFor(static_cast<int>(peers.size()), [&](int i) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + options_.switch_timeout + absl::Seconds(5)));
    v1::PlacementResponse resp;
    return common::FromGrpc(peers[i].second->SetPlacement(&ctx, push, &resp),
                            absl::StrCat("router ", peers[i].first, ": set placement"));
  });
  for (size_t i = 0; i < peers.size(); ++i) {
    if (pushed[i].ok()) continue;
    absl::MutexLock lock(&mu_);
    auto it = peers_.find(peers[i].first);
    if (pushed[i].code() == absl::StatusCode::kUnavailable && it != peers_.end() &&
        absl::Now() - it->second > options_.peer_timeout) {
      std::fprintf(stderr, "dmoe-router: controller: dropping follower %s (%s)\n",
                   peers[i].first.c_str(), std::string(pushed[i].message()).c_str());
      peers_.erase(it);
      continue;
    }
    return pushed[i];
  }
  DMOE_RETURN_IF_ERROR(
      experts_->SwitchPlacement(plan.placement, plan.servers, options_.switch_timeout));
  const absl::Duration switch_time = absl::Now() - start;
  next_version_ = version + 1;

  // 3. Unload what V' does not use (after the requests queued before it).
  std::vector<absl::Status> unloaded = ParallelFor(n, [&](int s) {
    v1::ServerStatusResponse now;
    {
      grpc::ClientContext ctx;
      ctx.set_deadline(absl::ToChronoTime(absl::Now() + options_.rpc_deadline));
      DMOE_RETURN_IF_ERROR(
          common::FromGrpc(Stub(plan.servers[s])->GetStatus(&ctx, v1::ServerStatusRequest(), &now),
                           plan.servers[s]));
    }
    if (now.placement_version() != version) return absl::OkStatus();
    v1::UnloadSlotsRequest req;
    req.set_placement_version(version);
    for (const v1::LayerSlots& ls : now.slots()) {
      std::vector<int32_t> held(ls.experts().begin(), ls.experts().end());
      AddSlots(req.mutable_slots(), ls.layer(), Minus(held, next.Slots(ls.layer(), s)));
    }
    if (req.slots().empty()) return absl::OkStatus();
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + options_.load_deadline));
    v1::SlotsResponse resp;
    return common::FromGrpc(
        Stub(plan.servers[s])->UnloadSlots(&ctx, req, &resp),
        absl::StrCat("expert server ", s, " (", plan.servers[s], "): unload slots"));
  });
  for (int s = 0; s < n; ++s) {
    if (!unloaded[s].ok() && has_slots(s)) {
      std::fprintf(stderr, "dmoe-router: controller: %s\n",
                   std::string(unloaded[s].message()).c_str());
    }
  }
  plan.report.set_applied(true);
  plan.report.set_switch_seconds(absl::ToDoubleSeconds(switch_time));
  std::string cur_s, pred_s;
  for (int i = 0; i < plan.report.layers_size(); ++i) {
    absl::StrAppend(&cur_s, i ? "," : "", absl::SixDigits(plan.report.current_max_over_mean(i)));
    absl::StrAppend(&pred_s, i ? "," : "", absl::SixDigits(plan.report.predicted_max_over_mean(i)));
  }
  std::fprintf(stderr,
               "dmoe-router: controller: placement version %llu applied (%s): %llu slots "
               "(%llu bytes) moved, switch after %.3f s; max/mean per layer %s -> %s\n",
               static_cast<unsigned long long>(version), plan.report.trigger().c_str(),
               static_cast<unsigned long long>(plan.report.slots_moved()),
               static_cast<unsigned long long>(plan.report.bytes_moved()),
               absl::ToDoubleSeconds(switch_time), cur_s.c_str(), pred_s.c_str());
  std::function<void(const v1::RebalanceResponse&)> cb;
  {
    absl::MutexLock lock(&mu_);
    last_replacement_ = absl::Now();
    armed_since_ = absl::InfiniteFuture();
    cb = on_replacement_;
  }
  if (cb) cb(plan.report);
  return absl::OkStatus();
}

absl::StatusOr<v1::RebalanceResponse> PlacementController::PlanAndApply(
    std::vector<ServerState> servers, const std::string& trigger, bool dry_run) {
  DMOE_ASSIGN_OR_RETURN(Plan plan, MakePlan(servers, trigger));
  if (dry_run) return plan.report;
  DMOE_RETURN_IF_ERROR(Apply(plan));
  {
    absl::MutexLock lock(&mu_);
    for (size_t s = 0; s < servers.size(); ++s) {
      if (s < servers_.size()) {
        servers_[s].active = servers[s].active;
      } else {
        servers_.push_back(servers[s]);
      }
    }
  }
  return plan.report;
}

absl::StatusOr<v1::RebalanceResponse> PlacementController::Rebalance(bool dry_run,
                                                                     const std::string& trigger) {
  absl::MutexLock op(&op_mu_);
  return PlanAndApply(Servers(), trigger, dry_run);
}

absl::StatusOr<v1::RebalanceResponse> PlacementController::AddServer(const std::string& address) {
  if (address.empty() || address.find(':') == std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("expert server address '", address, "' is not HOST:PORT"));
  }
  absl::MutexLock op(&op_mu_);
  std::vector<ServerState> servers = Servers();
  auto it = std::find_if(servers.begin(), servers.end(),
                         [&](const ServerState& s) { return s.address == address; });
  if (servers.size() >= static_cast<size_t>(kMaxExpertServers) && it == servers.end()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("at most ", kMaxExpertServers, " expert servers"));
  }
  v1::ServerStatusResponse status;
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + options_.rpc_deadline));
    DMOE_RETURN_IF_ERROR(
        common::FromGrpc(Stub(address)->GetStatus(&ctx, v1::ServerStatusRequest(), &status),
                         absl::StrCat("expert server ", address)));
    if (status.model() != "" && status.leaving()) {
      return absl::FailedPreconditionError(absl::StrCat("expert server ", address, " is leaving"));
    }
  }
  if (it != servers.end() && it->active) {
    const int index = static_cast<int>(it - servers.begin());
    // Restarted at its address (a Kubernetes pod restarted under its name)
    // before it was found lost: it joins again holding nothing.
    if (MissingSlots(cfg_, experts_->placement(), index, status) > 0) {
      return ReloadLocked(std::move(servers), address);
    }
    return absl::AlreadyExistsError(
        absl::StrCat("expert server ", index, " (", address, ") already holds slots"));
  }
  if (it != servers.end()) {
    it->active = true;
    it->leaving = false;
  } else {
    ServerState s;
    s.address = address;
    servers.push_back(s);
  }
  return PlanAndApply(std::move(servers), "server-joined", false);
}

absl::StatusOr<v1::RebalanceResponse> PlacementController::ReloadServer(
    const std::string& address) {
  absl::MutexLock op(&op_mu_);
  return ReloadLocked(Servers(), address);
}

absl::StatusOr<v1::RebalanceResponse> PlacementController::ReloadLocked(
    std::vector<ServerState> servers, const std::string& address) {
  std::fprintf(stderr,
               "dmoe-router: controller: expert server %s is missing slots of its placement "
               "(restarted at its address?): loading them again\n",
               address.c_str());
  return PlanAndApply(std::move(servers), "server-restarted", false);
}

absl::StatusOr<v1::RebalanceResponse> PlacementController::RemoveServer(
    const std::string& address, const std::string& trigger) {
  absl::MutexLock op(&op_mu_);
  std::vector<ServerState> servers = Servers();
  auto it = std::find_if(servers.begin(), servers.end(),
                         [&](const ServerState& s) { return s.address == address; });
  if (it == servers.end()) {
    return absl::NotFoundError(absl::StrCat("no expert server ", address));
  }
  if (!it->active) {
    return absl::FailedPreconditionError(
        absl::StrCat("expert server ", it - servers.begin(), " (", address, ") holds no slots"));
  }
  it->active = false;
  return PlanAndApply(std::move(servers), trigger, false);
}

v1::PlacementResponse PlacementController::GetPlacement() const {
  v1::PlacementResponse r;
  const place::Placement p = experts_->placement();
  r.set_version(p.version());
  r.set_placement_json(p.ToJson().dump());
  for (const std::string& a : experts_->servers()) r.add_server_addresses(a);
  r.set_controller_enabled(true);
  return r;
}

v1::PlacementResponse PlacementController::RegisterRouter(const std::string& address) {
  {
    absl::MutexLock lock(&mu_);
    if (peers_.emplace(address, absl::Now()).second) {
      std::fprintf(stderr, "dmoe-router: controller: router %s follows this one\n",
                   address.c_str());
    } else {
      peers_[address] = absl::Now();
    }
  }
  return GetPlacement();
}

v1::ExpertLoadResponse PlacementController::GetExpertLoad() const {
  v1::ExpertLoadResponse r;
  const place::Placement p = experts_->placement();
  const LoadSnapshot snap = window_->Get(absl::Now());
  r.set_placement_version(p.version());
  r.set_window_seconds(absl::ToDoubleSeconds(window_->options().window));
  for (const std::string& a : experts_->servers()) r.add_server_addresses(a);
  for (int64_t l = 0; l < cfg_.num_hidden_layers; ++l) {
    if (!cfg_.IsMoeLayer(l)) continue;
    v1::LayerLoad* ll = r.add_layers();
    ll->set_layer(static_cast<uint32_t>(l));
    ll->set_tokens(snap.tokens[l]);
    std::vector<double> loads(cfg_.n_routed_experts);
    for (int64_t e = 0; e < cfg_.n_routed_experts; ++e) {
      loads[e] = snap.Assignments(l, e);
      ll->add_expert_load(loads[e]);
    }
    place::ServerSlots slots;
    for (int s = 0; s < p.num_servers(); ++s) slots.push_back(p.Slots(l, s));
    for (double x : place::ServerLoads(loads, slots)) ll->add_server_load(x);
    const LayerBalance b = ComputeBalance(snap, l, cfg_.num_experts_per_tok, p);
    ll->set_server_max_over_mean(b.server_max_over_mean);
    ll->set_slot_max_over_mean(b.slot_max_over_mean);
    ll->set_expert_balance_stat(b.expert_stat);
    ll->set_server_balance_stat(b.server_stat);
  }
  return r;
}

}  // namespace dmoe::router
