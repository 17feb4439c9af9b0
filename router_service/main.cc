// dmoe-router: attention, KV cache, gates and continuous batching, with the
// routed experts on dmoe-expert servers (--experts) or in-process.
//
// Exit codes: 0 after a graceful shutdown (SIGTERM/SIGINT) or --help, 1 when
// the model or the placement cannot be loaded or the port (or an explicit
// --metrics-port) cannot be bound, 2 for bad flags.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <algorithm>
#include <cmath>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "core/config.h"
#include "core/kernels/cpu/linear.h"
#include "core/model.h"
#include "core/placement.h"
#include "core/status.h"
#include "core/wire.h"
#include "dmoe/v1/router.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "prometheus/registry.h"
#include "grpcpp/health_check_service_interface.h"
#include "router_service/load_window.h"
#include "router_service/readiness.h"
#include "router_service/remote_expert_backend.h"
#include "router_service/router_metrics.h"
#include "router_service/router_server.h"
#include "router_service/scheduler.h"
#include "tools/args.h"
#include "tools/metrics_endpoint.h"
#include "tools/service_main.h"

namespace dmoe::router {
namespace {

constexpr char kName[] = "dmoe-router";

void DeclareFlags(tools::Args& args) {
  args.Flag("model", "DIR",
            "checkpoint directory (config.json + *.safetensors)", std::nullopt,
            true)
      .Flag("experts", "HOST:PORT,...",
            "expert servers, comma-separated (index = placement server index); "
            "none (or no --experts) = compute the experts in-process")
      .Flag("placement", "FILE",
            "placement JSON (core::Placement); default: experts spread "
            "contiguously over the servers")
      .Flag("shared-expert", "expert|router",
            "where the shared expert runs: on the expert servers or in this "
            "process",
            "expert")
      .Flag("host", "HOST", "address to listen on", "127.0.0.1")
      .Flag("port", "P", "port to listen on (0 = any free port)", "50051")
      .Flag("port-file", "PATH", "write the bound port to PATH once serving")
      .Flag("dtype", "f32|bf16",
            "compute type (f32 = exact mode, also f32 activations on the wire; "
            "bf16 = serving)",
            "bf16")
      .Flag("combine", "invariant|per-server",
            "how expert results come back: invariant = one row per (token, "
            "expert), added in a fixed order here, so a token's result does "
            "not depend on which servers or replicas computed it; per-server "
            "= one partial sum per token and server (fewer reply bytes, bits "
            "depend on the split)",
            "invariant")
      .Flag("wire-dtype", "auto|f32|bf16|fp8",
            "activations sent to expert servers (auto = f32 with --dtype f32, "
            "else bf16; fp8 = e4m3 with one scale per token)",
            "auto")
      .Flag("threads", "N", "compute threads (0 = all cores)", "0")
      .Flag("kv-cache-bytes", "B", "KV cache budget in bytes", "1073741824")
      .Flag("max-batch-tokens", "N",
            "tokens per scheduler step (decodes + prefill chunks)", "2048")
      .Flag("max-queue", "N",
            "requests waiting for admission before RESOURCE_EXHAUSTED", "256")
      .Flag("micro-batches", "N",
            "with --experts: split each step into up to N micro-batches so that "
            "attention of one overlaps the expert round trip of another",
            "2")
      .Flag("expert-deadline-ms", "MS",
            "deadline of one layer's round trip to the expert servers", "10000")
      .Flag("shutdown-grace-ms", "MS",
            "on SIGTERM/SIGINT, time given to in-flight requests before they "
            "are cancelled",
            "5000")
      .Flag("metrics-host", "HOST",
            "address of the Prometheus /metrics endpoint (0.0.0.0 in a pod)",
            "127.0.0.1")
      .Flag("metrics-port", "P",
            "port of /metrics (0 = any free port); when the default is taken "
            "the router serves without /metrics and says so",
            "9190")
      .Flag("metrics-port-file", "PATH",
            "write the bound metrics port to PATH once serving")
      .Flag("expert-metrics", "per-expert|per-layer",
            "routed-token series per (layer, expert), or per layer "
            "(expert=\"all\") to bound cardinality",
            "per-expert")
      .Flag("load-window-s", "S",
            "load window for balance metrics and placement: sliding length "
            "or EMA half-life, seconds",
            "60")
      .Flag("load-window-mode", "sliding|ema", "how the load window forgets",
            "sliding")
      .Flag("controller", "",
            "run the placement controller (one router per deployment): "
            "re-places and replicates experts live from the load window; "
            "serves dmoe ctl")
      .Flag("slots-per-server", "N",
            "routed experts per server and MoE layer the controller plans "
            "(the weight memory of a server; during a switch it briefly holds "
            "old and new slots). 0 = enough for one server to leave: "
            "ceil(experts / (servers - 1)), at least what the starting "
            "placement gives a server; the slots beyond experts / servers "
            "hold replicas of hot experts. A leave the other servers cannot "
            "absorb is refused (the server keeps serving; "
            "moe_router_leaves_refused_total)",
            "0")
      .Flag("rebalance", "auto|manual",
            "auto: re-place on sustained imbalance; manual: only on "
            "dmoe ctl rebalance, joins and leaves",
            "auto")
      .Flag("rebalance-threshold", "X",
            "re-place when the worst layer's max/mean load over servers "
            "stays above X",
            "1.25")
      .Flag("rebalance-hysteresis", "X",
            "disarm only below threshold - X", "0.05")
      .Flag("rebalance-sustain-s", "S", "for this long", "10")
      .Flag("rebalance-min-interval-s", "S",
            "at least this long after the last re-placement", "60")
      .Flag("rebalance-min-gain", "X",
            "apply a plan only if it lowers the worst max/mean by X", "0.05")
      .Flag("rebalance-slack", "X",
            "planner trade-off: accept up to X worse max/mean (relative) to "
            "move fewer expert weights",
            "0.02")
      .Flag("rebalance-min-tokens", "N",
            "layers with fewer tokens in the window count as uniform", "256")
      .Flag("expert-groups", "G",
            "hierarchical placement: experts form G groups kept on one node "
            "(with --expert-nodes)",
            "0")
      .Flag("expert-nodes", "M",
            "hierarchical placement: servers form M nodes", "0")
      .Flag("controller-router", "HOST:PORT",
            "several routers: follow the placement of the router running "
            "--controller there (fetched at start, pushed to this router on "
            "every re-placement; this router re-registers every 2 s); "
            "replaces --experts / --placement")
      .Flag("advertise", "HOST:PORT",
            "with --controller-router: the address the controller reaches "
            "this router at (default: --host, or the hostname when --host is "
            "a wildcard, and the bound port)")
      .Flag("gate-bias-for-testing", "E:B,...",
            "TESTING ONLY (changes outputs): add B to expert E's router logit "
            "in every MoE layer, to skew routing on purpose")
      .Flag("server-lost-after-s", "S",
            "an expert server unreachable this long has its slots moved", "30");
}

struct Config {
  std::string model;
  std::vector<std::string> experts;
  std::string placement;
  core::SharedDuty shared = core::SharedDuty::kExpertServers;
  std::string host;
  int port = 0;
  std::string port_file;
  core::ComputeType compute = core::ComputeType::kBF16;
  std::string wire = "auto";  // activations to expert servers
  bool per_assignment = true;  // --combine=invariant
  int threads = 0;
  int micro_batches = 2;
  bool controller = false;
  ControllerOptions control;
  std::string controller_router;  // follow this router's controller
  std::vector<std::pair<int64_t, float>> gate_bias;
  SchedulerOptions sched;
  int64_t expert_deadline_ms = 0;
  int64_t grace_ms = 0;
  std::string metrics_host;
  int metrics_port = 0;
  bool metrics_port_explicit = false;
  std::string metrics_port_file;
  bool per_expert_metrics = true;
  LoadWindowOptions window;
};

absl::StatusOr<int64_t> IntIn(const tools::Args& args, const char* name,
                              int64_t lo, int64_t hi) {
  DMOE_ASSIGN_OR_RETURN(int64_t v, args.Int(name));
  if (v < lo || v > hi) {
    return absl::InvalidArgumentError(absl::StrCat(
        kName, ": --", name, " must be in [", lo, ", ", hi, "], got ", v));
  }
  return v;
}

// Flag values to a Config; every error here is a usage error (exit 2).
absl::StatusOr<Config> ReadFlags(const tools::Args& args) {
  Config c;
  c.model = args.Str("model");
  const std::vector<std::string> experts =
      absl::StrSplit(args.Str("experts"), ',', absl::SkipWhitespace());
  // "none", as the help says, is the same as leaving the flag out: every
  // expert is computed in this process.
  const bool none = std::find(experts.begin(), experts.end(), "none") != experts.end();
  if (none && experts.size() > 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        kName, ": --experts: 'none' (compute the experts in-process) cannot be combined "
               "with expert server addresses"));
  }
  for (const std::string& addr : experts) {
    if (none) break;
    const size_t colon = addr.rfind(':');
    if (colon == std::string::npos || colon == 0 || colon + 1 == addr.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat(kName, ": --experts: '", addr, "' is not HOST:PORT"));
    }
    c.experts.push_back(addr);
  }
  c.placement = args.Str("placement");
  if (!c.placement.empty() && c.experts.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(kName, ": --placement needs --experts"));
  }
  const std::string shared = args.Str("shared-expert");
  if (shared == "router") {
    c.shared = core::SharedDuty::kRouter;
  } else if (shared != "expert") {
    return absl::InvalidArgumentError(
        absl::StrCat(kName, ": --shared-expert must be expert or router, got '",
                     shared, "'"));
  }
  c.host = args.Str("host");
  if (c.host.empty())
    return absl::InvalidArgumentError(absl::StrCat(kName, ": --host is empty"));
  DMOE_ASSIGN_OR_RETURN(int64_t port, IntIn(args, "port", 0, 65535));
  c.port = static_cast<int>(port);
  c.port_file = args.Str("port-file");
  const std::string dtype = args.Str("dtype");
  if (dtype == "f32") {
    c.compute = core::ComputeType::kF32;
  } else if (dtype != "bf16") {
    return absl::InvalidArgumentError(absl::StrCat(
        kName, ": --dtype must be f32 or bf16, got '", dtype, "'"));
  }
  c.wire = args.Str("wire-dtype");
  if (c.wire != "auto" && c.wire != "f32" && c.wire != "bf16" && c.wire != "fp8") {
    return absl::InvalidArgumentError(absl::StrCat(
        kName, ": --wire-dtype must be auto, f32, bf16 or fp8, got '", c.wire, "'"));
  }
  const std::string combine = args.Str("combine");
  if (combine != "invariant" && combine != "per-server") {
    return absl::InvalidArgumentError(absl::StrCat(
        kName, ": --combine must be invariant or per-server, got '", combine, "'"));
  }
  c.per_assignment = combine == "invariant";
  DMOE_ASSIGN_OR_RETURN(int64_t threads, IntIn(args, "threads", 0, 1024));
  c.threads = static_cast<int>(threads);
  DMOE_ASSIGN_OR_RETURN(int64_t kv,
                        IntIn(args, "kv-cache-bytes", 1, INT64_MAX));
  c.sched.kv_cache_bytes = static_cast<size_t>(kv);
  DMOE_ASSIGN_OR_RETURN(c.sched.max_batch_tokens,
                        IntIn(args, "max-batch-tokens", 1, 1 << 24));
  DMOE_ASSIGN_OR_RETURN(c.sched.max_queue,
                        IntIn(args, "max-queue", 1, 1 << 24));
  DMOE_ASSIGN_OR_RETURN(int64_t micro, IntIn(args, "micro-batches", 1, 64));
  c.micro_batches = static_cast<int>(micro);
  DMOE_ASSIGN_OR_RETURN(c.expert_deadline_ms,
                        IntIn(args, "expert-deadline-ms", 1, 3600000));
  DMOE_ASSIGN_OR_RETURN(c.grace_ms,
                        IntIn(args, "shutdown-grace-ms", 0, 3600000));
  c.metrics_host = args.Str("metrics-host");
  if (c.metrics_host.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(kName, ": --metrics-host is empty"));
  }
  DMOE_ASSIGN_OR_RETURN(int64_t metrics_port,
                        IntIn(args, "metrics-port", 0, 65535));
  c.metrics_port = static_cast<int>(metrics_port);
  c.metrics_port_explicit = args.Has("metrics-port");
  c.metrics_port_file = args.Str("metrics-port-file");
  {
    auto per_expert = tools::ParseExpertMetricsFlag(args.Str("expert-metrics"));
    if (!per_expert.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(kName, ": ", per_expert.status().message()));
    }
    c.per_expert_metrics = *per_expert;
  }
  DMOE_ASSIGN_OR_RETURN(int64_t window_s,
                        IntIn(args, "load-window-s", 1, 86400));
  c.window.window = absl::Seconds(window_s);
  const std::string mode = args.Str("load-window-mode");
  if (mode == "ema") {
    c.window.mode = LoadWindowOptions::Mode::kEma;
  } else if (mode != "sliding") {
    return absl::InvalidArgumentError(absl::StrCat(
        kName, ": --load-window-mode must be sliding or ema, got '", mode,
        "'"));
  }
  c.controller = args.Bool("controller");
  c.controller_router = args.Str("controller-router");
  if (!c.controller_router.empty()) {
    if (c.controller || !c.experts.empty() || !c.placement.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          kName, ": --controller-router takes the placement and the expert servers from "
                 "that router: give no --controller, --experts or --placement"));
    }
    if (c.controller_router.find(':') == std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat(
          kName, ": --controller-router: '", c.controller_router, "' is not HOST:PORT"));
    }
  }
  if (c.controller && c.experts.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(kName, ": --controller needs --experts"));
  }
  DMOE_ASSIGN_OR_RETURN(int64_t slots, IntIn(args, "slots-per-server", 0, 1 << 20));
  c.control.slots_per_server = static_cast<int>(slots);
  const std::string rebalance = args.Str("rebalance");
  if (rebalance != "auto" && rebalance != "manual") {
    return absl::InvalidArgumentError(absl::StrCat(
        kName, ": --rebalance must be auto or manual, got '", rebalance, "'"));
  }
  c.control.auto_rebalance = rebalance == "auto";
  auto real = [&](const char* name, double lo, double hi) -> absl::StatusOr<double> {
    DMOE_ASSIGN_OR_RETURN(double v, args.Double(name));
    if (!(v >= lo && v <= hi)) {
      return absl::InvalidArgumentError(absl::StrCat(kName, ": --", name, " must be in [", lo,
                                                     ", ", hi, "], got ", v));
    }
    return v;
  };
  DMOE_ASSIGN_OR_RETURN(c.control.trigger, real("rebalance-threshold", 1.0001, 1e6));
  DMOE_ASSIGN_OR_RETURN(c.control.hysteresis, real("rebalance-hysteresis", 0, 1e6));
  DMOE_ASSIGN_OR_RETURN(c.control.min_gain, real("rebalance-min-gain", 0, 1e6));
  DMOE_ASSIGN_OR_RETURN(c.control.balance_slack, real("rebalance-slack", 0, 1e6));
  DMOE_ASSIGN_OR_RETURN(c.control.min_tokens, real("rebalance-min-tokens", 0, 1e15));
  DMOE_ASSIGN_OR_RETURN(int64_t sustain, IntIn(args, "rebalance-sustain-s", 0, 86400));
  c.control.sustain = absl::Seconds(sustain);
  DMOE_ASSIGN_OR_RETURN(int64_t interval, IntIn(args, "rebalance-min-interval-s", 0, 86400 * 30));
  c.control.min_interval = absl::Seconds(interval);
  DMOE_ASSIGN_OR_RETURN(int64_t groups, IntIn(args, "expert-groups", 0, 1 << 20));
  DMOE_ASSIGN_OR_RETURN(int64_t nodes, IntIn(args, "expert-nodes", 0, 1 << 20));
  c.control.num_groups = static_cast<int>(groups);
  c.control.num_nodes = static_cast<int>(nodes);
  DMOE_ASSIGN_OR_RETURN(int64_t lost, IntIn(args, "server-lost-after-s", 1, 86400));
  c.control.lost_after = absl::Seconds(lost);
  for (absl::string_view item :
       absl::StrSplit(args.Str("gate-bias-for-testing"), ',', absl::SkipWhitespace())) {
    std::pair<std::string, std::string> kv = absl::StrSplit(item, absl::MaxSplits(':', 1));
    int64_t e = 0;
    double b = 0;
    if (!absl::SimpleAtoi(kv.first, &e) || !absl::SimpleAtod(kv.second, &b) || e < 0 ||
        !std::isfinite(b)) {
      return absl::InvalidArgumentError(absl::StrCat(
          kName, ": --gate-bias-for-testing: '", item, "' is not EXPERT:BIAS"));
    }
    c.gate_bias.emplace_back(e, static_cast<float>(b));
  }
  return c;
}

