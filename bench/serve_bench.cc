// serve_bench: the serving numbers users compare inference servers by — TTFT,
// TPOT, ITL, end-to-end latency, throughput and goodput at a latency SLO —
// measured through the gateway's OpenAI API like a user population, with the
// host's ceilings measured in the same run (docs: bench/README.md, "serve_bench").
//
//   serve_bench --url 127.0.0.1:8000 --model DIR ...   an existing gateway
//   serve_bench --preset v2lite --layers 4 --compare 'one:servers=0;disagg:servers=2'
//                                                      starts each configuration on
//                                                      loopback and runs the same load
//   serve_bench --quick                                the CI smoke (< 60 s)
//
// Load: closed loop at --concurrency C, or --rate R (Poisson) with at most C in
// flight; --num-requests or --duration-s after --warmup-requests; a sweep over
// --sweep-concurrency or --sweep-rate. Workload: bench/serve/workload.h. Output:
// a table, --json FILE, --plot FILE.png (gnuplot).
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "bench/bench_util.h"
#include "bench/ceilings.h"
#include "bench/serve/launcher.h"
#include "bench/serve/load.h"
#include "bench/serve/model_bytes.h"
#include "bench/serve/router_sampler.h"
#include "bench/serve/stage_profile.h"
#include "bench/serve/stats.h"
#include "bench/serve/workload.h"
#include "common/args.h"
#include "core/isa.h"
#include "core/status.h"
#include "nlohmann/json.hpp"
#include "testing/subprocess.h"

namespace dmoe::bench::serve {
namespace {

using json = nlohmann::json;

struct Options {
  std::string url;             // host:port of a running gateway ("" = launch configurations)
  std::string router_metrics;  // host:port of the router's /metrics with --url
  std::string model, preset = "tiny-v2lite", work_dir = "/tmp/serve_bench";
  int layers = 0;
  std::vector<ClusterConfig> configs;
  Workload workload;
  LoadSpec load;
  std::vector<double> sweep;  // concurrency or rate values
  bool sweep_rate = false;
  Slo slo;
  std::string json_path, plot_path, dump_path;
  bool ceilings = true;
  int ceiling_threads = 0;
  uint64_t seed = 1;
};

struct Point {
  std::string config;
  LoadSpec load;
  Summary summary;
  StageCounters stages;  // the router's step breakdown over the run (empty: unknown)
  RouterSample router;   // the router's concurrency and KV counters (n = 0: unknown)
  SteadyRate steady;     // closed loop: output tok/s while every user was busy
};

// Splits "HOST:PORT"; false when it is not one.
bool SplitHostPort(const std::string& s, std::string* host, int* port) {
  const size_t colon = s.rfind(':');
  if (colon == std::string::npos || colon == 0) return false;
  *host = s.substr(0, colon);
  return absl::SimpleAtoi(s.substr(colon + 1), port) && *port > 0 && *port < 65536;
}

// The router's stage counters now ({} when there is no /metrics to ask).
StageCounters ScrapeStages(const std::string& host, int port) {
  if (port <= 0) return {};
  HttpStreamClient c(host, port, 10);
  const HttpResult r = c.Get("/metrics");
  return r.status == 200 ? ParseStageCounters(r.body) : StageCounters{};
}

[[noreturn]] void Die(const absl::Status& s) {
  std::fprintf(stderr, "serve_bench: %s\n", std::string(s.message()).c_str());
  std::exit(2);
}

absl::StatusOr<std::vector<double>> ParseDoubles(const std::string& flag, const std::string& s) {
  std::vector<double> out;
  for (absl::string_view part : absl::StrSplit(s, ',', absl::SkipEmpty())) {
    double v = 0;
    if (!absl::SimpleAtod(part, &v) || v <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", flag, ": \"", part, "\" is not a positive number"));
    }
    out.push_back(v);
  }
  if (out.empty()) return absl::InvalidArgumentError(absl::StrCat("--", flag, ": empty list"));
  return out;
}

