// dmoe-expert: one expert server process (see expert_server.h).
//
//   dmoe-expert --model DIR --server-index I (--num-servers N | --placement
//   FILE)
//               [--host 127.0.0.1] [--port P] [--dtype f32|bf16] [--threads N]
//               [--backend cpu|cuda|auto]
//               [--max-queue 256] [--max-batch-tokens 8192] [--port-file PATH]
//               [--drain-timeout-s 30]
//               [--raw-echo-port P] [--raw-echo-port-file PATH]
//               [--metrics-host 127.0.0.1] [--metrics-port 9191]
//               [--metrics-port-file PATH] [--expert-metrics per-expert]
//
// SIGTERM is scale-in: with --leave-timeout-s the server first reports
// 'leaving' until the controller moved its slots away. SIGINT stops without
// leaving (a whole-cluster stop, where the controller is gone too), and so
// does a second signal during the leave. A leave the controller refuses (the
// others cannot hold this server's experts) keeps the server serving past the
// timeout unless --force-leave.
//
// Exit status: 0 after SIGTERM/SIGINT and a clean drain, 1 when the model or
// placement cannot be loaded or the address (or an explicit --metrics-port)
// cannot be bound, 2 for bad flags.
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/config.h"
#include "core/placement.h"
#include "expert_service/expert_metrics.h"
#include "expert_service/expert_server.h"
#include "expert_service/joiner.h"
#include "expert_service/raw_echo.h"
#include "prometheus/registry.h"
#include "tools/args.h"
#include "tools/metrics_endpoint.h"
#include "tools/service_main.h"

namespace {

constexpr char kName[] = "dmoe-expert";

int Fail(int code, const std::string& message) {
  std::fprintf(stderr, "%s: %s\n", kName, message.c_str());
  return code;
}

dmoe::tools::Args MakeArgs() {
  dmoe::tools::Args a(
      kName,
      "serves the routed experts its placement gives it, plus the shared "
      "experts,\n"
      "  as dmoe.v1.ExpertService (with gRPC health and reflection). SIGTERM "
      "or\n"
      "  SIGINT: stop taking streams, answer what was received, exit 0\n"
      "  (SIGTERM leaves first with --leave-timeout-s; SIGINT does not).");
  a.Flag("model", "DIR", "model directory (config.json + *.safetensors)",
         std::nullopt, true)
      .Flag("server-index", "I",
            "this server's index in the placement (required without --join)")
      .Flag("num-servers", "N",
            "contiguous placement over N servers (version 1)")
      .Flag("placement", "FILE", "placement JSON (instead of --num-servers)")
      .Flag("host", "HOST", "address to listen on", "127.0.0.1")
      .Flag("port", "P", "port to listen on; 0 = any free port", "50061")
      .Flag("dtype", "f32|bf16", "expert compute type", "bf16")
      .Flag("threads", "N", "compute threads; 0 = all cores", "0")
      .Flag("backend", "cpu|cuda|auto",
            "expert compute backend: cpu; cuda (every visible GPU; exit 1 "
            "without one or in a build without CUDA); auto = cuda when this "
            "build has CUDA and a GPU is visible, else cpu",
            "cpu")
      .Flag("max-queue", "N",
            "requests waiting for compute before RESOURCE_EXHAUSTED", "256")
      .Flag("max-batch-tokens", "N", "tokens per batched expert computation",
            "8192")
      .Flag("port-file", "PATH", "write the bound port here once listening")
      .Flag("drain-timeout-s", "S",
            "on SIGTERM, cancel streams still busy after S seconds", "30")
      .Flag("raw-echo-port", "P",
            "benchmarking aid: raw TCP echo of framed messages on "
            "127.0.0.1:P, the floor wire_bench compares gRPC with "
            "(expert_service/raw_echo.h); 0 = off unless --raw-echo-port-file",
            "0")
      .Flag("raw-echo-port-file", "PATH",
            "start the raw TCP echo (any free port when --raw-echo-port is 0) "
            "and write its port here")
      .Flag("metrics-host", "HOST",
            "address of the Prometheus /metrics endpoint (0.0.0.0 in a pod)",
            "127.0.0.1")
      .Flag("metrics-port", "P",
            "port of /metrics (0 = any free port); when the default is taken "
            "(several servers on one host) the server runs without /metrics "
            "and says so",
            "9191")
      .Flag("metrics-port-file", "PATH",
            "write the bound metrics port here once listening")
      .Flag("expert-metrics", "per-expert|per-layer",
            "slot-token series per (layer, expert), or per layer "
            "(expert=\"all\") to bound cardinality",
            "per-expert")
      .Flag("join", "ROUTER",
            "scale-out: start with no routed slots and ask the placement "
            "controller of ROUTER (HOST:PORT, a dmoe-router --controller) "
            "for slots (instead of --num-servers / --placement)")
      .Flag("advertise", "HOST:PORT",
            "the address routers reach this server at (default: --host, or "
            "the hostname when --host is a wildcard, and the bound port)")
      .Flag("leave-timeout-s", "S",
            "scale-in: on SIGTERM, first report 'leaving' and keep serving "
            "until the placement controller has moved this server's slots "
            "away, at most S seconds (0 = drain at once; default 60 with "
            "--join, else 0). SIGINT (whole-cluster stop, Ctrl-C) or a "
            "second signal skips the leave. When the controller refuses the "
            "leave (the other servers cannot hold this server's experts: "
            "leaving would leave an expert with no server), the server keeps "
            "serving past S until its slots can move (e.g. a server joins), "
            "unless --force-leave")
      .Flag("force-leave", "",
            "scale-in: exit at --leave-timeout-s even when the controller "
            "refused the leave (experts only this server holds then have no "
            "server: their requests fail until one joins)");
  return a;
}

}  // namespace

