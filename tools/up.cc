// `dmoe up`: runs the whole system on this machine — N expert servers, a router
// and a gateway on free loopback ports — waits until each reports its port,
// prints the endpoints, and stops everything on Ctrl-C / SIGTERM. With --demo it
// sends one real completion through the gateway's HTTP API, prints the answer and
// the tokens each expert server computed, and shuts the cluster down.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/args.h"
#include "common/colocation.h"
#include "core/status.h"
#include "nlohmann/json.hpp"
#include "tools/commands.h"
#include "tools/make_model.h"
#include "tools/model_flags.h"

#ifdef DMOE_WITH_SERVICES
#include <grpcpp/grpcpp.h>

#include "dmoe/v1/expert.grpc.pb.h"
#include "dmoe/v1/router.grpc.pb.h"
#endif

namespace dmoe::tools {
namespace {

volatile sig_atomic_t g_stop = 0;
void OnSignal(int) { g_stop = 1; }

struct Child {
  std::string name;
  pid_t pid = -1;
  std::string port_file, log;
  int port = 0;
  // Router and expert servers: their Prometheus /metrics (any free port each,
  // since several run on this host).
  std::string metrics_port_file;
  int metrics_port = 0;
};

std::string SelfDir() {
  std::error_code ec;
  auto p = std::filesystem::read_symlink("/proc/self/exe", ec);
  return ec ? "build/bin" : p.parent_path().string();
}

absl::Status Spawn(Child& c, const std::vector<std::string>& argv) {
  std::remove(c.port_file.c_str());
  const pid_t pid = fork();
  if (pid < 0) return absl::InternalError("fork failed");
  if (pid == 0) {
    setpgid(0, 0);  // the launcher forwards signals; children must not get the tty's Ctrl-C twice
    const int fd = open(c.log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
      dup2(fd, 1);
      dup2(fd, 2);
    }
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execv(args[0], args.data());
    _exit(127);
  }
  c.pid = pid;
  return absl::OkStatus();
}

absl::Status WaitForPort(Child& c, int timeout_s) {
  const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
  while (std::chrono::steady_clock::now() < end && !g_stop) {
    std::ifstream in(c.port_file);
    if (in >> c.port && c.port > 0) return absl::OkStatus();
    if (waitpid(c.pid, nullptr, WNOHANG) == c.pid) {
      c.pid = -1;
      return absl::UnavailableError(absl::StrCat(c.name, " exited during start-up; see ", c.log));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return absl::DeadlineExceededError(
      absl::StrCat(c.name, " did not report a port within ", timeout_s, " s; see ", c.log));
}

// Waits up to `budget` for `c` to exit, then SIGKILLs it.
void Reap(Child& c, std::chrono::steady_clock::duration budget) {
  const auto end = std::chrono::steady_clock::now() + budget;
  while (c.pid > 0) {
    if (waitpid(c.pid, nullptr, WNOHANG) == c.pid) {
      c.pid = -1;
    } else if (std::chrono::steady_clock::now() > end) {
      kill(c.pid, SIGKILL);
      waitpid(c.pid, nullptr, 0);
      c.pid = -1;
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
}

// A whole-cluster stop, front to back, each stage after the one before has
// exited: the gateway (SIGTERM: answers what it has, with router and experts
// still up), then the router (its placement controller goes with it), then the
// expert servers with SIGINT, which drains without the scale-in leave: their
// slots have nowhere to go, and a leave would wait out --leave-timeout-s for a
// controller that is gone. A SIGTERM sent to one expert server by hand still
// leaves gracefully. `children` is in start order: experts, router, gateway.
void StopAll(std::vector<Child>& children) {
  constexpr auto kStageBudget = std::chrono::seconds(15);
  const auto is_expert = [](const Child& c) { return c.name.rfind("expert-", 0) == 0; };
  for (auto it = children.rbegin(); it != children.rend(); ++it) {
    if (is_expert(*it)) continue;
    if (it->pid > 0) kill(it->pid, SIGTERM);
    Reap(*it, kStageBudget);
  }
  for (auto& c : children) {
    if (is_expert(c) && c.pid > 0) kill(c.pid, SIGINT);
  }
  for (auto& c : children) Reap(c, kStageBudget);
}

// Minimal HTTP/1.1 request to 127.0.0.1:port (the demo needs nothing more).
absl::StatusOr<std::string> HttpRequest(int port, const std::string& method,
                                        const std::string& path, const std::string& body) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return absl::InternalError("socket failed");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  timeval tv{120, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return absl::UnavailableError(absl::StrCat("cannot connect to 127.0.0.1:", port));
  }
  const std::string req =
      absl::StrCat(method, " ", path, " HTTP/1.1\r\nHost: 127.0.0.1\r\n",
                   "Content-Type: application/json\r\nContent-Length: ", body.size(),
                   "\r\nConnection: close\r\n\r\n", body);
  if (write(fd, req.data(), req.size()) != static_cast<ssize_t>(req.size())) {
    close(fd);
    return absl::UnavailableError("short write");
  }
  std::string resp;
  char buf[4096];
  ssize_t n;
  while ((n = read(fd, buf, sizeof(buf))) > 0) resp.append(buf, n);
  close(fd);
  const size_t sp = resp.find(' ');
  const size_t hdr_end = resp.find("\r\n\r\n");
  if (sp == std::string::npos || hdr_end == std::string::npos) {
    return absl::InternalError("malformed HTTP response");
  }
  const int code = std::atoi(resp.c_str() + sp + 1);
  std::string payload = resp.substr(hdr_end + 4);
  if (code != 200) {
    return absl::InternalError(absl::StrCat("HTTP ", code, ": ", payload));
  }
  return payload;
}

void PrintExpertTokens(const std::vector<Child>& experts) {
#ifdef DMOE_WITH_SERVICES
  std::printf("tokens computed per expert server:\n");
  for (const auto& c : experts) {
    auto stub = v1::ExpertService::NewStub(grpc::CreateChannel(absl::StrCat("127.0.0.1:", c.port),
                                                               grpc::InsecureChannelCredentials()));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    v1::ServerStatusRequest req;
    v1::ServerStatusResponse resp;
    grpc::Status st = stub->GetStatus(&ctx, req, &resp);
    if (!st.ok()) {
      std::printf("  %s: status unavailable (%s)\n", c.name.c_str(), st.error_message().c_str());
      continue;
    }
    uint64_t total = 0;
    for (uint64_t t : resp.tokens_computed()) total += t;
    std::printf(
        "  %s (127.0.0.1:%d): %llu expert-token computations over %d slots, %.1f MiB resident\n",
        c.name.c_str(), c.port, static_cast<unsigned long long>(total), resp.tokens_computed_size(),
        resp.resident_weight_bytes() / 1048576.0);
  }
#else
  std::printf("(built without services: no per-server status)\n");
#endif
}

// The router's per-(layer, expert) load window (its placement controller).
void PrintExpertLoad(int router_port) {
#ifdef DMOE_WITH_SERVICES
  auto stub = v1::RouterService::NewStub(grpc::CreateChannel(
      absl::StrCat("127.0.0.1:", router_port), grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  v1::ExpertLoadResponse r;
  grpc::Status st = stub->GetExpertLoad(&ctx, v1::ExpertLoadRequest(), &r);
  if (!st.ok()) {
    std::printf("per-expert load unavailable: %s\n", st.error_message().c_str());
    return;
  }
  std::printf(
      "tokens routed per expert (router's load window; `dmoe ctl load --router "
      "127.0.0.1:%d` shows more):\n",
      router_port);
  for (const v1::LayerLoad& l : r.layers()) {
    std::printf("  layer %u:", l.layer());
    for (double x : l.expert_load()) std::printf(" %.0f", x);
    std::printf("   (max/mean over servers %.2f)\n", l.server_max_over_mean());
  }
#endif
}

absl::Status Up(const Args& args) {
  DMOE_ASSIGN_OR_RETURN(int64_t servers, args.Int("servers"));
  if (servers < 1 || servers > 64) {
    return absl::InvalidArgumentError(absl::StrCat("--servers must be in [1, 64], got ", servers));
  }
  std::string model = args.Str("model");
  const std::string work = args.Str("work-dir");
  std::filesystem::create_directories(work);
  if (model.empty()) {
    model = work + "/model";
    MakeModelOptions mo;
    mo.preset = args.Str("preset");
    mo.out_dir = model;
    mo.seed = 1;
    DMOE_RETURN_IF_ERROR(WriteRandomModel(mo));
    std::printf("generated a %s model in %s\n", mo.preset.c_str(), model.c_str());
  }
  const bool has_tokenizer = std::filesystem::exists(model + "/tokenizer.json");
  const std::string bin = SelfDir();
  const std::string dtype = args.Str("dtype"), threads = args.Str("threads");
  for (const char* b : {"dmoe-expert", "dmoe-router", "dmoe-gateway"}) {
    if (!std::filesystem::exists(bin + "/" + b)) {
      return absl::NotFoundError(absl::StrCat(bin, "/", b, " not found: build the services first"));
    }
  }
  signal(SIGINT, OnSignal);
  signal(SIGTERM, OnSignal);
  // Every process shares this machine's cores: a short OpenMP spin for all
  // of them (inherited), unless the user's environment chooses (colocation.h).
  if (const std::string spin = ColocatedSpinEnv(); !spin.empty()) {
    const size_t eq = spin.find('=');
    setenv(spin.substr(0, eq).c_str(), spin.substr(eq + 1).c_str(), /*overwrite=*/0);
    std::printf("%s for the cluster's processes (they share this machine's cores)\n", spin.c_str());
  }

  std::vector<Child> children;
  absl::Status status;
  auto start = [&](Child c, std::vector<std::string> argv) -> absl::Status {
    children.push_back(std::move(c));
    Child& ref = children.back();
    if (!ref.metrics_port_file.empty()) {
      std::remove(ref.metrics_port_file.c_str());
      argv.insert(argv.end(),
                  {"--metrics-port", "0", "--metrics-port-file", ref.metrics_port_file});
    }
    DMOE_RETURN_IF_ERROR(Spawn(ref, argv));
    DMOE_RETURN_IF_ERROR(WaitForPort(ref, 300));
    // Written before the service port file.
    if (!ref.metrics_port_file.empty()) std::ifstream(ref.metrics_port_file) >> ref.metrics_port;
    return absl::OkStatus();
  };
  std::vector<std::string> addrs;
  for (int64_t i = 0; i < servers && status.ok(); ++i) {
    Child c;
    c.name = absl::StrCat("expert-", i);
    c.port_file = absl::StrCat(work, "/expert-", i, ".port");
    c.log = absl::StrCat(work, "/expert-", i, ".log");
    c.metrics_port_file = absl::StrCat(work, "/expert-", i, ".metrics.port");
    status =
        start(c, {bin + "/dmoe-expert", "--model", model, "--server-index", std::to_string(i),
                  "--num-servers", std::to_string(servers), "--port", "0", "--port-file",
                  c.port_file, "--dtype", dtype, "--threads", threads, "--leave-timeout-s", "10"});
    if (status.ok()) addrs.push_back(absl::StrCat("127.0.0.1:", children.back().port));
  }
  if (status.ok()) {
    Child c;
    c.name = "router";
    c.port_file = work + "/router.port";
    c.log = work + "/router.log";
    c.metrics_port_file = work + "/router.metrics.port";
    status =
        start(c, {bin + "/dmoe-router", "--model", model, "--experts", absl::StrJoin(addrs, ","),
                  "--port", "0", "--port-file", c.port_file, "--dtype", dtype, "--threads", threads,
                  "--shared-expert", args.Str("shared-expert"), "--controller"});
  }
  if (status.ok()) {
    Child c;
    c.name = "gateway";
    c.port_file = work + "/gateway.port";
    c.log = work + "/gateway.log";
    std::vector<std::string> argv = {bin + "/dmoe-gateway",
                                     "--routers",
                                     absl::StrCat("127.0.0.1:", children.back().port),
                                     "--http-port",
                                     args.Str("http-port"),
                                     "--port-file",
                                     c.port_file};
    // Text in, text out when the checkpoint carries its tokenizer (generated
    // models do, unless made with --no-tokenizer).
    if (has_tokenizer) argv.insert(argv.end(), {"--tokenizer", model});
    status = start(c, argv);
  }
  if (!status.ok()) {
    StopAll(children);
    return status;
  }
  std::vector<Child> experts(children.begin(), children.begin() + servers);
  const int http = children.back().port;
  std::printf("dmoe is up (model %s, logs in %s):\n", model.c_str(), work.c_str());
  for (const auto& c : children) {
    std::printf("  %-10s 127.0.0.1:%d", c.name.c_str(), c.port);
    if (c.metrics_port > 0) std::printf("  metrics http://127.0.0.1:%d/metrics", c.metrics_port);
    std::printf("\n");
  }
  // A text prompt needs the tokenizer; token ids work either way.
  const std::string prompt = has_tokenizer ? R"("The quick brown fox")" : "[1,2,3,4,5]";
  std::printf(
      "  try: curl -s 127.0.0.1:%d/v1/completions -d "
      "'{\"prompt\":%s,\"max_tokens\":8}'\n",
      http, prompt.c_str());
  std::fflush(stdout);

  if (args.Bool("demo")) {
    // Wait for the gateway to see a healthy router, then one real completion.
    absl::StatusOr<std::string> health = absl::UnavailableError("not checked");
    for (int i = 0; i < 100 && !g_stop; ++i) {
      health = HttpRequest(http, "GET", "/health", "");
      if (health.ok()) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    absl::Status demo = health.status();
    if (demo.ok()) {
      const std::string body =
          absl::StrCat(R"({"prompt":)", prompt, R"(,"max_tokens":16,"temperature":0})");
      std::printf("\nPOST /v1/completions %s\n", body.c_str());
      auto resp = HttpRequest(http, "POST", "/v1/completions", body);
      if (resp.ok()) {
        std::printf("%s\n\n", resp->c_str());
        PrintExpertTokens(experts);
        PrintExpertLoad(children[servers].port);
      }
      demo = resp.status();
    }
    StopAll(children);
    return demo;
  }
  while (!g_stop) {
    for (auto& c : children) {
      if (c.pid > 0 && waitpid(c.pid, nullptr, WNOHANG) == c.pid) {
        c.pid = -1;
        std::fprintf(stderr, "dmoe up: %s exited; see %s — stopping\n", c.name.c_str(),
                     c.log.c_str());
        g_stop = 1;
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  std::printf("stopping...\n");
  StopAll(children);
  return absl::OkStatus();
}

}  // namespace

int RunUp(int argc, char** argv) {
  Args args("up", "run gateway + router + N expert servers on this machine (Ctrl-C stops all)");
  args.Flag("model", "DIR", "checkpoint directory (default: generate a tiny model)", "")
      .Flag("preset", "NAME", "preset for the generated model when --model is not given",
            "tiny-v2lite")
      .Flag("servers", "N", "number of expert servers", "3")
      .Flag("dtype", "f32|bf16", "compute type of router and expert servers", "bf16")
      .Flag("threads", "N", "compute threads per process", "1")
      .Flag("shared-expert", "expert|router", "where the shared expert runs", "expert")
      .Flag("http-port", "P", "gateway HTTP port (0 = any free port)", "0")
      .Flag("work-dir", "DIR", "logs, port files and the generated model", "/tmp/dmoe-up")
      .Flag("demo", "", "send one completion, print it and the per-server load, then stop");
  if (auto s = args.Parse(argc, argv, 2); !s.ok()) return ReportError("up", s) + 1;
  if (args.help_requested()) return 0;
  if (auto s = Up(args); !s.ok()) return ReportError("up", s);
  return 0;
}

}  // namespace dmoe::tools