absl::StatusOr<Options> ParseOptions(int argc, char** argv) {
  common::Args a = common::Args::ForProgram(
      "serve_bench",
      "drive the gateway's OpenAI API like a user population and report TTFT, TPOT, ITL, "
      "latency, throughput and goodput");
  a.Flag("url", "HOST:PORT", "a running gateway; default: start each --compare configuration")
      .Flag("router-metrics", "HOST:PORT",
            "with --url: the router's /metrics, for the step breakdown")
      .Flag("model", "DIR", "checkpoint (the model served, or to serve); default: --preset")
      .Flag("preset", "NAME", "dmoe make-model preset when --model is not given", "tiny-v2lite")
      .Flag("layers", "N", "layers of the generated model (0: the preset's)", "0")
      .Flag("work-dir", "DIR", "generated model, logs and port files", "/tmp/serve_bench")
      .Flag("compare", "CFG;CFG",
            "configurations to start and compare, NAME:key=value,... "
            "(servers, shared, wire, micro, threads, expert-threads, dtype, kv-block, "
            "kv-bytes, kv-admission, prefix-cache, kv-dtype, spin)",
            "one:servers=0")
      .Flag("api", "completions|chat", "endpoint", "completions")
      .Flag("prompt", "ids|text", "token-id prompts (completions) or text", "ids")
      .Flag("input-len", "N", "mean prompt tokens (after any shared prefix)", "128")
      .Flag("output-len", "N", "mean new tokens (max_tokens)", "32")
      .Flag("input-dist", "fixed|uniform|lognormal", "prompt length distribution", "fixed")
      .Flag("output-dist", "fixed|uniform|lognormal", "output length distribution", "fixed")
      .Flag("len-spread", "X", "uniform: lengths in mean x [1-X, 1+X]", "0.5")
      .Flag("len-sigma", "X", "lognormal: sigma of the log", "0.6")
      .Flag("shared-prefixes", "K", "K system prompts shared by the requests (0: none)", "0")
      .Flag("prefix-len", "L", "tokens of each shared prefix", "256")
      .Flag("no-ignore-eos", "", "let the model stop at EOS (default: exactly --output-len)")
      .Flag("max-tokens", "N",
            "send max_tokens N and end each stream after its drawn output length (the "
            "client closes the connection, as a user who stops reading); 0: max_tokens = "
            "the drawn length",
            "0")
      .Flag("concurrency", "C", "closed loop: users; with --rate: most requests in flight", "1")
      .Flag("rate", "R", "open loop: Poisson arrivals per second (0: closed loop)", "0")
      .Flag("num-requests", "N", "measured requests per run (0: by --duration-s)", "0")
      .Flag("duration-s", "S", "measured seconds per run (0: by --num-requests)", "0")
      .Flag("warmup-requests", "W", "requests before measuring (default: the concurrency)")
      .Flag("sweep-concurrency", "C,C,...", "one run per concurrency")
      .Flag("sweep-rate", "R,R,...", "one open-loop run per rate")
      .Flag("slo-ttft-ms", "MS", "goodput: TTFT at most this (0: not checked)", "0")
      .Flag("slo-tpot-ms", "MS", "goodput: TPOT at most this (0: not checked)", "0")
      .Flag("timeout-s", "S", "a request fails after S seconds without a byte", "600")
      .Flag("json", "FILE", "write every run, the ceilings and the ratios as JSON")
      .Flag("plot", "FILE.png", "draw TPOT and TTFT against throughput (gnuplot)")
      .Flag("dump-requests", "FILE",
            "write the requests of the first run as JSON lines "
            "{path, body} (for tools/serve_check.py, an independent client)")
      .Flag("no-ceilings", "", "skip measuring the host's read bandwidth and GEMM ceilings")
      .Flag("ceiling-threads", "N", "threads of the ceilings (0: all cores)", "0")
      .Flag("seed", "S", "workload seed", "1")
      .Flag("quick", "",
            "CI smoke: tiny model, one process vs 2 servers, c=1 and 4, a few requests");
  DMOE_RETURN_IF_ERROR(a.Parse(argc, argv, 1));
  if (a.help_requested()) std::exit(0);
  Options o;
  o.url = a.Str("url");
  o.router_metrics = a.Str("router-metrics");
  o.model = a.Str("model");
  o.preset = a.Str("preset");
  o.work_dir = a.Str("work-dir");
  DMOE_ASSIGN_OR_RETURN(int64_t layers, a.IntIn("layers", 0, 1000, "serve_bench"));
  o.layers = static_cast<int>(layers);
  for (absl::string_view spec : absl::StrSplit(a.Str("compare"), ';', absl::SkipEmpty())) {
    DMOE_ASSIGN_OR_RETURN(ClusterConfig c, ParseClusterConfig(std::string(spec)));
    o.configs.push_back(c);
  }
  Workload& w = o.workload;
  const std::string api = a.Str("api"), prompt = a.Str("prompt");
  if (api != "completions" && api != "chat") {
    return absl::InvalidArgumentError("--api: expected completions or chat, got " + api);
  }
  if (prompt != "ids" && prompt != "text") {
    return absl::InvalidArgumentError("--prompt: expected ids or text, got " + prompt);
  }
  w.api = api == "chat" ? Workload::Api::kChat : Workload::Api::kCompletions;
  w.prompt = prompt == "text" ? Workload::Prompt::kText : Workload::Prompt::kTokenIds;
  DMOE_ASSIGN_OR_RETURN(int64_t in_len, a.IntIn("input-len", 1, 1 << 20, "serve_bench"));
  DMOE_ASSIGN_OR_RETURN(int64_t out_len, a.IntIn("output-len", 1, 1 << 20, "serve_bench"));
  DMOE_ASSIGN_OR_RETURN(w.input.kind, ParseLengthKind(a.Str("input-dist")));
  DMOE_ASSIGN_OR_RETURN(w.output.kind, ParseLengthKind(a.Str("output-dist")));
  DMOE_ASSIGN_OR_RETURN(double spread, a.Double("len-spread"));
  DMOE_ASSIGN_OR_RETURN(double sigma, a.Double("len-sigma"));
  if (spread < 0 || spread >= 1) return absl::InvalidArgumentError("--len-spread: in [0, 1)");
  if (sigma <= 0 || sigma > 3) return absl::InvalidArgumentError("--len-sigma: in (0, 3]");
  w.input.mean = static_cast<double>(in_len);
  w.output.mean = static_cast<double>(out_len);
  w.input.spread = w.output.spread = spread;
  w.input.sigma = w.output.sigma = sigma;
  w.input.max = w.output.max = 1 << 20;
  DMOE_ASSIGN_OR_RETURN(int64_t prefixes, a.IntIn("shared-prefixes", 0, 100000, "serve_bench"));
  DMOE_ASSIGN_OR_RETURN(int64_t prefix_len, a.IntIn("prefix-len", 1, 1 << 20, "serve_bench"));
  w.num_prefixes = static_cast<int>(prefixes);
  w.prefix_len = static_cast<int>(prefix_len);
  w.ignore_eos = !a.Bool("no-ignore-eos");
  DMOE_ASSIGN_OR_RETURN(int64_t cap, a.IntIn("max-tokens", 0, 1 << 20, "serve_bench"));
  w.max_tokens_cap = static_cast<int>(cap);
  LoadSpec& l = o.load;
  DMOE_ASSIGN_OR_RETURN(int64_t c, a.IntIn("concurrency", 1, 4096, "serve_bench"));
  DMOE_ASSIGN_OR_RETURN(double rate, a.Double("rate"));
  if (rate < 0) return absl::InvalidArgumentError("--rate: must be >= 0");
  DMOE_ASSIGN_OR_RETURN(int64_t n, a.IntIn("num-requests", 0, 10000000, "serve_bench"));
  DMOE_ASSIGN_OR_RETURN(double duration, a.Double("duration-s"));
  l.concurrency = static_cast<int>(c);
  l.rate = rate;
  l.mode = rate > 0 ? LoadSpec::Mode::kOpen : LoadSpec::Mode::kClosed;
  l.num_requests = static_cast<int>(n);
  l.duration_s = duration;
  if (l.num_requests == 0 && l.duration_s <= 0) l.num_requests = std::max(8, 4 * l.concurrency);
  l.warmup_requests = -1;
  if (a.Has("warmup-requests")) {
    DMOE_ASSIGN_OR_RETURN(int64_t wu, a.IntIn("warmup-requests", 0, 100000, "serve_bench"));
    l.warmup_requests = static_cast<int>(wu);
  }
  DMOE_ASSIGN_OR_RETURN(l.timeout_s, a.Double("timeout-s"));
  if (a.Has("sweep-concurrency") && a.Has("sweep-rate")) {
    return absl::InvalidArgumentError("--sweep-concurrency and --sweep-rate exclude each other");
  }
  if (a.Has("sweep-concurrency")) {
    DMOE_ASSIGN_OR_RETURN(o.sweep, ParseDoubles("sweep-concurrency", a.Str("sweep-concurrency")));
  } else if (a.Has("sweep-rate")) {
    DMOE_ASSIGN_OR_RETURN(o.sweep, ParseDoubles("sweep-rate", a.Str("sweep-rate")));
    o.sweep_rate = true;
  }
  DMOE_ASSIGN_OR_RETURN(o.slo.ttft_ms, a.Double("slo-ttft-ms"));
  DMOE_ASSIGN_OR_RETURN(o.slo.tpot_ms, a.Double("slo-tpot-ms"));
  o.json_path = a.Str("json");
  o.plot_path = a.Str("plot");
  o.dump_path = a.Str("dump-requests");
  o.ceilings = !a.Bool("no-ceilings");
  DMOE_ASSIGN_OR_RETURN(int64_t ct, a.IntIn("ceiling-threads", 0, 1024, "serve_bench"));
  o.ceiling_threads = static_cast<int>(ct);
  DMOE_ASSIGN_OR_RETURN(int64_t seed, a.Int("seed"));
  o.seed = static_cast<uint64_t>(seed);
  if (a.Bool("quick")) {
    // Tiny model, one process vs two expert servers, two load points.
    if (!a.Has("compare") || a.Str("compare") == "one:servers=0") {
      o.configs.clear();
      o.configs.push_back(*ParseClusterConfig("one:servers=0,threads=1"));
      o.configs.push_back(*ParseClusterConfig("disagg:servers=2,threads=1"));
    }
    if (o.sweep.empty()) o.sweep = {1, 4};
    w.input.mean = std::min(w.input.mean, 32.0);
    w.output.mean = std::min(w.output.mean, 8.0);
    l.num_requests = 12;
    l.duration_s = 0;
    o.ceilings = false;
  }
  if (o.configs.empty()) return absl::InvalidArgumentError("--compare: no configuration");
  if (!o.url.empty() && !a.Has("model")) {
    return absl::InvalidArgumentError(
        "--url needs --model DIR (the served checkpoint: vocabulary and weight bytes)");
  }
  return o;
}