absl::StatusOr<core::ModelConfig> ReadModelConfig(const Config& c) {
  std::error_code ec;
  if (!std::filesystem::is_directory(c.model, ec)) {
    return absl::NotFoundError(
        absl::StrCat("--model: '", c.model, "' is not a directory"));
  }
  return core::ModelConfig::FromFile(c.model + "/config.json");
}

// The starting placement: --placement, else contiguous over the expert
// servers. In-process (no --experts) the router is the one "server" that
// holds every expert (for the balance metrics); an empty placement for a
// model without routed experts.
// The placement of the controller's router (--controller-router), retried
// for up to two minutes while that router starts.
absl::StatusOr<v1::PlacementResponse> FetchPlacement(const std::string& router) {
  auto stub = v1::RouterService::NewStub(
      grpc::CreateChannel(router, grpc::InsecureChannelCredentials()));
  grpc::Status st;
  for (int attempt = 0; attempt < 120; ++attempt) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    v1::PlacementResponse r;
    st = stub->GetPlacement(&ctx, v1::PlacementRequest(), &r);
    if (st.ok()) return r;
    if (st.error_code() != grpc::StatusCode::UNAVAILABLE &&
        st.error_code() != grpc::StatusCode::DEADLINE_EXCEEDED) {
      break;
    }
    std::this_thread::sleep_for(std::chrono::seconds(1));
  }
  return absl::UnavailableError(absl::StrCat("--controller-router ", router,
                                             ": no placement: ", st.error_message()));
}

