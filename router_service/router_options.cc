#include "router_service/router_options.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "common/metrics_endpoint.h"
#include "core/expert_backend.h"
#include "core/status.h"

namespace dmoe::router {
namespace {

constexpr const char* kName = kRouterProgram;

absl::StatusOr<int64_t> IntIn(const common::Args& args, const char* name, int64_t lo, int64_t hi) {
  return args.IntIn(name, lo, hi, kName);
}

absl::Status PlacementNeedsExperts(const RouterOptions& c) {
  if (!c.placement.empty() && c.experts.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(kName, ": --placement needs --experts"));
  }
  return absl::OkStatus();
}

absl::Status NotEmpty(const char* flag, const std::string& value) {
  if (value.empty())
    return absl::InvalidArgumentError(absl::StrCat(kName, ": --", flag, " is empty"));
  return absl::OkStatus();
}

absl::Status ControllerRules(const RouterOptions& c) {
  if (!c.controller_router.empty()) {
    if (c.controller || !c.experts.empty() || !c.placement.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat(kName,
                       ": --controller-router takes the placement and the expert servers from "
                       "that router: give no --controller, --experts or --placement"));
    }
    if (c.controller_router.find(':') == std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat(kName, ": --controller-router: '",
                                                     c.controller_router, "' is not HOST:PORT"));
    }
  }
  if (c.controller && c.experts.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(kName, ": --controller needs --experts"));
  }
  return absl::OkStatus();
}

}  // namespace