std::string Ms(const Dist& d) {
  return d.n == 0 ? "-" : absl::StrFormat("%.1f/%.1f/%.1f", d.p50, d.p90, d.p99);
}

void PrintPoint(const Point& p, bool header) {
  if (header) {
    std::printf("\n%-10s %-12s %5s %5s %7s %8s %8s %20s %20s %14s %14s %8s\n", "config", "load",
                "done", "fail", "req/s", "in tok/s", "out tok/s", "TTFT p50/p90/p99 ms",
                "TPOT p50/p90/p99 ms", "ITL p50/p99", "E2E p50/p99", "goodput");
  }
  const Summary& s = p.summary;
  const std::string load = p.load.mode == LoadSpec::Mode::kClosed
                               ? absl::StrCat("c=", p.load.concurrency)
                               : absl::StrFormat("r=%g/s", p.load.rate);
  std::printf("%-10s %-12s %5d %5d %7.2f %8.1f %8.1f %20s %20s %14s %14s %8.2f\n", p.config.c_str(),
              load.c_str(), s.completed, s.failed, s.req_per_s, s.input_tok_per_s,
              s.output_tok_per_s, Ms(s.ttft_ms).c_str(), Ms(s.tpot_ms).c_str(),
              s.itl_ms.n ? absl::StrFormat("%.1f/%.1f", s.itl_ms.p50, s.itl_ms.p99).c_str() : "-",
              s.e2e_ms.n ? absl::StrFormat("%.0f/%.0f", s.e2e_ms.p50, s.e2e_ms.p99).c_str() : "-",
              s.goodput_req_per_s);
  if (s.failed > 0) {
    std::string by;
    for (const auto& [k, v] : s.errors) absl::StrAppend(&by, by.empty() ? "" : ", ", k, ": ", v);
    std::printf("           failed by status: %s; first: %s\n", by.c_str(), s.first_error.c_str());
  }
  std::fflush(stdout);
}

