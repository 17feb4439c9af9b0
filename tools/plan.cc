// `dmoe plan`: the offline placement planner (placement/planner.h) on JSON files.
//
// Contract (kept exactly):
//   dmoe plan --loads FILE.json --servers N --slots-per-server S
//             [--groups G --nodes M] [--current PLACEMENT.json] --json
// FILE.json is {"loads": [[load of expert 0, 1, ...] per layer]}; the output is
// one JSON object on stdout:
//   {"layers": [{"servers": [[expert ids on server 0], ...]} per layer],
//    "predicted_max_over_mean": [... per layer]}
// Each server's list has exactly S entries, ascending. PLACEMENT.json is a
// placement as place::Placement writes it ({"version", "num_servers",
// "layers": [{"layer", "servers"}]}) with no model config: its layers match
// the loads' layers by position ("layer" is not interpreted), its server count
// may differ from N (servers leaving or joining). With --current, the slots
// moved per layer go to stderr (stdout stays the contract).
//
// Exit codes: 0 ok; 2 usage (unknown or malformed flags, flag values out of
// range or inconsistent with the loads, e.g. N * S < experts); 1 input files
// (unreadable, not JSON, wrong shape, negative loads, invalid placement).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "common/args.h"
#include "core/status.h"
#include "nlohmann/json.hpp"
#include "placement/planner.h"
#include "tools/commands.h"

namespace dmoe::tools {
namespace {

using json = nlohmann::json;

constexpr int kUsageError = 2;
constexpr int kInputError = 1;

int Fail(int code, const std::string& message) {
  std::fprintf(stderr, "dmoe plan: %s\n", message.c_str());
  return code;
}

// Reads and parses `path`; errors name `flag` and the file.
absl::StatusOr<json> ReadJson(const std::string& flag, const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("--", flag, " ", path, ": cannot open"));
  std::stringstream ss;
  ss << in.rdbuf();
  try {
    return json::parse(ss.str());
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, " ", path, ": not valid JSON: ", e.what()));
  }
}

// {"loads": [[...], ...]} -> [layer][expert].
absl::StatusOr<std::vector<std::vector<double>>> ParseLoads(const std::string& path,
                                                            const json& j) {
  const std::string where = absl::StrCat("--loads ", path, ": ");
  if (!j.is_object() || !j.contains("loads") || !j["loads"].is_array()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, "expected {\"loads\": [[load of expert 0, 1, ...] per layer]}"));
  }
  const json& layers = j["loads"];
  if (layers.empty())
    return absl::InvalidArgumentError(absl::StrCat(where, "\"loads\" has no layers"));
  std::vector<std::vector<double>> out;
  for (size_t l = 0; l < layers.size(); ++l) {
    if (!layers[l].is_array() || layers[l].empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, "loads[", l, "] must be a non-empty array of expert loads"));
    }
    out.emplace_back();
    for (size_t e = 0; e < layers[l].size(); ++e) {
      const json& v = layers[l][e];
      if (!v.is_number()) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, "loads[", l, "][", e, "] is not a number"));
      }
      const double x = v.get<double>();
      if (!std::isfinite(x) || x < 0) {
        return absl::InvalidArgumentError(absl::StrCat(where, "loads[", l, "][", e, "] is ", x,
                                                       "; loads must be finite and >= 0"));
      }
      out.back().push_back(x);
    }
  }
  return out;
}

