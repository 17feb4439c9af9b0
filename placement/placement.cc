#include "placement/placement.h"

#include <algorithm>
#include <fstream>
#include <limits>
#include <set>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "core/status.h"

namespace dmoe::place {
namespace {
const std::vector<int32_t> kEmpty;
}  // namespace

absl::StatusOr<Placement> Placement::Contiguous(const core::ModelConfig& cfg, int num_servers,
                                                uint64_t version) {
  if (num_servers < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("placement: need at least one server, got ", num_servers));
  }
  if (cfg.n_routed_experts > 0 && num_servers > cfg.n_routed_experts) {
    return absl::InvalidArgumentError(absl::StrCat("placement: ", num_servers, " servers but only ",
                                                   cfg.n_routed_experts, " experts per layer"));
  }
  Placement p;
  p.version_ = version;
  p.num_servers_ = num_servers;
  p.slots_.assign(cfg.num_hidden_layers, std::vector<std::vector<int32_t>>(num_servers));
  const int64_t E = cfg.n_routed_experts;
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    if (!cfg.IsMoeLayer(l)) continue;
    for (int s = 0; s < num_servers; ++s) {
      for (int64_t e = s * E / num_servers; e < (s + 1) * E / num_servers; ++e) {
        p.slots_[l][s].push_back(static_cast<int32_t>(e));
      }
    }
  }
  DMOE_RETURN_IF_ERROR(p.Index(cfg));
  return p;
}

absl::Status Placement::Index(const core::ModelConfig& cfg) {
  replicas_.assign(cfg.num_hidden_layers, {});
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    if (!cfg.IsMoeLayer(l)) {
      for (const auto& s : slots_[l]) {
        if (!s.empty()) {
          return absl::InvalidArgumentError(
              absl::StrCat("placement: layer ", l, " is dense but has expert slots"));
        }
      }
      continue;
    }
    replicas_[l].assign(cfg.n_routed_experts, {});
    for (int s = 0; s < num_servers_; ++s) {
      for (int32_t e : slots_[l][s]) {
        if (e < 0 || e >= cfg.n_routed_experts) {
          return absl::InvalidArgumentError(absl::StrCat("placement: layer ", l, " server ", s,
                                                         ": expert id ", e, " out of range [0, ",
                                                         cfg.n_routed_experts, ")"));
        }
        auto& r = replicas_[l][e];
        if (!r.empty() && r.back() == s) {
          return absl::InvalidArgumentError(
              absl::StrCat("placement: layer ", l, " server ", s, " holds expert ", e, " twice"));
        }
        r.push_back(s);
      }
    }
    for (int64_t e = 0; e < cfg.n_routed_experts; ++e) {
      if (replicas_[l][e].empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat("placement: layer ", l, " expert ", e, " is on no server"));
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<Placement> Placement::FromJson(const nlohmann::json& j,
                                              const core::ModelConfig& cfg) {
  if (!j.is_object() || !j.contains("num_servers") || !j["num_servers"].is_number_integer() ||
      !j.contains("layers") || !j["layers"].is_array()) {
    return absl::InvalidArgumentError(
        "placement: expected {\"version\": V, \"num_servers\": N, \"layers\": [...]}");
  }
  Placement p;
  const int64_t num_servers = j["num_servers"].get<int64_t>();
  if (num_servers < 1) return absl::InvalidArgumentError("placement: num_servers must be >= 1");
  if (num_servers > std::numeric_limits<int>::max()) {
    return absl::InvalidArgumentError(
        absl::StrCat("placement: num_servers ", num_servers, " is too large"));
  }
  p.num_servers_ = static_cast<int>(num_servers);
  if (j.contains("version") &&
      !(j["version"].is_number_unsigned() ||
        (j["version"].is_number_integer() && j["version"].get<int64_t>() >= 0))) {
    return absl::InvalidArgumentError("placement: \"version\" must be a non-negative integer");
  }
  p.version_ = j.value("version", static_cast<uint64_t>(1));
  // A layer's server lists are allocated once its JSON has that many (so a
  // huge num_servers costs nothing before it is refused); dense layers at the end.
  p.slots_.assign(cfg.num_hidden_layers, {});
  std::set<int64_t> seen;
  for (const auto& lj : j["layers"]) {
    if (!lj.is_object() || !lj.contains("layer") || !lj["layer"].is_number_integer() ||
        !lj.contains("servers") || !lj["servers"].is_array()) {
      return absl::InvalidArgumentError("placement: each layer needs \"layer\" and \"servers\"");
    }
    const int64_t l = lj["layer"].get<int64_t>();
    if (l < 0 || l >= cfg.num_hidden_layers || !cfg.IsMoeLayer(l)) {
      return absl::InvalidArgumentError(
          absl::StrCat("placement: layer ", l, " is not a MoE layer"));
    }
    if (!seen.insert(l).second) {
      return absl::InvalidArgumentError(absl::StrCat("placement: layer ", l, " listed twice"));
    }
    if (static_cast<int>(lj["servers"].size()) != p.num_servers_) {
      return absl::InvalidArgumentError(absl::StrCat("placement: layer ", l, " lists ",
                                                     lj["servers"].size(), " servers, expected ",
                                                     p.num_servers_));
    }
    p.slots_[l].resize(p.num_servers_);
    for (int s = 0; s < p.num_servers_; ++s) {
      const auto& sj = lj["servers"][s];
      if (!sj.is_array())
        return absl::InvalidArgumentError("placement: server slots must be arrays");
      for (const auto& e : sj) {
        if (!e.is_number_integer()) {
          return absl::InvalidArgumentError(
              absl::StrCat("placement: layer ", l, " server ", s, ": expert ids must be integers"));
        }
        const bool in_range =
            e.is_number_unsigned()
                ? e.get<uint64_t>() < static_cast<uint64_t>(cfg.n_routed_experts)
                : e.get<int64_t>() >= 0 && e.get<int64_t>() < cfg.n_routed_experts;
        if (!in_range) {
          return absl::InvalidArgumentError(
              absl::StrCat("placement: layer ", l, " server ", s, ": expert id ", e.dump(),
                           " out of range [0, ", cfg.n_routed_experts, ")"));
        }
        p.slots_[l][s].push_back(e.get<int32_t>());
      }
      std::sort(p.slots_[l][s].begin(), p.slots_[l][s].end());
    }
  }
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    if (cfg.IsMoeLayer(l) && !seen.count(l)) {
      return absl::InvalidArgumentError(absl::StrCat("placement: MoE layer ", l, " is missing"));
    }
  }
  for (auto& layer : p.slots_) layer.resize(p.num_servers_);
  DMOE_RETURN_IF_ERROR(p.Index(cfg));
  return p;
}

absl::StatusOr<Placement> Placement::FromFile(const std::string& path,
                                              const core::ModelConfig& cfg) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("placement: cannot open ", path));
  nlohmann::json j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded())
    return absl::InvalidArgumentError(absl::StrCat("placement: ", path, " is not valid JSON"));
  auto p = FromJson(j, cfg);
  if (!p.ok())
    return absl::Status(p.status().code(), absl::StrCat(path, ": ", p.status().message()));
  return p;
}

