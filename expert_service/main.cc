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

#include <cstdio>
#include <cstring>
#include <memory>
#include <optional>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/args.h"
#include "common/metrics_endpoint.h"
#include "common/service_main.h"
#include "core/config.h"
#include "core/isa.h"
#include "expert_service/expert_metrics.h"
#include "expert_service/expert_options.h"
#include "expert_service/expert_server.h"
#include "expert_service/joiner.h"
#include "expert_service/raw_echo.h"
#include "prometheus/registry.h"

namespace {

constexpr const char* kName = dmoe::expert::kExpertProgram;

int Fail(int code, const std::string& message) {
  std::fprintf(stderr, "%s: %s\n", kName, message.c_str());
  return code;
}
int Fail(const absl::Status& st) {  // InvalidArgument: a usage error
  return Fail(st.code() == absl::StatusCode::kInvalidArgument ? 2 : 1, std::string(st.message()));
}

}  // namespace

int main(int argc, char** argv) {
  using namespace dmoe;  // NOLINT
  // SIGTERM/SIGINT are blocked in every thread (threads inherit the mask, so
  // this comes before any is started) and taken by sigwait below.
  sigset_t stop_signals = common::BlockStopSignals();
  common::CapMallocThreadCaches();
  if (absl::Status st = core::CheckAndLogIsa(kName); !st.ok())
    return Fail(2, std::string(st.message()));
  common::Args args = expert::ExpertArgs();
  if (std::optional<int> exit = common::ParseFlagsOrExit(args, argc, argv)) return *exit;
  absl::StatusOr<expert::ExpertMainOptions> o = expert::ExpertOptionsFromFlags(args);
  if (!o.ok()) return Fail(2, std::string(o.status().message()));
  auto cfg = core::ModelConfig::FromFile(o->model_dir + "/config.json");
  if (!cfg.ok()) return Fail(1, absl::StrCat("model ", o->model_dir, ": ", cfg.status().message()));
  absl::StatusOr<place::Placement> placement = expert::ExpertPlacement(*o, *cfg);
  if (!placement.ok()) return Fail(placement.status());
  expert::ExpertServerOptions options = expert::ToServerOptions(*o, *std::move(placement));
  // Outlive the server, which reports to them.
  auto registry = std::make_shared<prometheus::Registry>();
  expert::ExpertMetricsOptions metrics_options;
  metrics_options.per_expert = o->per_expert_metrics;
  metrics_options.format = o->compute == core::ComputeType::kF32    ? "f32"
                           : o->compute == core::ComputeType::kInt8 ? "int8"
                                                                    : "bf16";
  expert::ExpertMetrics metrics(*registry, *cfg, metrics_options);
  options.metrics = &metrics;

  auto server = expert::ExpertServer::Create(std::move(options));
  if (!server.ok()) return Fail(1, std::string(server.status().message()));
  if (absl::Status st = (*server)->Start(o->host, static_cast<int>(o->port)); !st.ok()) {
    return Fail(1, std::string(st.message()));
  }
  const int bound = (*server)->port();
  auto stop_and_fail = [&](const absl::Status& st) {
    (*server)->Shutdown(absl::ZeroDuration());
    return Fail(1, std::string(st.message()));
  };
  // Benchmarking aid; up before --port-file is written, so that a watcher of
  // that file finds both.
  std::unique_ptr<expert::RawEchoServer> echo;
  if (o->raw_echo()) {
    auto e = expert::RawEchoServer::Start({.port = static_cast<int>(o->echo_port)});
    if (!e.ok()) return stop_and_fail(e.status());
    echo = *std::move(e);
    if (!o->echo_port_file.empty()) {
      if (absl::Status st = common::WritePortFile(o->echo_port_file, echo->port()); !st.ok()) {
        return stop_and_fail(st);
      }
    }
    std::fprintf(stderr, "%s: raw TCP echo (benchmarking aid) on 127.0.0.1:%d\n", kName,
                 echo->port());
  }
  // Also up before --port-file is written.
  auto metrics_endpoint =
      common::ServeMetrics(kName, o->metrics_host, static_cast<int>(o->metrics_port),
                           o->metrics_port_given, o->metrics_port_file, registry);
  if (!metrics_endpoint.ok()) return stop_and_fail(metrics_endpoint.status());
  if (*metrics_endpoint != nullptr) {
    std::fprintf(stderr, "%s: metrics on http://%s:%d/metrics\n", kName, o->metrics_host.c_str(),
                 (*metrics_endpoint)->port());
  }
  if (!o->port_file.empty()) {
    if (absl::Status st = common::WritePortFile(o->port_file, bound); !st.ok()) {
      return stop_and_fail(st);
    }
  }
  if (o->joining()) {
    std::fprintf(stderr, "%s: serving no routed slots yet (joining via %s) on %s:%d\n", kName,
                 o->join->c_str(), o->host.c_str(), bound);
  } else {
    std::fprintf(stderr, "%s: serving %lld slots (%s MiB) for server %d/%d on %s:%d\n", kName,
                 static_cast<long long>((*server)->num_slots()),
                 absl::StrFormat("%.1f", (*server)->resident_weight_bytes() / 1048576.0).c_str(),
                 (*server)->server_index(), (*server)->num_servers(), o->host.c_str(), bound);
  }
  std::fflush(stderr);
  std::unique_ptr<expert::Joiner> joiner;
  if (o->joining()) {
    joiner = std::make_unique<expert::Joiner>(*o->join, expert::AdvertiseAddress(*o, bound));
  }

  int sig = 0;
  while (sigwait(&stop_signals, &sig) != 0) {
  }
  if (joiner) joiner->Stop();
  expert::LeaveBeforeStop(**server, *o, stop_signals, &sig);
  std::fprintf(stderr, "%s: %s, draining\n", kName, strsignal(sig));
  if (echo) echo->Stop();
  (*server)->Shutdown(absl::Seconds(o->drain_s));
  std::fprintf(stderr, "%s: stopped\n", kName);
  return 0;
}