absl::Status Plot(const std::vector<Point>& points, const Options& o) {
  const std::string gnuplot = testing::FindInPath("gnuplot");
  if (gnuplot.empty()) {
    return absl::FailedPreconditionError(
        "--plot needs gnuplot (Debian: gnuplot-nox; tools/setup.sh installs it)");
  }
  const std::string data = o.plot_path + ".dat";
  std::ofstream f(data);
  std::vector<std::string> names;
  for (const Point& p : points) {
    if (std::find(names.begin(), names.end(), p.config) == names.end()) names.push_back(p.config);
  }
  for (const std::string& name : names) {
    f << "# " << name << "\n";
    for (const Point& p : points) {
      if (p.config != name) continue;
      f << p.summary.output_tok_per_s << ' ' << p.summary.tpot_ms.p50 << ' '
        << p.summary.ttft_ms.p50 << ' ' << p.summary.tpot_ms.p99 << ' ' << p.summary.ttft_ms.p99
        << ' ' << (o.sweep_rate ? p.load.rate : p.load.concurrency) << "\n";
    }
    f << "\n\n";
  }
  f.close();
  std::string script =
      absl::StrCat("set terminal png size 1200,500 noenhanced\nset output '", o.plot_path,
                   "'\nset multiplot layout 1,2 title 'serve_bench: ", o.workload.Describe(),
                   "'\nset grid\nset key top left\nset xlabel 'output tokens/s'\n"
                   "set ylabel 'TPOT p50 (ms)'\nplot ");
  for (size_t i = 0; i < names.size(); ++i) {
    absl::StrAppend(&script, i ? ", " : "", "'", data, "' index ", i,
                    " using 1:2 with linespoints title '", names[i], "'");
  }
  absl::StrAppend(&script, "\nset ylabel 'TTFT p50 (ms)'\nset logscale y\nplot ");
  for (size_t i = 0; i < names.size(); ++i) {
    absl::StrAppend(&script, i ? ", " : "", "'", data, "' index ", i,
                    " using 1:3 with linespoints title '", names[i], "'");
  }
  absl::StrAppend(&script, "\nunset multiplot\n");
  testing::RunOptions ro;
  ro.input = script;
  const testing::RunResult r = testing::RunCommand({gnuplot}, ro);
  if (r.code != 0) return absl::InternalError("gnuplot failed: " + r.err);
  return absl::OkStatus();
}