void DeclareRouterFlags(common::Args& args) {
  args.Flag("model", "DIR", "checkpoint directory (config.json + *.safetensors)", std::nullopt,
            true)
      .Flag("experts", "HOST:PORT,...",
            "expert servers, comma-separated (index = placement server index); "
            "none (or no --experts) = compute the experts in-process")
      .Flag("placement", "FILE",
            "placement JSON (place::Placement); default: experts spread "
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
      .Flag("expert-weights", "auto|f32|bf16|int8",
            "format of the weights of the experts this process computes (all without "
            "--experts, the shared one with --shared-expert router); auto = --dtype, int8 = "
            "per-channel symmetric, quantised at load",
            "auto")
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
      .Flag("kv-admission", "paged|reserve",
            "paged: admit on free blocks, preempt (and later recompute) the newest sequence "
            "when blocks run out; reserve: reserve prompt + max_tokens at admission",
            "paged")
      .Flag("kv-dtype", "auto|f32|f16|bf16",
            "KV cache storage: f16 and bf16 hold twice the tokens in the same bytes (values "
            "rounded once, when written; f16 is the more accurate, saturating at +-65504); "
            "auto = f32 with --dtype f32 (exact mode), else f16",
            "auto")
      .Flag("prefix-cache", "on|off",
            "with --kv-admission paged: keep full KV blocks, addressed by the tokens up to "
            "their end, and start new sequences from their longest cached prefix "
            "(same bits as off)",
            "on")
      .Flag("kv-block-tokens", "N",
            "tokens per KV cache block (sequences take whole blocks as they grow), 1..4096", "32")
      .Flag("max-batch-tokens", "N", "tokens per scheduler step (decodes + prefill chunks)", "2048")
      .Flag("max-queue", "N", "requests waiting for admission before RESOURCE_EXHAUSTED", "256")
      .Flag("micro-batches", "N",
            "with --experts: split each step into up to N micro-batches so that "
            "attention of one overlaps the expert round trip of another",
            "2")
      .Flag("expert-deadline-ms", "MS", "deadline of one layer's round trip to the expert servers",
            "10000")
      .Flag("shutdown-grace-ms", "MS",
            "on SIGTERM/SIGINT, time given to in-flight requests before they "
            "are cancelled",
            "5000")
      .Flag("metrics-host", "HOST",
            "address of the Prometheus /metrics endpoint (0.0.0.0 in a pod)", "127.0.0.1")
      .Flag("metrics-port", "P",
            "port of /metrics (0 = any free port); when the default is taken "
            "the router serves without /metrics and says so",
            "9190")
      .Flag("metrics-port-file", "PATH", "write the bound metrics port to PATH once serving")
      .Flag("expert-metrics", "per-expert|per-layer",
            "routed-token series per (layer, expert), or per layer "
            "(expert=\"all\") to bound cardinality",
            "per-expert")
      .Flag("load-window-s", "S",
            "load window for balance metrics and placement: sliding length "
            "or EMA half-life, seconds",
            "60")
      .Flag("load-window-mode", "sliding|ema", "how the load window forgets", "sliding")
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
      .Flag("rebalance-hysteresis", "X", "disarm only below threshold - X", "0.05")
      .Flag("rebalance-sustain-s", "S", "for this long", "10")
      .Flag("rebalance-min-interval-s", "S", "at least this long after the last re-placement", "60")
      .Flag("rebalance-min-gain", "X", "apply a plan only if it lowers the worst max/mean by X",
            "0.05")
      .Flag("rebalance-slack", "X",
            "planner trade-off: accept up to X worse max/mean (relative) to "
            "move fewer expert weights",
            "0.02")
      .Flag("rebalance-min-tokens", "N", "layers with fewer tokens in the window count as uniform",
            "256")
      .Flag("expert-groups", "G",
            "hierarchical placement: experts form G groups kept on one node "
            "(with --expert-nodes)",
            "0")
      .Flag("expert-nodes", "M", "hierarchical placement: servers form M nodes", "0")
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

common::Args RouterArgs() {
  common::Args args =
      common::Args::ForProgram(kName,
                               "router of disaggregated MoE inference: attention, KV cache, "
                               "continuous batching; experts on dmoe-expert servers or in-process");
  DeclareRouterFlags(args);
  return args;
}

absl::Status RouterOptions::Validate() const {
  DMOE_RETURN_IF_ERROR(PlacementNeedsExperts(*this));
  DMOE_RETURN_IF_ERROR(NotEmpty("host", host));
  DMOE_RETURN_IF_ERROR(NotEmpty("metrics-host", metrics_host));
  return ControllerRules(*this);
}

absl::StatusOr<RouterOptions> RouterOptionsFromFlags(const common::Args& args) {
  RouterOptions c;
  c.model = args.Str("model");
  const std::vector<std::string> experts =
      absl::StrSplit(args.Str("experts"), ',', absl::SkipWhitespace());
  // "none", as the help says, is the same as leaving the flag out: every
  // expert is computed in this process.
  const bool none = std::find(experts.begin(), experts.end(), "none") != experts.end();
  if (none && experts.size() > 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(kName,
                     ": --experts: 'none' (compute the experts in-process) cannot be combined "
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
  DMOE_RETURN_IF_ERROR(PlacementNeedsExperts(c));
  const std::string shared = args.Str("shared-expert");
  if (shared == "router") {
    c.shared = place::SharedDuty::kRouter;
  } else if (shared != "expert") {
    return absl::InvalidArgumentError(
        absl::StrCat(kName, ": --shared-expert must be expert or router, got '", shared, "'"));
  }
  c.host = args.Str("host");
  DMOE_RETURN_IF_ERROR(NotEmpty("host", c.host));
  DMOE_ASSIGN_OR_RETURN(int64_t port, IntIn(args, "port", 0, 65535));
  c.port = static_cast<int>(port);
  c.port_file = args.Str("port-file");
  const std::string dtype = args.Str("dtype");
  if (dtype == "f32") {
    c.compute = core::ComputeType::kF32;
  } else if (dtype != "bf16") {
    return absl::InvalidArgumentError(
        absl::StrCat(kName, ": --dtype must be f32 or bf16, got '", dtype, "'"));
  }
  absl::StatusOr<core::ComputeType> weights =
      core::ParseExpertWeights(args.Str("expert-weights"), c.compute);
  if (!weights.ok()) {
    return absl::Status(weights.status().code(),
                        absl::StrCat(kName, ": --", weights.status().message()));
  }
  c.expert_weights = *weights;
  const std::string kv_dtype = args.Str("kv-dtype");
  if (kv_dtype == "auto") {
    c.sched.kv_dtype =
        c.compute == core::ComputeType::kBF16 ? core::KvDtype::kF16 : core::KvDtype::kF32;
  } else if (kv_dtype == "f32") {
    c.sched.kv_dtype = core::KvDtype::kF32;
  } else if (kv_dtype == "f16") {
    c.sched.kv_dtype = core::KvDtype::kF16;
  } else if (kv_dtype == "bf16") {
    c.sched.kv_dtype = core::KvDtype::kBF16;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat(kName, ": --kv-dtype must be auto, f32, f16 or bf16, got '", kv_dtype, "'"));
  }
  c.wire = args.Str("wire-dtype");
  if (c.wire != "auto" && c.wire != "f32" && c.wire != "bf16" && c.wire != "fp8") {
    return absl::InvalidArgumentError(
        absl::StrCat(kName, ": --wire-dtype must be auto, f32, bf16 or fp8, got '", c.wire, "'"));
  }
  const std::string combine = args.Str("combine");
  if (combine != "invariant" && combine != "per-server") {
    return absl::InvalidArgumentError(
        absl::StrCat(kName, ": --combine must be invariant or per-server, got '", combine, "'"));
  }
  c.per_assignment = combine == "invariant";
  const std::string admission = args.Str("kv-admission");
  if (admission != "paged" && admission != "reserve") {
    return absl::InvalidArgumentError(
        absl::StrCat(kName, ": --kv-admission must be paged or reserve, got '", admission, "'"));
  }
  c.sched.kv_admission = admission == "paged" ? KvAdmission::kPaged : KvAdmission::kReserve;
  const std::string prefix = args.Str("prefix-cache");
  if (prefix != "on" && prefix != "off") {
    return absl::InvalidArgumentError(
        absl::StrCat(kName, ": --prefix-cache must be on or off, got '", prefix, "'"));
  }
  c.sched.prefix_cache = prefix == "on";
  DMOE_ASSIGN_OR_RETURN(int64_t threads, IntIn(args, "threads", 0, 1024));
  c.threads = static_cast<int>(threads);
  DMOE_ASSIGN_OR_RETURN(int64_t kv, IntIn(args, "kv-cache-bytes", 1, INT64_MAX));
  c.sched.kv_cache_bytes = static_cast<size_t>(kv);
  DMOE_ASSIGN_OR_RETURN(c.sched.kv_block_tokens, IntIn(args, "kv-block-tokens", 1, 4096));
  DMOE_ASSIGN_OR_RETURN(c.sched.max_batch_tokens, IntIn(args, "max-batch-tokens", 1, 1 << 24));
  DMOE_ASSIGN_OR_RETURN(c.sched.max_queue, IntIn(args, "max-queue", 1, 1 << 24));
  DMOE_ASSIGN_OR_RETURN(int64_t micro, IntIn(args, "micro-batches", 1, 64));
  c.micro_batches = static_cast<int>(micro);
  DMOE_ASSIGN_OR_RETURN(c.expert_deadline_ms, IntIn(args, "expert-deadline-ms", 1, 3600000));
  DMOE_ASSIGN_OR_RETURN(c.grace_ms, IntIn(args, "shutdown-grace-ms", 0, 3600000));
  c.metrics_host = args.Str("metrics-host");
  DMOE_RETURN_IF_ERROR(NotEmpty("metrics-host", c.metrics_host));
  DMOE_ASSIGN_OR_RETURN(int64_t metrics_port, IntIn(args, "metrics-port", 0, 65535));
  c.metrics_port = static_cast<int>(metrics_port);
  c.metrics_port_explicit = args.Has("metrics-port");
  c.metrics_port_file = args.Str("metrics-port-file");
  {
    auto per_expert = common::ParseExpertMetricsFlag(args.Str("expert-metrics"));
    if (!per_expert.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(kName, ": ", per_expert.status().message()));
    }
    c.per_expert_metrics = *per_expert;
  }
  DMOE_ASSIGN_OR_RETURN(int64_t window_s, IntIn(args, "load-window-s", 1, 86400));
  c.window.window = absl::Seconds(window_s);
  const std::string mode = args.Str("load-window-mode");
  if (mode == "ema") {
    c.window.mode = LoadWindowOptions::Mode::kEma;
  } else if (mode != "sliding") {
    return absl::InvalidArgumentError(
        absl::StrCat(kName, ": --load-window-mode must be sliding or ema, got '", mode, "'"));
  }
  c.controller = args.Bool("controller");
  c.controller_router = args.Str("controller-router");
  c.advertise = args.Str("advertise");
  DMOE_RETURN_IF_ERROR(ControllerRules(c));
  DMOE_ASSIGN_OR_RETURN(int64_t slots, IntIn(args, "slots-per-server", 0, 1 << 20));
  c.control.slots_per_server = static_cast<int>(slots);
  const std::string rebalance = args.Str("rebalance");
  if (rebalance != "auto" && rebalance != "manual") {
    return absl::InvalidArgumentError(
        absl::StrCat(kName, ": --rebalance must be auto or manual, got '", rebalance, "'"));
  }
  c.control.auto_rebalance = rebalance == "auto";
  auto real = [&](const char* name, double lo, double hi) -> absl::StatusOr<double> {
    DMOE_ASSIGN_OR_RETURN(double v, args.Double(name));
    if (!(v >= lo && v <= hi)) {
      return absl::InvalidArgumentError(
          absl::StrCat(kName, ": --", name, " must be in [", lo, ", ", hi, "], got ", v));
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
      return absl::InvalidArgumentError(
          absl::StrCat(kName, ": --gate-bias-for-testing: '", item, "' is not EXPERT:BIAS"));
    }
    c.gate_bias.emplace_back(e, static_cast<float>(b));
  }
  return c;
}

}  // namespace dmoe::router
