// `dmoe ctl`: talks to the placement controller of a running router.
//
//   dmoe ctl placement [--router HOST:PORT] [--json]
//   dmoe ctl load      [--router HOST:PORT] [--json] [--layers N]
//   dmoe ctl rebalance [--router HOST:PORT] [--dry-run] [--json]
//   dmoe ctl add-server    --address HOST:PORT [--router ...]
//   dmoe ctl remove-server --address HOST:PORT [--router ...]
//
// Exit codes: 0 done, 1 the router refused or failed (its status is printed),
// 2 usage errors.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/args.h"
#include "nlohmann/json.hpp"
#include "tools/commands.h"

#ifdef DMOE_WITH_SERVICES
#include <grpcpp/grpcpp.h>

#include "dmoe/v1/router.grpc.pb.h"
#endif

namespace dmoe::tools {
namespace {

constexpr char kUsage[] =
    "usage: dmoe ctl <placement|load|rebalance|add-server|remove-server> [flags]\n"
    "  placement       the placement table the router uses (servers x layers)\n"
    "  load            per-server and per-expert load in the router's window, with a heatmap\n"
    "  rebalance       plan and apply a re-placement now (--dry-run: only show the plan)\n"
    "  add-server      give a new expert server (--address) slots (scale-out)\n"
    "  remove-server   move an expert server's slots elsewhere (scale-in)\n"
    "`dmoe ctl <subcommand> --help` lists the flags.\n";

#ifdef DMOE_WITH_SERVICES

int Fail(const std::string& sub, const grpc::Status& st) {
  std::fprintf(stderr, "dmoe ctl %s: %s\n", sub.c_str(), st.error_message().c_str());
  return 1;
}

std::unique_ptr<v1::RouterService::Stub> Connect(const Args& args) {
  return v1::RouterService::NewStub(
      grpc::CreateChannel(args.Str("router"), grpc::InsecureChannelCredentials()));
}

void SetDeadline(grpc::ClientContext* ctx, int seconds) {
  ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(seconds));
}

// One character per value, darker for more: ' ', '.', ':', '-', '=', '+', '*', '#', '%', '@'.
char Shade(double v, double max) {
  static constexpr char kRamp[] = " .:-=+*#%@";
  if (max <= 0 || v <= 0) return kRamp[0];
  const int i = std::clamp(static_cast<int>(std::ceil(v / max * 9)), 1, 9);
  return kRamp[i];
}

void PrintReport(const v1::RebalanceResponse& r, bool json) {
  if (json) {
    nlohmann::json j = {
        {"applied", r.applied()},
        {"version", r.version()},
        {"trigger", r.trigger()},
        {"layers", std::vector<uint32_t>(r.layers().begin(), r.layers().end())},
        {"current_max_over_mean",
         std::vector<double>(r.current_max_over_mean().begin(), r.current_max_over_mean().end())},
        {"predicted_max_over_mean", std::vector<double>(r.predicted_max_over_mean().begin(),
                                                        r.predicted_max_over_mean().end())},
        {"slots_moved", r.slots_moved()},
        {"bytes_moved", r.bytes_moved()},
        {"switch_seconds", r.switch_seconds()},
        {"placement", nlohmann::json::parse(r.placement_json(), nullptr, false)}};
    std::printf("%s\n", j.dump().c_str());
    return;
  }
  std::printf("%s placement version %llu (%s)\n", r.applied() ? "applied" : "planned (dry run)",
              static_cast<unsigned long long>(r.version()), r.trigger().c_str());
  std::printf("%-8s %-16s %-16s\n", "layer", "max/mean now", "max/mean planned");
  for (int i = 0; i < r.layers_size(); ++i) {
    std::printf("%-8u %-16.3f %-16.3f\n", r.layers(i), r.current_max_over_mean(i),
                r.predicted_max_over_mean(i));
  }
  std::printf("slots moved: %llu (%.1f MiB of expert weights)\n",
              static_cast<unsigned long long>(r.slots_moved()), r.bytes_moved() / 1048576.0);
  if (r.applied()) std::printf("switched after %.3f s\n", r.switch_seconds());
}

int Placement(const Args& args) {
  auto stub = Connect(args);
  grpc::ClientContext ctx;
  SetDeadline(&ctx, 10);
  v1::PlacementResponse r;
  if (auto st = stub->GetPlacement(&ctx, v1::PlacementRequest(), &r); !st.ok()) {
    return Fail("placement", st);
  }
  nlohmann::json p = nlohmann::json::parse(r.placement_json(), nullptr, false);
  if (args.Bool("json")) {
    std::printf("%s\n",
                nlohmann::json({{"version", r.version()},
                                {"servers", std::vector<std::string>(r.server_addresses().begin(),
                                                                     r.server_addresses().end())},
                                {"placement", p}})
                    .dump()
                    .c_str());
    return 0;
  }
  std::printf("placement version %llu, %d expert servers\n",
              static_cast<unsigned long long>(r.version()), r.server_addresses_size());
  for (int s = 0; s < r.server_addresses_size(); ++s) {
    std::printf("server %d (%s)\n", s, r.server_addresses(s).c_str());
    if (!p.is_object() || !p.contains("layers")) continue;
    for (const auto& layer : p["layers"]) {
      std::vector<int> ids = layer["servers"][s].get<std::vector<int>>();
      std::string list;
      for (size_t i = 0; i < ids.size(); ++i) absl::StrAppend(&list, i ? " " : "", ids[i]);
      std::printf("  layer %-4d %s\n", layer["layer"].get<int>(),
                  list.empty() ? "-" : list.c_str());
    }
  }
  return 0;
}

int Load(const Args& args) {
  auto stub = Connect(args);
  grpc::ClientContext ctx;
  SetDeadline(&ctx, 10);
  v1::ExpertLoadResponse r;
  if (auto st = stub->GetExpertLoad(&ctx, v1::ExpertLoadRequest(), &r); !st.ok()) {
    return Fail("load", st);
  }
  if (args.Bool("json")) {
    nlohmann::json layers = nlohmann::json::array();
    for (const v1::LayerLoad& l : r.layers()) {
      layers.push_back(
          {{"layer", l.layer()},
           {"tokens", l.tokens()},
           {"expert_load", std::vector<double>(l.expert_load().begin(), l.expert_load().end())},
           {"server_load", std::vector<double>(l.server_load().begin(), l.server_load().end())},
           {"server_max_over_mean", l.server_max_over_mean()},
           {"slot_max_over_mean", l.slot_max_over_mean()},
           {"expert_balance_stat", l.expert_balance_stat()},
           {"server_balance_stat", l.server_balance_stat()}});
    }
    std::printf("%s\n", nlohmann::json({{"placement_version", r.placement_version()},
                                        {"window_seconds", r.window_seconds()},
                                        {"layers", layers}})
                            .dump()
                            .c_str());
    return 0;
  }
  std::printf("placement version %llu, load over the last %.0f s (routed assignments)\n",
              static_cast<unsigned long long>(r.placement_version()), r.window_seconds());
  std::printf("\nper server (columns: servers; max/mean over servers):\n");
  for (const v1::LayerLoad& l : r.layers()) {
    std::printf("  layer %-4u", l.layer());
    for (double x : l.server_load()) std::printf(" %9.0f", x);
    std::printf("   max/mean %.3f\n", l.server_max_over_mean());
  }
  double max = 0;
  for (const v1::LayerLoad& l : r.layers()) {
    for (double x : l.expert_load()) max = std::max(max, x);
  }
  std::printf("\nper expert heatmap (rows: layers, columns: experts; ' ' none ... '@' = %.0f):\n",
              max);
  for (const v1::LayerLoad& l : r.layers()) {
    std::string row;
    for (double x : l.expert_load()) row.push_back(Shade(x, max));
    std::printf("  layer %-4u |%s|  tokens %.0f, expert stat %.3f, server stat %.3f\n", l.layer(),
                row.c_str(), l.tokens(), l.expert_balance_stat(), l.server_balance_stat());
  }
  return 0;
}

int Rebalance(const Args& args) {
  auto stub = Connect(args);
  grpc::ClientContext ctx;
  SetDeadline(&ctx, 600);
  v1::RebalanceRequest req;
  req.set_dry_run(args.Bool("dry-run"));
  v1::RebalanceResponse r;
  if (auto st = stub->Rebalance(&ctx, req, &r); !st.ok()) return Fail("rebalance", st);
  PrintReport(r, args.Bool("json"));
  return 0;
}

int Membership(const Args& args, bool add) {
  const std::string address = args.Str("address");
  if (address.empty()) {
    std::fprintf(stderr, "dmoe ctl %s: --address HOST:PORT is required\n",
                 add ? "add-server" : "remove-server");
    return 2;
  }
  auto stub = Connect(args);
  grpc::ClientContext ctx;
  SetDeadline(&ctx, 600);
  v1::ExpertServerRequest req;
  req.set_address(address);
  v1::RebalanceResponse r;
  grpc::Status st =
      add ? stub->AddExpertServer(&ctx, req, &r) : stub->RemoveExpertServer(&ctx, req, &r);
  if (!st.ok()) return Fail(add ? "add-server" : "remove-server", st);
  PrintReport(r, args.Bool("json"));
  return 0;
}

#endif  // DMOE_WITH_SERVICES

}  // namespace