int main(int argc, char** argv) {
  // SIGTERM/SIGINT are blocked in every thread (threads inherit the mask, so
  // this comes before any is started) and taken by sigwait below.
  sigset_t stop_signals = dmoe::tools::BlockStopSignals();
  dmoe::tools::CapMallocThreadCaches();
  if (absl::Status st = dmoe::tools::CheckAndLogIsa(kName); !st.ok()) {
    std::fprintf(stderr, "%s: %s\n", kName, std::string(st.message()).c_str());
    return 2;
  }

  dmoe::tools::Args args = MakeArgs();
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--help") == 0 ||
        std::strcmp(argv[i], "-h") == 0) {
      // Args::Usage says "usage: dmoe <command>"; this binary is not a
      // subcommand.
      std::string usage = args.Usage();
      const std::string wrong = absl::StrCat("usage: dmoe ", kName);
      if (usage.rfind(wrong, 0) == 0)
        usage = absl::StrCat("usage: ", kName, usage.substr(wrong.size()));
      std::fputs(usage.c_str(), stdout);
      return 0;
    }
  }
  if (absl::Status st = args.Parse(argc, argv, 1); !st.ok()) {
    std::fprintf(stderr, "%s\n", std::string(st.message()).c_str());
    return 2;
  }
  const bool join = args.Has("join");
  if (join && (args.Has("num-servers") || args.Has("placement"))) {
    return Fail(2, "--join starts with no slots: give no --num-servers or --placement");
  }
  if (!join && args.Has("num-servers") == args.Has("placement")) {
    return Fail(
        2, "give exactly one of --num-servers and --placement (see --help)");
  }
  if (!join && !args.Has("server-index")) {
    return Fail(2, "--server-index is required (unless --join)");
  }
  const bool force_leave = args.Bool("force-leave");
  int64_t leave_s = join ? 60 : 0;
  if (args.Has("leave-timeout-s")) {
    auto v = args.Int("leave-timeout-s");
    if (!v.ok()) return Fail(2, std::string(v.status().message()));
    leave_s = *v;
    if (leave_s < 0) return Fail(2, absl::StrCat("--leave-timeout-s must be >= 0, got ", leave_s));
  }
  int64_t server_index = 0, num_servers = 0, port = 0, threads = 0,
          max_queue = 0, max_batch_tokens = 0, drain_s = 0, echo_port = 0,
          metrics_port = 0;
  if (args.Has("server-index")) {
    auto v = args.Int("server-index");
    if (!v.ok()) return Fail(2, std::string(v.status().message()));
    server_index = *v;
  }
  for (auto [name, out] : {std::pair{"port", &port},
                           {"metrics-port", &metrics_port},
                           {"raw-echo-port", &echo_port},
                           {"threads", &threads},
                           {"max-queue", &max_queue},
                           {"max-batch-tokens", &max_batch_tokens},
                           {"drain-timeout-s", &drain_s}}) {
    auto v = args.Int(name);
    if (!v.ok()) return Fail(2, std::string(v.status().message()));
    *out = *v;
  }
  if (args.Has("num-servers")) {
    auto v = args.Int("num-servers");
    if (!v.ok()) return Fail(2, std::string(v.status().message()));
    num_servers = *v;
    if (num_servers < 1)
      return Fail(
          2, absl::StrCat("--num-servers must be >= 1, got ", num_servers));
  }
  if (server_index < 0)
    return Fail(
        2, absl::StrCat("--server-index must be >= 0, got ", server_index));
  if (port < 0 || port > 65535)
    return Fail(2, absl::StrCat("--port must be in [0, 65535], got ", port));
  if (metrics_port < 0 || metrics_port > 65535) {
    return Fail(2, absl::StrCat("--metrics-port must be in [0, 65535], got ",
                                metrics_port));
  }
  const std::string metrics_host = args.Str("metrics-host");
  if (metrics_host.empty()) return Fail(2, "--metrics-host is empty");
  const absl::StatusOr<bool> per_expert_metrics =
      dmoe::tools::ParseExpertMetricsFlag(args.Str("expert-metrics"));
  if (!per_expert_metrics.ok()) {
    return Fail(2, std::string(per_expert_metrics.status().message()));
  }
  if (echo_port < 0 || echo_port > 65535) {
    return Fail(2, absl::StrCat("--raw-echo-port must be in [0, 65535], got ",
                                echo_port));
  }
  if (threads < 0)
    return Fail(2, absl::StrCat("--threads must be >= 0, got ", threads));
  if (max_queue < 1)
    return Fail(2, absl::StrCat("--max-queue must be >= 1, got ", max_queue));
  if (max_batch_tokens < 1) {
    return Fail(2, absl::StrCat("--max-batch-tokens must be >= 1, got ",
                                max_batch_tokens));
  }
  if (drain_s < 0)
    return Fail(2,
                absl::StrCat("--drain-timeout-s must be >= 0, got ", drain_s));
  dmoe::core::ComputeType compute;
  const std::string dtype = args.Str("dtype");
  if (dtype == "f32") {
    compute = dmoe::core::ComputeType::kF32;
  } else if (dtype == "bf16") {
    compute = dmoe::core::ComputeType::kBF16;
  } else {
    return Fail(2,
                absl::StrCat("--dtype must be f32 or bf16, got '", dtype, "'"));
  }

  using BackendKind = dmoe::expert::ExpertServerOptions::Backend;
  BackendKind backend_kind;
  const std::string backend_flag = args.Str("backend");
  if (backend_flag == "cpu") {
    backend_kind = BackendKind::kCpu;
  } else if (backend_flag == "cuda") {
    backend_kind = BackendKind::kCuda;
  } else if (backend_flag == "auto") {
    backend_kind = BackendKind::kAuto;
  } else {
    return Fail(2, absl::StrCat("--backend must be cpu, cuda or auto, got '",
                                backend_flag, "'"));
  }

  const std::string model = args.Str("model");
  auto cfg = dmoe::core::ModelConfig::FromFile(model + "/config.json");
  if (!cfg.ok())
    return Fail(1, absl::StrCat("model ", model, ": ", cfg.status().message()));
  dmoe::expert::ExpertServerOptions options;
  if (join) {
    options.start_empty = true;
  } else if (args.Has("placement")) {
    auto p = dmoe::core::Placement::FromFile(args.Str("placement"), *cfg);
    if (!p.ok()) return Fail(1, std::string(p.status().message()));
    options.placement = *std::move(p);
  } else {
    auto p =
        dmoe::core::Placement::Contiguous(*cfg, static_cast<int>(num_servers));
    if (!p.ok()) return Fail(2, std::string(p.status().message()));
    options.placement = *std::move(p);
  }
  if (!join && server_index >= options.placement.num_servers()) {
    return Fail(2, absl::StrCat("--server-index ", server_index,
                                " is outside the placement's ",
                                options.placement.num_servers(), " servers"));
  }
  options.model_dir = model;
  options.server_index = static_cast<int>(server_index);
  options.compute = compute;
  options.backend = backend_kind;
  options.threads = static_cast<int>(threads);
  options.max_queue = static_cast<size_t>(max_queue);
  options.max_batch_tokens = max_batch_tokens;
  // Outlive the server, which reports to them.
  auto registry = std::make_shared<prometheus::Registry>();
  dmoe::expert::ExpertMetrics metrics(*registry, *cfg,
                                      {.per_expert = *per_expert_metrics});
  options.metrics = &metrics;

  auto server = dmoe::expert::ExpertServer::Create(std::move(options));
  if (!server.ok()) return Fail(1, std::string(server.status().message()));
  const std::string host = args.Str("host");
  if (absl::Status st = (*server)->Start(host, static_cast<int>(port));
      !st.ok()) {
    return Fail(1, std::string(st.message()));
  }
  const int bound = (*server)->port();
  // Benchmarking aid; up before --port-file is written, so that a watcher of
  // that file finds both.
  std::unique_ptr<dmoe::expert::RawEchoServer> echo;
  if (echo_port > 0 || args.Has("raw-echo-port-file")) {
    dmoe::expert::RawEchoOptions eo;
    eo.port = static_cast<int>(echo_port);
    auto e = dmoe::expert::RawEchoServer::Start(eo);
    if (!e.ok()) {
      (*server)->Shutdown(absl::ZeroDuration());
      return Fail(1, std::string(e.status().message()));
    }
    echo = *std::move(e);
    if (args.Has("raw-echo-port-file")) {
      if (absl::Status st = dmoe::tools::WritePortFile(
              args.Str("raw-echo-port-file"), echo->port());
          !st.ok()) {
        (*server)->Shutdown(absl::ZeroDuration());
        return Fail(1, std::string(st.message()));
      }
    }
    std::fprintf(stderr,
                 "%s: raw TCP echo (benchmarking aid) on 127.0.0.1:%d\n", kName,
                 echo->port());
  }
  // Also up before --port-file is written.
  auto metrics_endpoint = dmoe::tools::ServeMetrics(
      kName, metrics_host, static_cast<int>(metrics_port),
      args.Has("metrics-port"), args.Str("metrics-port-file"), registry);
  if (!metrics_endpoint.ok()) {
    (*server)->Shutdown(absl::ZeroDuration());
    return Fail(1, std::string(metrics_endpoint.status().message()));
  }
  if (*metrics_endpoint != nullptr) {
    std::fprintf(stderr, "%s: metrics on http://%s:%d/metrics\n", kName,
                 metrics_host.c_str(), (*metrics_endpoint)->port());
  }
  if (args.Has("port-file")) {
    if (absl::Status st =
            dmoe::tools::WritePortFile(args.Str("port-file"), bound);
        !st.ok()) {
      (*server)->Shutdown(absl::ZeroDuration());
      return Fail(1, std::string(st.message()));
    }
  }
  if (join) {
    std::fprintf(stderr, "%s: serving no routed slots yet (joining via %s) on %s:%d\n", kName,
                 args.Str("join").c_str(), host.c_str(), bound);
  } else {
    std::fprintf(
        stderr, "%s: serving %lld slots (%s MiB) for server %d/%d on %s:%d\n",
        kName, static_cast<long long>((*server)->num_slots()),
        absl::StrFormat("%.1f", (*server)->resident_weight_bytes() / 1048576.0)
            .c_str(),
        (*server)->server_index(), (*server)->num_servers(), host.c_str(), bound);
  }
  std::fflush(stderr);
  std::unique_ptr<dmoe::expert::Joiner> joiner;
  if (join) {
    std::string advertise = args.Str("advertise");
    if (advertise.empty()) {
      std::string h = host;
      if (h == "0.0.0.0" || h == "::" || h == "[::]") {
        char name[256] = {};
        gethostname(name, sizeof name - 1);
        h = name;
      }
      advertise = absl::StrCat(h, ":", bound);
    }
    joiner = std::make_unique<dmoe::expert::Joiner>(args.Str("join"), advertise);
  }

  int sig = 0;
  while (sigwait(&stop_signals, &sig) != 0) {
  }
  if (joiner) joiner->Stop();
  // SIGTERM is scale-in (what Kubernetes and `kill` send to one server): leave
  // first. SIGINT is a stop without leaving, for a whole-cluster stop (`dmoe
  // up` sends it once the router is gone) or a Ctrl-C: nobody is left to take
  // the slots, so waiting for a controller would only delay the exit.
  if (sig == SIGTERM && leave_s > 0 && (*server)->num_slots() > 0) {
    std::fprintf(
        stderr,
        "%s: %s, leaving: waiting up to %lld s for the placement controller "
        "to move %lld slots (SIGINT or a second SIGTERM: stop waiting)\n",
        kName, strsignal(sig), static_cast<long long>(leave_s),
        static_cast<long long>((*server)->num_slots()));
    std::fflush(stderr);
    // Leave(0) marks the server leaving and tells whether it is empty; the
    // wait in between takes a further stop signal, which ends the leave.
    // A refused leave (the controller says the others cannot hold this
    // server's experts) outlasts the timeout: exiting would leave those
    // experts with no server, i.e. fail every request (issue 13.3). The server
    // stays until its slots move (the controller retries the leave on every
    // poll), the leave is forced (--force-leave, a second signal), or the
    // orchestrator kills it (Kubernetes: terminationGracePeriodSeconds).
    const absl::Time deadline = absl::Now() + absl::Seconds(leave_s);
    const char* outcome = "leave timeout: still holding slots";
    bool told_refused = false;
    while (true) {
      if ((*server)->Leave(absl::ZeroDuration())) {
        outcome = "slots moved away";
        break;
      }
      const std::string refused = (*server)->leave_refused();
      if (!refused.empty() && !told_refused) {
        told_refused = true;
        std::fprintf(stderr,
                     "%s: leave refused by the placement controller: %s; %s "
                     "(SIGINT or a second SIGTERM forces the exit)\n",
                     kName, refused.c_str(),
                     force_leave ? "--force-leave: exiting at the leave timeout anyway"
                                 : "staying and serving until the slots can move");
        std::fflush(stderr);
      }
      if (absl::Now() >= deadline && (refused.empty() || force_leave)) {
        if (!refused.empty()) outcome = "leave timeout (--force-leave): still holding slots";
        break;
      }
      const timespec poll = {0, 50 * 1000 * 1000};
      if (const int again = sigtimedwait(&stop_signals, nullptr, &poll);
          again > 0) {
        sig = again;
        outcome = "leave interrupted: still holding slots";
        break;
      }
    }
    std::fprintf(stderr, "%s: %s\n", kName, outcome);
  }
  std::fprintf(stderr, "%s: %s, draining\n", kName, strsignal(sig));
  if (echo) echo->Stop();
  (*server)->Shutdown(absl::Seconds(drain_s));
  std::fprintf(stderr, "%s: stopped\n", kName);
  return 0;
}