int Main(int argc, char** argv) {
  absl::StatusOr<Options> parsed = ParseOptions(argc, argv);
  if (!parsed.ok()) Die(parsed.status());
  Options o = *std::move(parsed);
  const std::string bin_dir = BinDir();

  // The model: given, or generated once per preset and layer count.
  std::string model = o.model;
  if (model.empty()) {
    const std::string dir = absl::StrCat(o.work_dir, "/model-", o.preset,
                                         o.layers > 0 ? absl::StrCat("-", o.layers, "l") : "");
    std::fprintf(stderr, "serve_bench: model %s (dmoe make-model --preset %s)\n", dir.c_str(),
                 o.preset.c_str());
    absl::StatusOr<std::string> made = EnsureModel(bin_dir, o.preset, o.layers, dir);
    if (!made.ok()) Die(made.status());
    model = *made;
  }
  const int elem_bytes = o.configs[0].dtype == "f32" ? 4 : 2;
  absl::StatusOr<TokenCostInfo> cost = TokenCost(model, elem_bytes);
  if (!cost.ok()) Die(cost.status());
  o.workload.vocab = cost->vocab;

  json out;
  const std::string isa = core::IsaName(core::ActiveIsa());
  const unsigned cores = std::thread::hardware_concurrency();
  out["host"] = {{"isa", isa}, {"cores", cores}};
  out["model"] = {{"dir", model},
                  {"summary", cost->summary},
                  {"decode_bytes_per_token", cost->decode_bytes},
                  {"active_weights_per_token", cost->active_weights}};
  out["workload"] = o.workload.Describe();
  std::printf(
      "serve_bench on %u cores, ISA %s\nmodel %s: %s\n  one decode step reads %.1f MB "
      "of weights (%s)\nworkload: %s\n",
      cores, isa.c_str(), model.c_str(), cost->summary.c_str(), cost->decode_bytes / 1e6,
      elem_bytes == 2 ? "bf16" : "f32", o.workload.Describe().c_str());

  double read_gbs = 0, gemm_gflops = 0;
  const int ceiling_threads = o.ceiling_threads > 0 ? o.ceiling_threads : static_cast<int>(cores);
  // Measured before the load (nothing else runs then) and again after it; the
  // better of the two is the ceiling, so a noisy neighbour during one
  // measurement does not make the bound look easy.
  auto measure_ceilings = [&](const char* when) {
    HostCeilings ceilings(elem_bytes == 2 ? core::ComputeType::kBF16 : core::ComputeType::kF32);
    const double r = ceilings.ReadGBs(ceiling_threads, 6);
    const double g = ceilings.GemmGflops(3);
    ceilings.FreeProbe();
    std::printf("ceilings %s the load (%d threads): read %.1f GB/s, GEMM %.1f GFLOP/s\n", when,
                ceiling_threads, r, g);
    out["ceilings"][when] = {{"read_gb_s", r}, {"gemm_gflop_s", g}};
    read_gbs = std::max(read_gbs, r);
    gemm_gflops = std::max(gemm_gflops, g);
  };
  if (o.ceilings) {
    out["ceilings"] = {{"threads", ceiling_threads}};
    measure_ceilings("before");
  }

  // The load points.
  std::vector<LoadSpec> loads;
  if (o.sweep.empty()) {
    loads.push_back(o.load);
  } else {
    for (double v : o.sweep) {
      LoadSpec l = o.load;
      if (o.sweep_rate) {
        l.mode = LoadSpec::Mode::kOpen;
        l.rate = v;
        if (l.concurrency < 64) l.concurrency = 256;
      } else {
        l.concurrency = static_cast<int>(v);
        if (o.load.num_requests > 0 && o.load.duration_s <= 0) {
          l.num_requests = std::max(o.load.num_requests, 2 * l.concurrency);
        }
      }
      loads.push_back(l);
    }
  }
  for (LoadSpec& l : loads) {
    if (l.warmup_requests < 0) l.warmup_requests = std::max(1, std::min(l.concurrency, 32));
    l.seed = o.seed;
  }
  // Distinct requests; longer runs send them again in order.
  constexpr int kDistinctRequests = 4096;
  absl::StatusOr<std::vector<RequestSpec>> requests =
      Generate(o.workload, kDistinctRequests, o.seed);
  if (!requests.ok()) Die(requests.status());

  if (!o.dump_path.empty()) {
    const LoadSpec& first = loads.front();
    const size_t n = first.num_requests > 0
                         ? static_cast<size_t>(first.warmup_requests + first.num_requests)
                         : requests->size();
    std::ofstream dump(o.dump_path);
    for (size_t i = 0; i < n; ++i) {
      const RequestSpec& r = (*requests)[i % requests->size()];
      dump << json{{"path", r.path},
                   {"body", r.body},
                   {"warmup", i < static_cast<size_t>(first.warmup_requests)}}
                  .dump()
           << "\n";
    }
  }

  std::vector<Point> points;
  std::vector<ClusterConfig> configs = o.configs;
  if (!o.url.empty()) {
    configs.assign(1, ClusterConfig());
    configs[0].name = "url";
  }
  bool header = true;
  for (const ClusterConfig& c : configs) {
    LocalCluster cluster(bin_dir);
    Target target;
    std::string metrics_host = "127.0.0.1";
    int metrics_port = 0;
    if (o.url.empty()) {
      std::fprintf(stderr, "serve_bench: starting %s\n", c.Describe().c_str());
      absl::StatusOr<int> port = cluster.Start(c, model, o.work_dir);
      if (!port.ok()) Die(port.status());
      target.port = *port;
      metrics_port = cluster.router_metrics_port();
    } else {
      if (!SplitHostPort(o.url, &target.host, &target.port)) {
        Die(absl::InvalidArgumentError("--url: expected HOST:PORT, got " + o.url));
      }
      if (!o.router_metrics.empty() &&
          !SplitHostPort(o.router_metrics, &metrics_host, &metrics_port)) {
        Die(absl::InvalidArgumentError("--router-metrics: expected HOST:PORT, got " +
                                       o.router_metrics));
      }
    }
    for (const LoadSpec& l : loads) {
      LoadSpec run = l;
      run.progress = true;
      std::fprintf(stderr, "serve_bench: %s: %s\n", c.name.c_str(), run.Describe().c_str());
      const StageCounters before = ScrapeStages(metrics_host, metrics_port);
      RouterSampler sampler;
      sampler.Start(metrics_host, metrics_port, std::chrono::milliseconds(250));
      std::vector<RequestRecord> records = RunLoad(target, *requests, run);
      RouterSample router = sampler.Stop();
      const StageCounters after = ScrapeStages(metrics_host, metrics_port);
      const std::vector<RequestRecord> measured(
          records.begin() + std::min<size_t>(records.size(), run.warmup_requests), records.end());
      Point p{c.name,
              l,
              Summarize(measured, o.slo),
              Delta(after, before),
              std::move(router),
              run.mode == LoadSpec::Mode::kClosed
                  ? SteadyOutputRate(records, static_cast<size_t>(run.warmup_requests))
                  : SteadyRate()};
      PrintPoint(p, header);
      if (run.mode == LoadSpec::Mode::kClosed && p.steady.window_s == 0) {
        std::printf(
            "  steady state: under 10 s between the %d-th completion and the last request's "
            "start; more requests measure it\n",
            run.warmup_requests);
      } else if (p.steady.window_s > 0) {
        std::printf(
            "  steady state (from the %d-th completion to the last request's start, %.0f s): "
            "%.1f output tok/s\n",
            run.warmup_requests, p.steady.window_s, p.steady.output_tok_per_s);
      }
      std::printf("%s", p.router.Format().c_str());
      // (Warm-up included: the counters cannot tell its steps apart.)
      const std::string breakdown = Format(p.stages);
      if (!breakdown.empty()) std::printf("  router steps of this run:\n%s", breakdown.c_str());
      std::fflush(stdout);
      header = false;
      points.push_back(std::move(p));
    }
    cluster.Stop();
  }

  // Ratios to the first configuration, per load point; the bandwidth bound at c=1.
  json runs = json::array();
  for (const Point& p : points) {
    runs.push_back({{"config", p.config},
                    {"mode", p.load.mode == LoadSpec::Mode::kClosed ? "closed" : "open"},
                    {"concurrency", p.load.concurrency},
                    {"rate", p.load.rate},
                    {"summary", ToJson(p.summary)},
                    {"router_steps", ToJson(p.stages)},
                    {"router", p.router.ToJson()},
                    {"steady",
                     {{"begin_s", p.steady.begin_s},
                      {"window_s", p.steady.window_s},
                      {"tokens", p.steady.tokens},
                      {"output_tok_s", p.steady.output_tok_per_s}}}});
  }
  out["runs"] = runs;
  json ratios = json::array();
  if (configs.size() > 1) {
    std::printf(
        "\nratios to %s (same load point): output tok/s, TPOT p50, TTFT p50, mean active "
        "sequences, steady-state output tok/s\n",
        configs[0].name.c_str());
    for (size_t i = loads.size(); i < points.size(); ++i) {
      const Point& p = points[i];
      const Point& base = points[i % loads.size()];
      auto ratio = [](double a, double b) { return b > 0 ? a / b : 0.0; };
      const double thr = ratio(p.summary.output_tok_per_s, base.summary.output_tok_per_s);
      const double tpot = ratio(p.summary.tpot_ms.p50, base.summary.tpot_ms.p50);
      const double ttft = ratio(p.summary.ttft_ms.p50, base.summary.ttft_ms.p50);
      auto active = [](const Point& q) {
        auto it = q.router.mean.find("moe_router_active_sequences");
        return it == q.router.mean.end() ? 0.0 : it->second;
      };
      const double seqs = ratio(active(p), active(base));
      const double steady = ratio(p.steady.output_tok_per_s, base.steady.output_tok_per_s);
      std::printf("  %-10s c=%-4d  %.3f  %.3f  %.3f  %.3f  %.3f\n", p.config.c_str(),
                  p.load.concurrency, thr, tpot, ttft, seqs, steady);
      ratios.push_back({{"config", p.config},
                        {"baseline", base.config},
                        {"concurrency", p.load.concurrency},
                        {"rate", p.load.rate},
                        {"output_tok_s", thr},
                        {"tpot_p50", tpot},
                        {"ttft_p50", ttft},
                        {"active_sequences", seqs},
                        {"steady_output_tok_s", steady}});
    }
  }
  out["ratios"] = ratios;
  if (o.ceilings) {
    measure_ceilings("after");
    const double bound_ms = cost->decode_bytes / (read_gbs * 1e9) * 1e3;
    std::printf(
        "ceilings (best of before and after): read %.1f GB/s, GEMM %.1f GFLOP/s -> TPOT bound "
        "%.2f ms (weights of one step / read bandwidth)\n",
        read_gbs, gemm_gflops, bound_ms);
    out["ceilings"]["read_gb_s"] = read_gbs;
    out["ceilings"]["gemm_gflop_s"] = gemm_gflops;
    out["ceilings"]["tpot_bound_ms"] = bound_ms;
  }
  if (read_gbs > 0) {
    const double bound_ms = cost->decode_bytes / (read_gbs * 1e9) * 1e3;
    json bounds = json::array();
    for (const Point& p : points) {
      if (p.load.mode != LoadSpec::Mode::kClosed || p.load.concurrency != 1) continue;
      if (p.summary.tpot_ms.n == 0) continue;
      const double frac = bound_ms / p.summary.tpot_ms.p50;
      // Prefill: prompt tokens over TTFT at c=1, each 2 x (active weights but
      // the output head, which runs for the last row only) FLOPs.
      const double prefill_tok_s =
          p.summary.ttft_ms.p50 > 0 ? o.workload.input.mean / (p.summary.ttft_ms.p50 / 1e3) : 0;
      const double prefill_frac =
          gemm_gflops > 0 ? prefill_tok_s * 2 * (cost->active_weights - cost->head_weights) /
                                (gemm_gflops * 1e9)
                          : 0;
      std::printf(
          "%s at c=1: TPOT p50 %.1f ms = %.2f x the bandwidth bound (%.0f%% of it); "
          "prefill %.0f tok/s = %.0f%% of the GEMM ceiling\n",
          p.config.c_str(), p.summary.tpot_ms.p50, p.summary.tpot_ms.p50 / bound_ms, 100 * frac,
          prefill_tok_s, 100 * prefill_frac);
      bounds.push_back({{"config", p.config},
                        {"tpot_p50_ms", p.summary.tpot_ms.p50},
                        {"tpot_bound_ms", bound_ms},
                        {"fraction_of_bound", frac},
                        {"prefill_tok_s", prefill_tok_s},
                        {"prefill_fraction_of_gemm_ceiling", prefill_frac}});
    }
    out["bounds"] = bounds;
  }
  if (!o.json_path.empty()) {
    std::ofstream(o.json_path) << out.dump(2) << "\n";
    std::fprintf(stderr, "serve_bench: wrote %s\n", o.json_path.c_str());
  }
  std::fflush(stdout);  // before gnuplot's fork
  if (!o.plot_path.empty()) {
    const absl::Status st = Plot(points, o);
    if (!st.ok()) Die(st);
    std::fprintf(stderr, "serve_bench: wrote %s\n", o.plot_path.c_str());
  }
  int failed = 0;
  for (const Point& p : points) failed += p.summary.failed;
  if (failed > 0) {
    std::fprintf(stderr, "serve_bench: %d requests failed\n", failed);
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace dmoe::bench::serve

int main(int argc, char** argv) { return dmoe::bench::serve::Main(argc, argv); }