absl::StatusOr<core::Placement> StartPlacement(const Config& c,
                                               const core::ModelConfig& cfg) {
  if (!c.placement.empty()) return core::Placement::FromFile(c.placement, cfg);
  if (c.experts.empty() && cfg.n_routed_experts == 0) return core::Placement();
  return core::Placement::Contiguous(
      cfg, std::max(1, static_cast<int>(c.experts.size())));
}

// `metrics` (not owned) is told of every routing and, with expert servers,
// of the traffic to them.
absl::StatusOr<std::unique_ptr<core::Model>> LoadModel(
    const Config& c, const core::Placement& placement, RouterMetrics* metrics,
    RemoteExpertControl** control) {
  core::ModelOptions opts;
  opts.compute = c.compute;
  if (!c.gate_bias.empty()) {
    DMOE_ASSIGN_OR_RETURN(core::ModelConfig cfg,
                          core::ModelConfig::FromFile(c.model + "/config.json"));
    opts.gate_bias_for_testing.assign(cfg.n_routed_experts, 0.0f);
    for (const auto& [e, b] : c.gate_bias) {
      if (e >= cfg.n_routed_experts) {
        return absl::InvalidArgumentError(absl::StrCat(
            "--gate-bias-for-testing: expert ", e, " is not in [0, ", cfg.n_routed_experts, ")"));
      }
      opts.gate_bias_for_testing[e] = b;
    }
    std::fprintf(stderr, "%s: TESTING: router logits biased for %zu experts\n", kName,
                 c.gate_bias.size());
  }
  opts.on_route = [metrics](int64_t layer, const core::GateResult& routing) {
    metrics->OnRoute(layer, routing);
  };
  if (!c.experts.empty()) {
    RemoteExpertOptions ro;
    ro.servers = c.experts;
    ro.placement = placement;
    ro.observer = metrics;
    if (c.wire == "f32") {
      ro.wire_dtype = core::WireDType::kF32;
    } else if (c.wire == "bf16") {
      ro.wire_dtype = core::WireDType::kBF16;
    } else if (c.wire == "fp8") {
      ro.wire_dtype = core::WireDType::kF8E4M3;
    } else {
      ro.wire_dtype = c.compute == core::ComputeType::kF32 ? core::WireDType::kF32
                                                           : core::WireDType::kBF16;
    }
    ro.shared_duty = c.shared;
    ro.per_assignment_replies = c.per_assignment;
    ro.local_compute = c.compute;
    ro.deadline = std::chrono::milliseconds(c.expert_deadline_ms);
    DMOE_ASSIGN_OR_RETURN(RemoteExperts remote, MakeRemoteExperts(std::move(ro)));
    opts.experts = std::move(remote.backend);
    *control = remote.control;
    opts.load_routed_experts = false;
    opts.load_shared_experts = c.shared == core::SharedDuty::kRouter;
    opts.micro_batches = c.micro_batches;
  }
  return core::Model::Load(c.model, std::move(opts));
}