// A placement's layers by position -> [layer][server] -> expert ids. Ids are
// checked by the planner (range, no duplicate on a server).
absl::StatusOr<std::vector<place::ServerSlots>> ParseCurrent(const std::string& path, const json& j,
                                                             size_t num_layers) {
  const std::string where = absl::StrCat("--current ", path, ": ");
  if (!j.is_object() || !j.contains("layers") || !j["layers"].is_array()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where,
                     "expected {\"version\": V, \"num_servers\": N, "
                     "\"layers\": [{\"layer\": l, \"servers\": [[...]]}]}"));
  }
  const json& layers = j["layers"];
  if (layers.size() != num_layers) {
    return absl::InvalidArgumentError(absl::StrCat(where, layers.size(),
                                                   " layers, but --loads has ", num_layers,
                                                   " (layers are matched by position)"));
  }
  int64_t num_servers = -1;
  if (j.contains("num_servers")) {
    if (!j["num_servers"].is_number_integer() || j["num_servers"].get<int64_t>() < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, "\"num_servers\" must be an integer >= 1"));
    }
    num_servers = j["num_servers"].get<int64_t>();
  }
  std::vector<place::ServerSlots> out;
  for (size_t l = 0; l < layers.size(); ++l) {
    const json& lj = layers[l];
    if (!lj.is_object() || !lj.contains("servers") || !lj["servers"].is_array()) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, "layers[", l, "] needs \"servers\": [[...], ...]"));
    }
    const json& servers = lj["servers"];
    if (num_servers >= 0 && static_cast<int64_t>(servers.size()) != num_servers) {
      return absl::InvalidArgumentError(absl::StrCat(where, "layers[", l, "] lists ",
                                                     servers.size(),
                                                     " servers, \"num_servers\" is ", num_servers));
    }
    out.emplace_back();
    for (size_t s = 0; s < servers.size(); ++s) {
      if (!servers[s].is_array()) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, "layers[", l, "].servers[", s, "] must be an array"));
      }
      out.back().emplace_back();
      for (const json& e : servers[s]) {
        if (!e.is_number_integer() || e.get<int64_t>() < INT32_MIN ||
            e.get<int64_t>() > INT32_MAX) {
          return absl::InvalidArgumentError(
              absl::StrCat(where, "layers[", l, "].servers[", s, "]: expert ids must be integers"));
        }
        out.back().back().push_back(static_cast<int32_t>(e.get<int64_t>()));
      }
    }
  }
  return out;
}

// The planner names its options; the command's user knows the flags.
std::string InFlags(absl::string_view message) {
  return absl::StrReplaceAll(message, {{"num_servers", "--servers"},
                                       {"slots_per_server", "--slots-per-server"},
                                       {"num_groups", "--groups"},
                                       {"num_nodes", "--nodes"},
                                       {"balance_slack", "--balance-slack"},
                                       {"expert_bytes", "--expert-bytes"},
                                       {"server_bytes", "--server-bytes"}});
}

// A flag that must be an integer in [lo, hi]; `out` untouched when absent.
absl::Status IntFlag(const Args& args, const std::string& name, int64_t lo, int64_t hi,
                     int64_t* out) {
  if (!args.Has(name)) return absl::OkStatus();
  absl::StatusOr<int64_t> v = args.Int(name);
  if (!v.ok()) return v.status();
  if (*v < lo || *v > hi) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, " must be in [", lo, ", ", hi, "], got ", *v));
  }
  *out = *v;
  return absl::OkStatus();
}

}  // namespace