int RunCtl(int argc, char** argv) {
  if (argc < 3 || std::string(argv[2]) == "--help" || std::string(argv[2]) == "-h") {
    std::fputs(kUsage, argc < 3 ? stderr : stdout);
    return argc < 3 ? 2 : 0;
  }
  const std::string sub = argv[2];
  Args args("ctl " + sub, "talk to the placement controller of a router (see `dmoe ctl --help`)");
  args.Flag("router", "HOST:PORT", "router running with --controller", "127.0.0.1:50051")
      .Flag("json", "", "print JSON");
  if (sub == "rebalance")
    args.Flag("dry-run", "", "only plan: show the plan, its balance and the bytes it moves");
  if (sub == "add-server" || sub == "remove-server")
    args.Flag("address", "HOST:PORT", "the expert server");
  if (sub != "placement" && sub != "load" && sub != "rebalance" && sub != "add-server" &&
      sub != "remove-server") {
    std::fprintf(stderr, "dmoe ctl: unknown subcommand '%s'\n%s", sub.c_str(), kUsage);
    return 2;
  }
  if (auto s = args.Parse(argc, argv, 3); !s.ok()) {
    std::fprintf(stderr, "dmoe ctl %s: %s\n", sub.c_str(), std::string(s.message()).c_str());
    return 2;
  }
  if (args.help_requested()) return 0;
#ifdef DMOE_WITH_SERVICES
  if (sub == "placement") return Placement(args);
  if (sub == "load") return Load(args);
  if (sub == "rebalance") return Rebalance(args);
  return Membership(args, sub == "add-server");
#else
  std::fprintf(stderr, "dmoe ctl: this build has no services (DMOE_BUILD_SERVICES=OFF)\n");
  return 1;
#endif
}

}  // namespace dmoe::tools