int Fail(const absl::Status& st, int code) {
  std::fprintf(stderr, "%s: %s\n", kName, std::string(st.message()).c_str());
  return code;
}

int Main(int argc, char** argv) {
  // Block the shutdown signals in every thread (threads inherit the mask) and
  // take them with sigwait on the main thread.
  sigset_t signals = tools::BlockStopSignals();
  tools::CapMallocThreadCaches();
  if (absl::Status st = tools::CheckAndLogIsa(kName); !st.ok()) return Fail(st, 2);

  tools::Args args(
      kName,
      "router of disaggregated MoE inference: attention, KV cache, "
      "continuous batching; experts on dmoe-expert servers or in-process");
  DeclareFlags(args);
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      // Args::Usage names the `dmoe` CLI; this is a binary of its own.
      std::fputs(absl::StrReplaceAll(args.Usage(), {{"usage: dmoe dmoe-router",
                                                     "usage: dmoe-router"}})
                     .c_str(),
                 stdout);
      return 0;
    }
  }
  if (auto st = args.Parse(argc, argv, 1); !st.ok()) {
    std::fprintf(stderr, "%s\n", std::string(st.message()).c_str());
    return 2;
  }
  absl::StatusOr<Config> cfg = ReadFlags(args);
  if (!cfg.ok()) {
    std::fprintf(stderr, "%s\n", std::string(cfg.status().message()).c_str());
    return 2;
  }
  core::SetComputeThreads(cfg->threads);

  absl::StatusOr<core::ModelConfig> model_cfg = ReadModelConfig(*cfg);
  if (!model_cfg.ok()) return Fail(model_cfg.status(), 1);
  absl::StatusOr<core::Placement> placement;
  if (!cfg->controller_router.empty()) {
    absl::StatusOr<v1::PlacementResponse> fetched = FetchPlacement(cfg->controller_router);
    if (!fetched.ok()) return Fail(fetched.status(), 1);
    nlohmann::json j = nlohmann::json::parse(fetched->placement_json(), nullptr, false);
    placement = core::Placement::FromJson(j, *model_cfg);
    cfg->experts.assign(fetched->server_addresses().begin(), fetched->server_addresses().end());
    std::fprintf(stderr, "%s: following %s: placement version %llu over %zu expert servers\n",
                 kName, cfg->controller_router.c_str(),
                 static_cast<unsigned long long>(fetched->version()), cfg->experts.size());
  } else {
    placement = StartPlacement(*cfg, *model_cfg);
  }
  if (!placement.ok()) return Fail(placement.status(), 1);
  // The router's one load window: RouterMetrics writes it (routing and
  // per-server tokens) and exports its balance; the placement controller
  // reads the same one.
  LoadWindow window(model_cfg->num_hidden_layers, model_cfg->n_routed_experts,
                    std::max(1, placement->num_servers()), cfg->window);
  auto registry = std::make_shared<prometheus::Registry>();
  RouterMetrics metrics(*registry, *model_cfg, *placement, &window,
                        {cfg->per_expert_metrics, cfg->experts});

  RemoteExpertControl* control = nullptr;
  absl::StatusOr<std::unique_ptr<core::Model>> model =
      LoadModel(*cfg, *placement, &metrics, &control);
  if (!model.ok()) return Fail(model.status(), 1);
  SchedulerOptions sched = cfg->sched;
  sched.on_step = [&metrics](absl::Duration d) { metrics.OnStep(d); };
  absl::StatusOr<std::unique_ptr<Scheduler>> scheduler =
      Scheduler::Create(*std::move(model), sched);
  if (!scheduler.ok()) return Fail(scheduler.status(), 1);
  metrics.SetLoadSource(
      [s = scheduler->get()] { return s->GetLoad(); });
  std::unique_ptr<PlacementController> controller;
  if (cfg->controller) {
    absl::StatusOr<std::unique_ptr<PlacementController>> made =
        PlacementController::Create(*model_cfg, &window, control, cfg->control);
    if (!made.ok()) return Fail(made.status(), 2);
    controller = *std::move(made);
    controller->set_on_leave_refused(
        [&metrics](const std::string&) { metrics.RecordLeaveRefused(); });
    controller->set_on_replacement([&metrics, control](const v1::RebalanceResponse& r) {
      metrics.SetServers(control->servers());
      metrics.SetPlacement(control->placement());
      metrics.RecordReplacement(r.trigger(), r.bytes_moved(),
                                absl::Seconds(r.switch_seconds()));
    });
  }
  RouterServer service(**scheduler, controller.get());
  // Applies a placement pushed by (or fetched from) the controller's router.
  auto apply_placement = [&, cfg_ptr = &*model_cfg](uint64_t version, const std::string& json,
                                                     std::vector<std::string> servers) {
    nlohmann::json j = nlohmann::json::parse(json, nullptr, false);
    absl::StatusOr<core::Placement> p = core::Placement::FromJson(j, *cfg_ptr);
    if (!p.ok()) return p.status();
    if (p->version() != version) {
      return absl::InvalidArgumentError(absl::StrCat("placement version ", version,
                                                     " but its JSON says ", p->version()));
    }
    if (control->placement().version() >= version) return absl::OkStatus();
    DMOE_RETURN_IF_ERROR(control->SwitchPlacement(*p, servers, absl::Seconds(60)));
    metrics.SetServers(control->servers());
    metrics.SetPlacement(control->placement());
    std::fprintf(stderr, "%s: switched to placement version %llu\n", kName,
                 static_cast<unsigned long long>(version));
    return absl::OkStatus();
  };
  if (!cfg->controller_router.empty()) {
    service.set_placement_setter([&apply_placement](const v1::SetPlacementRequest& r) {
      return apply_placement(r.version(), r.placement_json(),
                             {r.server_addresses().begin(), r.server_addresses().end()});
    });
  }
  // Readiness (readiness.h): with remote experts the router is ready only
  // while every routed expert has a live server. It shows in GetLoad (the
  // gateways' health), in the gRPC health of "dmoe.v1.RouterService" (the
  // readiness probe; "" stays SERVING: the liveness probe) and in
  // moe_router_ready.
  std::atomic<grpc::HealthCheckServiceInterface*> health_service{nullptr};
  std::unique_ptr<ReadinessMonitor> readiness;
  metrics.SetReady(true);
  if (control != nullptr) {
    readiness = std::make_unique<ReadinessMonitor>(
        *model_cfg, control, nullptr,
        [&metrics, &health_service](const absl::Status& ready) {
          metrics.SetReady(ready.ok());
          if (grpc::HealthCheckServiceInterface* h = health_service.load()) {
            h->SetServingStatus(v1::RouterService::service_full_name(), ready.ok());
          }
        },
        ReadinessOptions());
    service.set_readiness([r = readiness.get()] { return r->Ready(); });
  }
  absl::StatusOr<StartedServer> server =
      StartRouterGrpcServer(&service, cfg->host, cfg->port);
  if (!server.ok()) return Fail(server.status(), 1);
  if (readiness != nullptr) {
    health_service = server->server->GetHealthCheckService();
    readiness->Start();  // one check now: known before the port file says "serving"
  }
  // Scrapes refresh the balance and scheduler gauges first. Declared after
  // everything its refresh reads, so destroyed (stopped) before them; up
  // before the port file is written, so that the file means "all serving".
  absl::StatusOr<std::unique_ptr<tools::MetricsEndpoint>> metrics_endpoint =
      tools::ServeMetrics(
          kName, cfg->metrics_host, cfg->metrics_port,
          cfg->metrics_port_explicit, cfg->metrics_port_file,
          std::make_shared<tools::RefreshingCollectable>(
              registry, [&metrics] { metrics.Refresh(); }));
  if (!metrics_endpoint.ok()) {
    server->server->Shutdown();
    return Fail(metrics_endpoint.status(), 1);
  }
  if (!cfg->port_file.empty()) {
    if (auto st = tools::WritePortFile(cfg->port_file, server->port); !st.ok()) {
      server->server->Shutdown();
      return Fail(st, 1);
    }
  }
  std::fprintf(stderr, "%s: serving on %s:%d (%zu expert servers)\n", kName,
               cfg->host.c_str(), server->port, cfg->experts.size());
  std::atomic<bool> following{true};
  std::thread follower;
  if (!cfg->controller_router.empty()) {
    std::string advertise = args.Str("advertise");
    if (advertise.empty()) {
      std::string h = cfg->host;
      if (h == "0.0.0.0" || h == "::" || h == "[::]") {
        char name[256] = {};
        gethostname(name, sizeof name - 1);
        h = name;
      }
      advertise = absl::StrCat(h, ":", server->port);
    }
    follower = std::thread([&, advertise] {
      auto stub = v1::RouterService::NewStub(
          grpc::CreateChannel(cfg->controller_router, grpc::InsecureChannelCredentials()));
      while (following) {
        grpc::ClientContext ctx;
        ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
        v1::RegisterRouterRequest req;
        req.set_address(advertise);
        req.set_placement_version(control->placement().version());
        v1::PlacementResponse r;
        grpc::Status st = stub->RegisterRouter(&ctx, req, &r);
        if (st.ok() && r.version() > control->placement().version()) {
          absl::Status applied = apply_placement(
              r.version(), r.placement_json(),
              {r.server_addresses().begin(), r.server_addresses().end()});
          if (!applied.ok()) {
            std::fprintf(stderr, "%s: placement version %llu from %s: %s\n", kName,
                         static_cast<unsigned long long>(r.version()),
                         cfg->controller_router.c_str(), std::string(applied.message()).c_str());
          }
        }
        for (int i = 0; i < 20 && following; ++i) {
          std::this_thread::sleep_for(std::chrono::milliseconds(100));
        }
      }
    });
  }
  if (controller != nullptr) {
    controller->Start();
    std::fprintf(stderr, "%s: placement controller on (%s, %d slots per server)\n", kName,
                 cfg->control.auto_rebalance ? "auto" : "manual",
                 controller->slots_per_server());
  }
  if (*metrics_endpoint != nullptr) {
    std::fprintf(stderr, "%s: metrics on http://%s:%d/metrics\n", kName,
                 cfg->metrics_host.c_str(), (*metrics_endpoint)->port());
  }

  int sig = 0;
  sigwait(&signals, &sig);
  std::fprintf(stderr, "%s: %s, shutting down (grace %lld ms)\n", kName,
               sig == SIGTERM ? "SIGTERM" : "SIGINT",
               static_cast<long long>(cfg->grace_ms));
  if (auto* health = server->server->GetHealthCheckService())
    health->Shutdown();
  if (readiness != nullptr) readiness->Stop();
  if (controller != nullptr) controller->Stop();
  following = false;
  if (follower.joinable()) follower.join();
  // New requests are refused from here on; in-flight ones get the grace period,
  // then end with UNAVAILABLE, which finishes their RPCs.
  (*scheduler)->Shutdown(absl::Milliseconds(cfg->grace_ms));
  server->server->Shutdown(std::chrono::system_clock::now() +
                           std::chrono::seconds(2));
  std::fprintf(stderr, "%s: stopped\n", kName);
  return 0;
}

}  // namespace
}  // namespace dmoe::router

int main(int argc, char** argv) { return dmoe::router::Main(argc, argv); }