nlohmann::json Placement::ToJson() const {
  nlohmann::json j;
  j["version"] = version_;
  j["num_servers"] = num_servers_;
  j["layers"] = nlohmann::json::array();
  for (size_t l = 0; l < slots_.size(); ++l) {
    if (replicas_[l].empty()) continue;
    j["layers"].push_back({{"layer", l}, {"servers", slots_[l]}});
  }
  return j;
}

const std::vector<int32_t>& Placement::Slots(int64_t layer, int server) const {
  if (layer < 0 || layer >= static_cast<int64_t>(slots_.size()) || server < 0 ||
      server >= num_servers_) {
    return kEmpty;
  }
  return slots_[layer][server];
}

const std::vector<int32_t>& Placement::Replicas(int64_t layer, int32_t e) const {
  if (layer < 0 || layer >= static_cast<int64_t>(replicas_.size()) || e < 0 ||
      e >= static_cast<int32_t>(replicas_[layer].size())) {
    return kEmpty;
  }
  return replicas_[layer][e];
}

bool Placement::Holds(int64_t layer, int server, int32_t e) const {
  const auto& r = Replicas(layer, e);
  return std::binary_search(r.begin(), r.end(), server);
}

absl::StatusOr<std::vector<ServerShare>> SplitByServer(const core::ExpertBatch& batch,
                                                       const Placement& placement,
                                                       std::span<const int64_t> queued_tokens,
                                                       SharedDuty duty,
                                                       std::span<const ServerState> states,
                                                       std::vector<int32_t>* stranded) {
  const int N = placement.num_servers();
  std::vector<int64_t> load(queued_tokens.begin(), queued_tokens.end());
  load.resize(N, 0);
  auto state = [&](int s) {
    return static_cast<size_t>(s) < states.size() ? states[s] : ServerState::kUp;
  };
  std::vector<ServerShare> shares(N);
  for (int s = 0; s < N; ++s) {
    shares[s].server = s;
    shares[s].token_offsets.push_back(0);
  }
  std::vector<int> chosen;  // server per assignment of the current token
  std::vector<char> visits(N);
  // Among `candidates`, the best server for a new assignment: not excluded; up
  // before avoided; visited before not; then the least loaded. -1 if none.
  auto pick = [&](std::span<const int32_t> candidates) {
    int best = -1;
    auto key = [&](int s) {
      return std::tuple(state(s) == ServerState::kUp ? 0 : 1, visits[s] ? 0 : 1, load[s]);
    };
    for (int s : candidates) {
      if (state(s) == ServerState::kExcluded) continue;
      if (best < 0 || key(s) < key(best)) best = s;
    }
    return best;
  };
  std::vector<int32_t> all_servers(N);
  for (int s = 0; s < N; ++s) all_servers[s] = s;

  for (int64_t t = 0; t < batch.num_tokens; ++t) {
    const int32_t begin = batch.token_offsets[t], end = batch.token_offsets[t + 1];
    chosen.assign(end - begin, -1);
    std::fill(visits.begin(), visits.end(), 0);
    bool has_shared = false, lost = false;
    // Experts with one usable replica fix the servers this token visits anyway.
    for (int32_t a = begin; a < end; ++a) {
      const int32_t e = batch.ffn_ids[a];
      if (e == core::kSharedFfn) {
        has_shared = true;
        continue;
      }
      const auto& r = placement.Replicas(batch.layer, e);
      if (r.empty()) {
        return absl::FailedPreconditionError(absl::StrCat("layer ", batch.layer, ": expert ", e,
                                                          " has no replica in placement version ",
                                                          placement.version()));
      }
      int usable = -1, count = 0;
      for (int s : r) {
        if (state(s) != ServerState::kExcluded) {
          usable = s;
          ++count;
        }
      }
      if (count == 0) {
        if (stranded == nullptr) {
          return absl::UnavailableError(absl::StrCat(
              "layer ", batch.layer, ": every server holding expert ", e, " has failed"));
        }
        lost = true;
        break;
      }
      if (count == 1) {
        chosen[a - begin] = usable;
        visits[usable] = 1;
      }
    }
    if (lost) {
      stranded->push_back(static_cast<int32_t>(t));
      continue;
    }
    // Replicated experts.
    for (int32_t a = begin; a < end; ++a) {
      const int32_t e = batch.ffn_ids[a];
      if (e == core::kSharedFfn || chosen[a - begin] >= 0) continue;
      const int best = pick(placement.Replicas(batch.layer, e));
      chosen[a - begin] = best;
      visits[best] = 1;
    }
    int shared_server = -1;
    if (has_shared && duty == SharedDuty::kExpertServers) {
      for (int s = 0; s < N; ++s) {
        if (visits[s] && (shared_server < 0 || load[s] < load[shared_server])) shared_server = s;
      }
      if (shared_server < 0) {  // a token with only the shared FFN: any server
        shared_server = pick(all_servers);
        if (shared_server < 0) {
          if (stranded == nullptr) {
            return absl::UnavailableError(
                absl::StrCat("layer ", batch.layer, ": every expert server has failed"));
          }
          stranded->push_back(static_cast<int32_t>(t));
          continue;
        }
        visits[shared_server] = 1;
      }
    }
    for (int s = 0; s < N; ++s) {
      if (!visits[s]) continue;
      ServerShare& sh = shares[s];
      sh.tokens.push_back(static_cast<int32_t>(t));
      for (int32_t a = begin; a < end; ++a) {
        const int32_t e = batch.ffn_ids[a];
        if ((e == core::kSharedFfn && s == shared_server) ||
            (e != core::kSharedFfn && chosen[a - begin] == s)) {
          sh.ffn_ids.push_back(e);
          sh.weights.push_back(batch.weights[a]);
          sh.assignment_index.push_back(a);
        }
      }
      sh.token_offsets.push_back(static_cast<int32_t>(sh.ffn_ids.size()));
      ++load[s];
    }
  }
  return shares;
}

}  // namespace dmoe::place