int RunPlan(int argc, char** argv) {
  Args args("plan",
            "plan which experts each expert server holds, per MoE layer, from "
            "expert loads "
            "(exit 2: bad flags, 1: bad input files)");
  args.Flag("loads", "FILE.json",
            "expert loads: {\"loads\": [[load of expert 0, 1, ...] per layer]}", std::nullopt, true)
      .Flag("servers", "N", "number of expert servers", std::nullopt, true)
      .Flag("slots-per-server", "S", "experts per server and layer (every slot is filled)",
            std::nullopt, true)
      .Flag("groups", "G",
            "hierarchical: experts [g*E/G, (g+1)*E/G) form group g (with "
            "--nodes)")
      .Flag("nodes", "M",
            "hierarchical: servers [i*N/M, (i+1)*N/M) form node i; a group's "
            "replicas stay in one node")
      .Flag("current", "PLACEMENT.json",
            "plan from this placement, moving few slots (its layers match "
            "--loads by position)")
      .Flag("balance-slack", "X",
            "with --current: accept up to (1+X) times the fresh plan's "
            "max/mean to move fewer slots",
            "0.02")
      .Flag("expert-bytes", "B",
            "bytes of one expert's weights: reports bytes moved, prices "
            "--server-bytes")
      .Flag("server-bytes", "B", "weight budget per server: S * --expert-bytes must fit")
      .Flag("json", "", "print only the plan as one JSON object");
  if (absl::Status s = args.Parse(argc, argv, 2); !s.ok()) {
    std::fprintf(stderr, "dmoe %s\n", std::string(s.message()).c_str());
    return kUsageError;
  }
  if (args.help_requested()) return 0;

  place::PlanOptions o;
  int64_t servers = 0, slots = 0, groups = 0, nodes = 0;
  for (absl::Status s :
       {IntFlag(args, "servers", 1, 1 << 16, &servers),
        IntFlag(args, "slots-per-server", 1, 1 << 16, &slots),
        IntFlag(args, "groups", 1, 1 << 16, &groups), IntFlag(args, "nodes", 1, 1 << 16, &nodes),
        IntFlag(args, "expert-bytes", 1, INT64_MAX, &o.expert_bytes),
        IntFlag(args, "server-bytes", 0, INT64_MAX, &o.server_bytes)}) {
    if (!s.ok()) return Fail(kUsageError, std::string(s.message()));
  }
  if (args.Has("groups") != args.Has("nodes")) {
    return Fail(kUsageError, "--groups and --nodes go together (hierarchical planning)");
  }
  absl::StatusOr<double> slack = args.Double("balance-slack");
  if (!slack.ok()) return Fail(kUsageError, std::string(slack.status().message()));
  o.num_servers = static_cast<int>(servers);
  o.slots_per_server = static_cast<int>(slots);
  o.num_groups = static_cast<int>(groups);
  o.num_nodes = static_cast<int>(nodes);
  o.balance_slack = *slack;

  const std::string loads_path = args.Str("loads");
  absl::StatusOr<json> loads_json = ReadJson("loads", loads_path);
  if (!loads_json.ok()) return Fail(kInputError, std::string(loads_json.status().message()));
  absl::StatusOr<std::vector<std::vector<double>>> loads = ParseLoads(loads_path, *loads_json);
  if (!loads.ok()) return Fail(kInputError, std::string(loads.status().message()));
  for (size_t l = 0; l < loads->size(); ++l) {
    if (absl::Status s = place::ValidatePlanOptions(static_cast<int64_t>((*loads)[l].size()), o);
        !s.ok()) {
      return Fail(kUsageError, absl::StrCat(InFlags(s.message()), " (layer ", l, " of --loads has ",
                                            (*loads)[l].size(), " experts)"));
    }
  }
  std::vector<place::ServerSlots> current;
  const std::string current_path = args.Str("current");
  if (args.Has("current")) {
    absl::StatusOr<json> cj = ReadJson("current", current_path);
    if (!cj.ok()) return Fail(kInputError, std::string(cj.status().message()));
    absl::StatusOr<std::vector<place::ServerSlots>> c =
        ParseCurrent(current_path, *cj, loads->size());
    if (!c.ok()) return Fail(kInputError, std::string(c.status().message()));
    current = std::move(*c);
  }

  json out = {{"layers", json::array()}, {"predicted_max_over_mean", json::array()}};
  std::string text;
  for (size_t l = 0; l < loads->size(); ++l) {
    absl::StatusOr<place::LayerPlan> plan =
        place::PlanLayer((*loads)[l], o, current.empty() ? nullptr : &current[l]);
    if (!plan.ok()) {
      return Fail(kInputError, absl::StrCat("--current ", current_path, ": layer ", l, ": ",
                                            plan.status().message()));
    }
    out["layers"].push_back({{"servers", plan->servers}});
    out["predicted_max_over_mean"].push_back(plan->max_over_mean);
    std::string moved;
    if (!current.empty()) {
      moved = absl::StrFormat(", %d of %d slots moved", plan->slots_moved,
                              int64_t{o.num_servers} * o.slots_per_server);
      if (args.Has("expert-bytes")) absl::StrAppendFormat(&moved, " (%d bytes)", plan->bytes_moved);
    }
    if (args.Bool("json")) {
      if (!current.empty())
        std::fprintf(stderr, "layer %zu: max/mean %.4f%s\n", l, plan->max_over_mean, moved.c_str());
      continue;
    }
    absl::StrAppendFormat(&text, "layer %d: max/mean %.4f%s\n", l, plan->max_over_mean, moved);
    const std::vector<double> server_loads = place::ServerLoads((*loads)[l], plan->servers);
    for (int s = 0; s < o.num_servers; ++s) {
      absl::StrAppendFormat(&text, "  server %d (load %.6g): %s\n", s, server_loads[s],
                            absl::StrJoin(plan->servers[s], " "));
    }
  }
  if (args.Bool("json")) {
    std::printf("%s\n", out.dump().c_str());
  } else {
    std::fputs(text.c_str(), stdout);
  }
  return 0;
}

}  // namespace dmoe::tools
