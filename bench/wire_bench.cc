// Wire benchmark (issue 4): one MoE layer at DeepSeek-V2-Lite shapes,
// in-process versus through N = 1, 2, 4 expert servers (real dmoe-expert child
// processes) on loopback, for T = 1, 64, 256 tokens, with a raw-TCP floor
// measured in the same run between the same processes.
//
//   wire_bench [--quick] [--model DIR] [--wire-dtype bf16|f32|fp8]
//              [--threads N] [--servers 1,2,4] [--tokens 1,64,256]
//
// Model: --model DIR, else /tmp/dmoe-wire-bench-model, written on first use
// with `dmoe make-model --preset v2lite --layers 2 --weight-dtype bf16 --seed
// 1` (the dmoe binary next to this one) and reused. Its layer 1 is the MoE
// layer: hidden 2048, 64 routed experts (inter 1408), top-6, 2 shared experts.
//
// Batches: T rows drawn from N(0,1) and RMS-normalised, routed by the
// checkpoint's own layer-1 gate (MoeGate) into a dispatch plan with the shared
// FFN, split by server exactly as RemoteExpertBackend does (contiguous
// placement, shared duty on the expert servers). A few different batches per
// (N, T), used round-robin.
//
// What is measured (each (N, T) row; medians and p90 over timed calls after one
// warm-up call per batch):
//  1. Layer: the in-process CPU backend (every expert + shared FFN, bf16,
//     threads = min(N x per-server threads, cores): the same compute budget) vs
//     the remote backend through N "full" servers (contiguous 64/N experts each
//     + the shared FFN, bf16). overhead = remote / in-process. Both include the
//     expert compute, which dominates here (T=1 reads ~140 MB of weights); on a
//     host with fewer cores than processes the servers also contend.
//  2. Wire: to take the expert compute out without changing a byte, the SAME
//     batches go to N "wire-only" servers that hold the same layer with
//     moe_intermediate_size 16 (a checkpoint of just those experts, written by
//     this bench): hidden, routing, placement and wire dtype are unchanged, so
//     every request and reply is byte-for-byte the same size, while the FFNs
//     cost little. Their round trip is wire + gRPC + the protocol work on
//     both sides (split, pack, unpack, sum) + what the CPU backend still
//     spends per FFN used ("srv": each server's share computed in-process
//     with those tiny FFNs, max over servers; "net" = gRPC - srv, per call,
//     the round trip with that taken out too; "codec": the part of net spent
//     packing and unpacking activations, timed in-process). Floor: the same
//     request and reply byte counts per server (below), sent to all N servers
//     concurrently (one thread, poll) over raw TCP to the raw echo (dmoe-expert
//     --raw-echo-port-file, expert_service/raw_echo.h) inside those same server
//     processes. Goal (docs/performance.md): gRPC round trip <= 1.5x the floor.
//  3. Bytes per token: the ExpertRequest / ExpertResponse messages exactly as
//     RemoteExpertBackend builds them (protobuf-serialised size + the 5-byte
//     gRPC message prefix; HTTP/2 frame headers and TCP/IP not counted), both
//     directions, over T. Minimum = hidden x wire element bytes x servers the
//     token visits x 2 (fp8: 1 byte per element; its per-row scale counts as
//     overhead). "lo B/tok": bytes the loopback interface sent during the
//     wire-only timing loop, per token: adds HTTP/2 + TCP/IP headers and acks,
//     and any other loopback traffic on the host at the time (an upper bound).
//  4. Expert server memory: each full server's peak (VmHWM) and current (VmRSS)
//     resident set from /proc after its runs, against its weights (its slots'
//     experts + the shared FFN at bf16); the wire-only servers show what a
//     server costs without weights.
//  5. Micro-batching: the whole 2-layer model (core::Model, routed and shared
//     experts on the N full servers, router threads = --threads) runs one step
//     with micro_batches = 1 and = 2: a prefill of 8 sequences x 32 tokens and
//     a decode step of the same 8 sequences. overlap = 1 - t(2) / t(1);
//     "await" = the time per step the router sat in ExpertBackend::Await
//     (waiting for servers with nothing else to do). Only layer 1 is MoE
//     here, so only one micro-batch's layer-1 attention can hide the other's
//     round trip; deeper models have a round trip per MoE layer to hide.
//
// --quick (CI smoke, ~30 s on 2 quiet cores once the model is cached): N = 2
// (the split across servers), T = 1, 64, a few calls each, micro-batching with
// 4 x 8 tokens; the numbers are not meaningful, only that every path works end
// to end. The first run on a machine also writes the ~2 GB model (~20 s).
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "bench/bench_util.h"
#include "common/wire.h"
#include "core/config.h"
#include "core/dtype.h"
#include "core/expert_backend.h"
#include "core/kernels/cpu/linear.h"
#include "core/kv_cache.h"
#include "core/layers.h"
#include "core/model.h"
#include "core/moe.h"
#include "core/safetensors.h"
#include "core/status.h"
#include "dmoe/v1/expert.pb.h"
#include "nlohmann/json.hpp"
#include "placement/placement.h"
#include "router_service/remote_expert_backend.h"
#include "testing/subprocess.h"

namespace {

namespace core = dmoe::core;
namespace common = dmoe::common;
namespace place = dmoe::place;
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

constexpr char kDefaultModel[] = "/tmp/dmoe-wire-bench-model";
constexpr int64_t kWireOnlyInter = 16;  // moe_intermediate_size of wire-only servers
constexpr size_t kGrpcPrefix = 5;       // compressed flag + u32 length per message

// ---- options
// -----------------------------------------------------------------

struct Options {
  bool quick = false;
  std::string model;  // empty = kDefaultModel (made if missing)
  common::WireDType wire = common::WireDType::kBF16;
  int threads = 1;  // compute threads per expert server
  std::vector<int> servers = {1, 2, 4};
  std::vector<int> tokens = {1, 64, 256};
};

std::vector<int> ParseList(std::string_view s) {
  std::vector<int> v;
  while (!s.empty()) {
    const size_t comma = s.find(',');
    v.push_back(std::atoi(std::string(s.substr(0, comma)).c_str()));
    if (comma == std::string_view::npos) break;
    s.remove_prefix(comma + 1);
  }
  return v;
}

bool ParseOptions(int argc, char** argv, Options* o) {
  bool servers_set = false, tokens_set = false;
  for (int i = 1; i < argc; ++i) {
    std::string_view a = argv[i];
    std::string value;
    const size_t eq = a.find('=');
    if (eq != std::string_view::npos) {
      value = std::string(a.substr(eq + 1));
      a = a.substr(0, eq);
    }
    auto next = [&]() -> bool {
      if (eq != std::string_view::npos) return true;
      if (i + 1 >= argc) return false;
      value = argv[++i];
      return true;
    };
    if (a == "--quick") {
      o->quick = true;
    } else if (a == "--model" && next()) {
      o->model = value;
    } else if (a == "--wire-dtype" && next()) {
      if (value == "bf16") {
        o->wire = common::WireDType::kBF16;
      } else if (value == "f32") {
        o->wire = common::WireDType::kF32;
      } else if (value == "fp8") {
        o->wire = common::WireDType::kF8E4M3;
      } else {
        std::fprintf(stderr, "--wire-dtype must be bf16, f32 or fp8\n");
        return false;
      }
    } else if (a == "--threads" && next()) {
      o->threads = std::atoi(value.c_str());
    } else if (a == "--servers" && next()) {
      o->servers = ParseList(value);
      servers_set = true;
    } else if (a == "--tokens" && next()) {
      o->tokens = ParseList(value);
      tokens_set = true;
    } else {
      std::fprintf(stderr,
                   "usage: %s [--quick] [--model DIR] [--wire-dtype "
                   "bf16|f32|fp8] [--threads N]\n"
                   "       [--servers 1,2,4] [--tokens 1,64,256]\n",
                   argv[0]);
      return false;
    }
  }
  if (o->quick) {
    if (!servers_set) o->servers = {2};
    if (!tokens_set) o->tokens = {1, 64};
  }
  for (const std::vector<int>* list : {&o->servers, &o->tokens}) {
    if (list->empty() || *std::min_element(list->begin(), list->end()) <= 0) {
      std::fprintf(stderr, "--servers and --tokens take positive integers\n");
      return false;
    }
  }
  if (o->threads < 1) {
    std::fprintf(stderr, "--threads must be >= 1\n");
    return false;
  }
  return true;
}

const char* WireName(common::WireDType t) {
  switch (t) {
    case common::WireDType::kBF16:
      return "bf16";
    case common::WireDType::kF32:
      return "f32";
    case common::WireDType::kF8E4M3:
      return "fp8";
  }
  return "?";
}

dmoe::v1::ActivationDType ToProto(common::WireDType t) {
  switch (t) {
    case common::WireDType::kBF16:
      return dmoe::v1::ACTIVATION_DTYPE_BF16;
    case common::WireDType::kF32:
      return dmoe::v1::ACTIVATION_DTYPE_F32;
    case common::WireDType::kF8E4M3:
      return dmoe::v1::ACTIVATION_DTYPE_F8_E4M3;
  }
  return dmoe::v1::ACTIVATION_DTYPE_UNSPECIFIED;
}

// This run's scratch directory (port files, logs, the wire-only model).
std::string g_work_dir;

// Child processes die with the bench (PR_SET_PDEATHSIG), so exiting here
// leaves none behind.
[[noreturn]] void Die(const absl::Status& s, std::string_view what) {
  std::fprintf(stderr, "wire_bench: %s: %s\n", std::string(what).c_str(), s.ToString().c_str());
  if (!g_work_dir.empty()) {
    std::error_code ec;
    fs::remove_all(g_work_dir, ec);
  }
  std::exit(1);
}

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

struct Stats {
  double median = 0, p90 = 0;
};

Stats Summarize(std::vector<double> v) {
  Stats s;
  if (v.empty()) return s;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  s.median = n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
  s.p90 = v[std::min(n - 1, static_cast<size_t>(std::ceil(0.9 * n)) - 1)];
  return s;
}

using dmoe::bench::BinDir;
using Child = dmoe::testing::ChildProcess;
using dmoe::testing::WaitForPortFile;

// ---- models
// ------------------------------------------------------------------

// The default model, made once with `dmoe make-model` into a temporary
// directory that is renamed into place (a crash never leaves half a cache).
absl::Status EnsureModel(const std::string& dir, const std::string& bin_dir,
                         const std::string& work_dir) {
  if (fs::exists(fs::path(dir) / "config.json")) return absl::OkStatus();
  const std::string tmp = absl::StrCat(dir, ".partial-", getpid());
  std::fprintf(stderr, "wire_bench: writing %s (v2lite --layers 2, bf16; once)\n", dir.c_str());
  Child make;
  const std::string log = work_dir + "/make-model.log";
  if (!make.Start({bin_dir + "/dmoe", "make-model", "--preset", "v2lite", "--layers", "2", "--seed",
                   "1", "--weight-dtype", "bf16", "--out", tmp},
                  log)) {
    return absl::InternalError("cannot start dmoe make-model");
  }
  if (const int rc = make.Wait(std::chrono::minutes(10)); rc != 0) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    return absl::InternalError(absl::StrCat("dmoe make-model exited with ", rc, ": ", make.Log()));
  }
  std::error_code ec;
  fs::rename(tmp, dir, ec);
  if (ec && !fs::exists(fs::path(dir) / "config.json")) {
    return absl::InternalError(absl::StrCat("rename ", tmp, " -> ", dir, ": ", ec.message()));
  }
  fs::remove_all(tmp, ec);  // lost a race with another writer: theirs is fine
  return absl::OkStatus();
}

// The full model's config with moe_intermediate_size = kWireOnlyInter, and a
// checkpoint of only the MoE layers' routed and shared experts (all an expert
// server loads). Same hidden size, experts and gate, so the same batches put
// the same bytes on the wire.
absl::Status WriteWireOnlyModel(const std::string& full_dir, const std::string& out_dir) {
  std::ifstream in(full_dir + "/config.json");
  std::stringstream text;
  text << in.rdbuf();
  nlohmann::json j = nlohmann::json::parse(text.str(), nullptr, false);
  if (j.is_discarded()) {
    return absl::InvalidArgumentError(full_dir + "/config.json: not JSON");
  }
  j["moe_intermediate_size"] = kWireOnlyInter;
  fs::create_directories(out_dir);
  {
    std::ofstream out(out_dir + "/config.json");
    out << j.dump(2) << "\n";
    if (!out) return absl::InternalError("cannot write " + out_dir);
  }
  DMOE_ASSIGN_OR_RETURN(core::ModelConfig cfg, core::ModelConfig::FromJson(j.dump()));
  const int64_t H = cfg.hidden_size;
  std::vector<core::SafetensorsWriter::Decl> decls;
  auto add_ffn = [&](const std::string& prefix, int64_t inter) {
    decls.push_back({prefix + "gate_proj.weight", core::DType::kBF16, {inter, H}});
    decls.push_back({prefix + "up_proj.weight", core::DType::kBF16, {inter, H}});
    decls.push_back({prefix + "down_proj.weight", core::DType::kBF16, {H, inter}});
  };
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    if (!cfg.IsMoeLayer(l)) continue;
    for (int64_t e = 0; e < cfg.n_routed_experts; ++e)
      add_ffn(core::FfnPrefix(l, e), kWireOnlyInter);
    if (cfg.n_shared_experts > 0)
      add_ffn(core::FfnPrefix(l, core::kSharedFfn), cfg.n_shared_experts * kWireOnlyInter);
  }
  DMOE_ASSIGN_OR_RETURN(auto writer, core::SafetensorsWriter::Create(out_dir + "/model.safetensors",
                                                                     decls, {{"format", "pt"}}));
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-0.05f, 0.05f);
  std::vector<uint16_t> bits;
  for (const auto& d : decls) {
    bits.resize(static_cast<size_t>(d.shape[0] * d.shape[1]));
    for (uint16_t& b : bits) b = core::F32ToBF16(u(rng));
    DMOE_RETURN_IF_ERROR(writer->Write(d.name, bits.data(), bits.size() * sizeof(uint16_t)));
  }
  return writer->Finish();
}

// ---- expert server processes
// ---------------------------------------------------

struct ProcMemory {
  size_t hwm = 0, rss = 0, anon = 0, file = 0;  // bytes
};

ProcMemory ReadProcMemory(pid_t pid) {
  ProcMemory m;
  std::ifstream in(absl::StrCat("/proc/", pid, "/status"));
  std::string key;
  size_t kb = 0;
  while (in >> key) {
    if (key == "VmHWM:" && in >> kb) m.hwm = kb * 1024;
    if (key == "VmRSS:" && in >> kb) m.rss = kb * 1024;
    if (key == "RssAnon:" && in >> kb) m.anon = kb * 1024;
    if (key == "RssFile:" && in >> kb) m.file = kb * 1024;
  }
  return m;
}

// N dmoe-expert processes of one model, each with the raw echo; stopped with
// SIGTERM (SIGKILL after 20 s) by Stop or the destructor.
class ServerSet {
 public:
  ~ServerSet() { Stop(); }

  // Starts the processes; they load their weights in the background.
  absl::Status Launch(const std::string& bin_dir, const std::string& model, int n, int threads,
                      const std::string& dir, const std::string& tag) {
    dir_ = dir;
    tag_ = tag;
    for (int s = 0; s < n; ++s) {
      const std::string base = absl::StrCat(dir, "/", tag, "-", n, "-", s);
      procs_.push_back(std::make_unique<Child>());
      if (!procs_.back()->Start(
              {bin_dir + "/dmoe-expert", "--model", model, "--server-index", absl::StrCat(s),
               "--num-servers", absl::StrCat(n), "--port", "0", "--port-file", base + ".port",
               "--raw-echo-port-file", base + ".echo", "--dtype", "bf16", "--threads",
               absl::StrCat(threads), "--drain-timeout-s", "5"},
              base + ".log")) {
        return absl::InternalError("cannot start dmoe-expert");
      }
    }
    return absl::OkStatus();
  }

  // Waits until every server serves (gRPC and raw echo ports written).
  absl::Status WaitReady() {
    const int n = static_cast<int>(procs_.size());
    for (int s = 0; s < n; ++s) {
      const std::string base = absl::StrCat(dir_, "/", tag_, "-", n, "-", s);
      // --port-file is written after the echo's file: wait for it first.
      const int port = WaitForPortFile(base + ".port", *procs_[s], std::chrono::minutes(5));
      const int echo =
          port > 0 ? WaitForPortFile(base + ".echo", *procs_[s], std::chrono::seconds(5)) : 0;
      if (port == 0 || echo == 0) {
        return absl::UnavailableError(absl::StrCat(
            tag_, " expert server ", s, "/", n, " did not come up; its log:\n", procs_[s]->Log()));
      }
      addresses_.push_back(absl::StrCat("127.0.0.1:", port));
      echo_ports_.push_back(echo);
    }
    return absl::OkStatus();
  }

  void Stop() {
    for (auto& p : procs_) {
      if (p->pid() > 0) ::kill(p->pid(), SIGTERM);
    }
    for (auto& p : procs_) p->Wait(std::chrono::seconds(20));
    procs_.clear();
  }

  const std::vector<std::string>& addresses() const { return addresses_; }
  const std::vector<int>& echo_ports() const { return echo_ports_; }
  ProcMemory Memory(int s) const { return ReadProcMemory(procs_[s]->pid()); }

 private:
  std::string dir_, tag_;
  std::vector<std::unique_ptr<Child>> procs_;
  std::vector<std::string> addresses_;
  std::vector<int> echo_ports_;
};

// ---- raw TCP floor
// -----------------------------------------------------------

// One connection per server to its raw echo; a round trip sends every server
// its frame concurrently from this one thread (non-blocking sockets + poll)
// and returns once every reply has been read. Buffers are preallocated.
class RawEchoClient {
 public:
  ~RawEchoClient() {
    for (int fd : fds_) close(fd);
  }

  absl::Status Connect(const std::vector<int>& ports) {
    for (int port : ports) {
      const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      if (fd < 0) return absl::InternalError("socket");
      fds_.push_back(fd);
      sockaddr_in addr{};
      addr.sin_family = AF_INET;
      addr.sin_port = htons(static_cast<uint16_t>(port));
      addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
        return absl::UnavailableError(
            absl::StrCat("raw echo 127.0.0.1:", port, ": ", std::strerror(errno)));
      }
      const int one = 1;
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    }
    out_.resize(fds_.size());
    in_.resize(fds_.size());
    state_.resize(fds_.size());
    return absl::OkStatus();
  }

  // frames[s] = {request bytes, reply bytes}; {0, 0} = server s not visited.
  absl::Status RoundTrip(const std::vector<std::pair<size_t, size_t>>& frames) {
    const size_t n = fds_.size();
    size_t open = 0;
    for (size_t s = 0; s < n; ++s) {
      const auto [req, rep] = frames[s];
      State& st = state_[s];
      st = {};
      if (req == 0 && rep == 0) continue;
      if (out_[s].size() < 16 + req) out_[s].resize(16 + req);
      if (in_[s].size() < rep) in_[s].resize(rep);
      const uint64_t header[2] = {req, rep};
      std::memcpy(out_[s].data(), header, sizeof(header));
      st.to_send = 16 + req;
      st.to_recv = rep;
      st.done = false;
      ++open;
    }
    std::vector<pollfd> pfds;
    while (open > 0) {
      pfds.clear();
      for (size_t s = 0; s < n; ++s) {
        State& st = state_[s];
        if (st.sent < st.to_send) {
          const ssize_t w =
              send(fds_[s], out_[s].data() + st.sent, st.to_send - st.sent, MSG_NOSIGNAL);
          if (w > 0)
            st.sent += static_cast<size_t>(w);
          else if (w < 0 && errno != EAGAIN && errno != EINTR)
            return absl::UnavailableError("raw echo: send failed");
        }
        if (st.received < st.to_recv) {
          const ssize_t r = recv(fds_[s], in_[s].data() + st.received, st.to_recv - st.received, 0);
          if (r > 0)
            st.received += static_cast<size_t>(r);
          else if (r == 0 || (errno != EAGAIN && errno != EINTR))
            return absl::UnavailableError("raw echo: connection closed");
        }
        const bool was_open = !st.done;
        st.done = st.sent == st.to_send && st.received == st.to_recv;
        if (was_open && st.done) --open;
        if (!st.done) {
          pfds.push_back(
              {fds_[s], static_cast<short>((st.sent < st.to_send ? POLLOUT : 0) | POLLIN), 0});
        }
      }
      if (open > 0 && poll(pfds.data(), pfds.size(), 10000) <= 0)
        return absl::DeadlineExceededError("raw echo: no progress in 10 s");
    }
    return absl::OkStatus();
  }

 private:
  struct State {
    size_t to_send = 0, sent = 0, to_recv = 0, received = 0;
    bool done = true;
  };
  std::vector<int> fds_;
  std::vector<std::vector<char>> out_, in_;  // [server] preallocated, reused
  std::vector<State> state_;
};

// ---- batches and their bytes
// -----------------------------------------------------

struct Batch {
  int64_t tokens = 0;
  std::vector<float> x;  // [tokens, hidden] RMS-normalised
  core::DispatchPlan plan;
  // Per server: bytes of the gRPC messages RemoteExpertBackend exchanges with
  // it (request, reply); {0, 0} when no token visits it.
  std::vector<std::pair<size_t, size_t>> frames;
  size_t request_bytes = 0, reply_bytes = 0, min_bytes = 0;
  int64_t visits = 0;  // sum over tokens of servers visited
  // Rows the servers send back: one per (token, server) visit, or with
  // per-assignment replies (the default) one per (token, expert or shared).
  int64_t reply_rows = 0;
  // What each visited server computes: its share and the share's rows of x.
  std::vector<place::ServerShare> shares;
  std::vector<std::vector<float>> share_x;  // [share][tokens, hidden]
  double server_compute = 0;                // seconds, wire-only FFNs: max over shares

  core::ExpertBatch View(int32_t layer, int64_t hidden) const {
    return plan.AsBatch(layer, x.data(), tokens, hidden);
  }
};

// The messages SendShare (router_service/remote_expert_backend.cc) sends and
// the compute worker answers, built the same way, to count their bytes.
std::pair<size_t, size_t> ShareMessageBytes(const core::ExpertBatch& b,
                                            const place::ServerShare& share, common::WireDType wire,
                                            uint64_t version, size_t max_chunk_bytes,
                                            bool per_assignment) {
  const int64_t H = b.hidden;
  const int64_t n = static_cast<int64_t>(share.tokens.size());
  const int64_t row_bytes = H * static_cast<int64_t>(common::WireElementSize(wire)) +
                            (wire == common::WireDType::kF8E4M3 ? 4 : 0);
  const int64_t rows_per_chunk =
      std::max<int64_t>(1, static_cast<int64_t>(max_chunk_bytes) / row_bytes);
  const int64_t chunks = (n + rows_per_chunk - 1) / rows_per_chunk;
  const uint64_t request_id = 1000;  // a typical id: 2 varint bytes
  std::vector<float> rows_x;
  size_t req_bytes = 0, rep_bytes = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t r0 = c * rows_per_chunk, r1 = std::min(n, r0 + rows_per_chunk);
    const int64_t rows = r1 - r0;
    rows_x.resize(static_cast<size_t>(rows * H));
    for (int64_t r = r0; r < r1; ++r) {
      std::memcpy(rows_x.data() + (r - r0) * H, b.x + static_cast<int64_t>(share.tokens[r]) * H,
                  H * sizeof(float));
    }
    dmoe::v1::ExpertRequest req;
    req.set_request_id(request_id);
    req.set_layer(static_cast<uint32_t>(b.layer));
    req.set_placement_version(version);
    dmoe::v1::Activations* x = req.mutable_x();
    x->set_dtype(ToProto(wire));
    x->set_rows(static_cast<uint32_t>(rows));
    x->set_cols(static_cast<uint32_t>(H));
    common::PackActivations(rows_x.data(), rows, H, 0, wire, x->mutable_data(),
                            x->mutable_row_scales());
    req.add_token_offsets(0);
    for (int64_t r = r0; r < r1; ++r) {
      bool shared = false;
      for (int32_t a = share.token_offsets[r]; a < share.token_offsets[r + 1]; ++a) {
        if (share.ffn_ids[a] == core::kSharedFfn) {
          shared = true;
        } else {
          req.add_expert_ids(share.ffn_ids[a]);
          req.add_weights(share.weights[a]);
        }
      }
      req.add_token_offsets(static_cast<uint32_t>(req.expert_ids_size()));
      req.add_shared_duty(shared);
    }
    req.set_reply_dtype(ToProto(wire));
    req.set_chunk_index(static_cast<uint32_t>(c));
    req.set_chunk_count(static_cast<uint32_t>(chunks));
    req.set_per_assignment_reply(per_assignment);
    req_bytes += req.ByteSizeLong() + kGrpcPrefix;
    // One reply row per token, or per assignment (experts + shared duty).
    const int64_t reply_rows =
        per_assignment ? share.token_offsets[r1] - share.token_offsets[r0] : rows;

    dmoe::v1::ExpertResponse rep;
    rep.set_request_id(request_id);
    rep.set_chunk_index(static_cast<uint32_t>(c));
    rep.set_chunk_count(static_cast<uint32_t>(chunks));
    dmoe::v1::Activations* y = rep.mutable_y();
    y->set_dtype(ToProto(wire));
    y->set_rows(static_cast<uint32_t>(reply_rows));
    y->set_cols(static_cast<uint32_t>(H));
    y->mutable_data()->resize(static_cast<size_t>(reply_rows * H) * common::WireElementSize(wire));
    if (wire == common::WireDType::kF8E4M3)
      y->mutable_row_scales()->resize(static_cast<size_t>(reply_rows) * 4);
    rep_bytes += rep.ByteSizeLong() + kGrpcPrefix;
  }
  return {req_bytes, rep_bytes};
}

// ---- the layer, in-process
// ---------------------------------------------------------

struct Layer {
  core::ModelConfig cfg;
  int32_t index = -1;  // the first MoE layer
  std::unique_ptr<core::MoeGate> gate;
  std::unique_ptr<core::ExpertBackend> local;  // every expert + shared, bf16
};

// with_gate: the wire-only checkpoint has only experts.
Layer LoadLayer(const std::string& dir, bool with_gate) {
  Layer layer;
  auto cfg = core::ModelConfig::FromFile(dir + "/config.json");
  if (!cfg.ok()) Die(cfg.status(), dir);
  layer.cfg = *cfg;
  for (int64_t l = 0; l < layer.cfg.num_hidden_layers && layer.index < 0; ++l)
    if (layer.cfg.IsMoeLayer(l)) layer.index = static_cast<int32_t>(l);
  if (layer.index < 0) Die(absl::FailedPreconditionError("no MoE layer"), dir);
  auto ckpt = core::Checkpoint::Open(dir);
  if (!ckpt.ok()) Die(ckpt.status(), dir);
  (*ckpt)->set_fp8_block(layer.cfg.fp8_block_rows, layer.cfg.fp8_block_cols);
  if (with_gate) {
    auto gate = core::MoeGate::Load(layer.cfg, **ckpt, layer.index);
    if (!gate.ok()) Die(gate.status(), "gate");
    layer.gate = *std::move(gate);
  }
  layer.local = core::MakeCpuExpertBackend(core::ComputeType::kBF16);
  const core::ModelConfig& c = layer.cfg;
  for (int32_t e = 0; e < c.n_routed_experts; ++e) {
    const absl::Status s = core::LoadFfnInto(**ckpt, core::FfnPrefix(layer.index, e), c.hidden_size,
                                             c.moe_intermediate_size, layer.index, e, *layer.local);
    if (!s.ok()) Die(s, "load expert");
  }
  if (c.n_shared_experts > 0) {
    const absl::Status s = core::LoadFfnInto(
        **ckpt, core::FfnPrefix(layer.index, core::kSharedFfn), c.hidden_size,
        c.n_shared_experts * c.moe_intermediate_size, layer.index, core::kSharedFfn, *layer.local);
    if (!s.ok()) Die(s, "load shared expert");
  }
  core::ReleaseLoadBuffers();
  return layer;
}

Batch MakeBatch(Layer& layer, const place::Placement& placement, common::WireDType wire,
                int64_t tokens, uint64_t seed) {
  const int64_t H = layer.cfg.hidden_size;
  Batch b;
  b.tokens = tokens;
  b.x.resize(static_cast<size_t>(tokens * H));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  for (int64_t t = 0; t < tokens; ++t) {
    float* row = b.x.data() + t * H;
    double ss = 0;
    for (int64_t j = 0; j < H; ++j) {
      row[j] = normal(rng);
      ss += double(row[j]) * row[j];
    }
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / H + 1e-6));
    for (int64_t j = 0; j < H; ++j) row[j] *= inv;
  }
  const core::GateResult routing = layer.gate->Route(b.x.data(), tokens);
  b.plan = core::MakeDispatchPlan(routing, /*with_shared=*/true);
  const core::ExpertBatch view = b.View(layer.index, H);
  const std::vector<int64_t> queued(placement.num_servers(), 0);
  auto shares = place::SplitByServer(view, placement, queued, place::SharedDuty::kExpertServers);
  if (!shares.ok()) Die(shares.status(), "SplitByServer");
  b.frames.assign(placement.num_servers(), {0, 0});
  const dmoe::router::RemoteExpertOptions defaults;
  for (const place::ServerShare& share : *shares) {
    if (share.tokens.empty()) continue;
    b.frames[share.server] =
        ShareMessageBytes(view, share, wire, placement.version(), defaults.max_chunk_bytes,
                          defaults.per_assignment_replies);
    b.reply_rows += defaults.per_assignment_replies ? static_cast<int64_t>(share.ffn_ids.size())
                                                    : static_cast<int64_t>(share.tokens.size());
    b.request_bytes += b.frames[share.server].first;
    b.reply_bytes += b.frames[share.server].second;
    b.visits += static_cast<int64_t>(share.tokens.size());
    std::vector<float>& sx = b.share_x.emplace_back(share.tokens.size() * H);
    for (size_t i = 0; i < share.tokens.size(); ++i) {
      std::memcpy(sx.data() + i * H, b.x.data() + share.tokens[i] * H, H * sizeof(float));
    }
    b.shares.push_back(share);
  }
  const size_t elem = wire == common::WireDType::kF32    ? 4
                      : wire == common::WireDType::kBF16 ? 2
                                                         : 1;
  b.min_bytes = static_cast<size_t>(b.visits + b.reply_rows) * H * elem;
  return b;
}

std::unique_ptr<core::ExpertBackend> RemoteBackend(const ServerSet& set,
                                                   const place::Placement& placement,
                                                   common::WireDType wire) {
  dmoe::router::RemoteExpertOptions o;
  o.servers = set.addresses();
  o.placement = placement;
  o.wire_dtype = wire;
  auto r = dmoe::router::MakeRemoteExpertBackend(std::move(o));
  if (!r.ok()) Die(r.status(), "MakeRemoteExpertBackend");
  return *std::move(r);
}

uint64_t LoopbackTxBytes() {
  std::ifstream in("/sys/class/net/lo/statistics/tx_bytes");
  uint64_t v = 0;
  in >> v;
  return v;
}

// ---- one (N, T) row
// ------------------------------------------------------------------

struct Row {
  int servers = 0, tokens = 0, inproc_threads = 0, layer_calls = 0, wire_calls = 0;
  double visits_per_token = 0;
  double rows_back_per_token = 0;   // reply rows (see Batch::reply_rows)
  Stats inproc, remote, grpc, raw;  // seconds
  Stats server_compute;             // wire-only FFNs in-process, per batch (ServerCompute)
  Stats grpc_net;                   // gRPC round trip - server_compute, per call
  double codec = 0;                 // seconds of activation packing/unpacking (CodecTime)
  double rel_diff = 0;              // max |remote - in-process| / max |in-process|
  double req_per_token = 0, rep_per_token = 0, min_per_token = 0, lo_per_token = 0;
};

struct MemoryRow {
  int servers = 0, server = 0;
  int64_t slots = 0;
  size_t weights = 0;
  ProcMemory full, wire_only;
};

void Check(const absl::Status& s, std::string_view what) {
  if (!s.ok()) Die(s, what);
}

// The median time of `wire_local` computing each share of `b` alone, at the
// servers' thread count; the max over shares (the servers run in parallel, so
// this is a lower bound of their compute on a host with fewer free cores than
// servers).
double ServerCompute(const Batch& b, const Layer& layer, core::ExpertBackend& wire_local,
                     int reps) {
  const int64_t H = layer.cfg.hidden_size;
  std::vector<float> out;
  double worst = 0;
  for (size_t i = 0; i < b.shares.size(); ++i) {
    const place::ServerShare& sh = b.shares[i];
    core::ExpertBatch view;
    view.layer = layer.index;
    view.num_tokens = static_cast<int64_t>(sh.tokens.size());
    view.hidden = H;
    view.x = b.share_x[i].data();
    view.token_offsets = sh.token_offsets;
    view.ffn_ids = sh.ffn_ids;
    view.weights = sh.weights;
    out.resize(b.share_x[i].size());
    std::vector<double> t;
    for (int r = -1; r < reps; ++r) {  // r < 0: warm-up
      const auto t0 = Clock::now();
      Check(wire_local.Compute(view, out.data()), "in-process wire-only Compute");
      if (r >= 0) t.push_back(Seconds(t0, Clock::now()));
    }
    worst = std::max(worst, Summarize(t).median);
  }
  return worst;
}

// The activation codec's share of a round trip, timed in this process: the
// router packs every request and unpacks every reply (one after the other),
// each server unpacks its request and packs its reply (in parallel: max over
// servers). Median over `reps`.
double CodecTime(const Batch& b, common::WireDType wire, int64_t hidden, int reps) {
  std::string data, scales;
  std::vector<float> rows;
  std::vector<double> t;
  for (int r = -1; r < reps; ++r) {
    double router = 0, server = 0;
    for (const std::vector<float>& x : b.share_x) {
      const int64_t n = static_cast<int64_t>(x.size()) / hidden;
      rows.resize(x.size());
      auto t0 = Clock::now();
      common::PackActivations(x.data(), n, hidden, 0, wire, &data, &scales);
      Check(common::UnpackActivations(wire, data, scales, n, hidden, rows.data()),
            "UnpackActivations");
      // A reply has the request's shape: each side packs one and unpacks one.
      const double pack_unpack = Seconds(t0, Clock::now());
      router += pack_unpack;
      server = std::max(server, pack_unpack);
    }
    if (r >= 0) t.push_back(router + server);
  }
  return Summarize(t).median;
}

Row RunRow(Layer& layer, core::ExpertBackend& wire_local, const place::Placement& placement, int n,
           int tokens, core::ExpertBackend& full, core::ExpertBackend& wire_only,
           RawEchoClient& raw, const Options& o) {
  const int64_t H = layer.cfg.hidden_size;
  const int cores = std::max(1u, std::thread::hardware_concurrency());
  Row row;
  row.servers = n;
  row.tokens = tokens;
  row.inproc_threads = std::min(n * o.threads, cores);
  const int num_batches = o.quick ? 2 : 4;
  std::vector<Batch> batches;
  for (int i = 0; i < num_batches; ++i)
    batches.push_back(MakeBatch(layer, placement, o.wire, tokens, 7919ull * tokens + i));
  std::vector<float> out_local(static_cast<size_t>(tokens * H)), out_remote(out_local.size());

  // 1. Layer: in-process vs the full servers, alternating call by call.
  core::SetComputeThreads(row.inproc_threads);
  const int layer_calls = o.quick ? 2 * num_batches : (tokens >= 256 ? 3 : 5) * num_batches;
  std::vector<double> t_local, t_remote;
  double max_abs = 0, max_diff = 0;
  for (int i = -num_batches; i < layer_calls; ++i) {  // i < 0: warm-up
    const Batch& b = batches[(i + num_batches) % num_batches];
    const core::ExpertBatch view = b.View(layer.index, H);
    auto t0 = Clock::now();
    Check(layer.local->Compute(view, out_local.data()), "in-process Compute");
    auto t1 = Clock::now();
    Check(full.Compute(view, out_remote.data()), "remote Compute (full servers)");
    auto t2 = Clock::now();
    if (i < 0) continue;
    t_local.push_back(Seconds(t0, t1));
    t_remote.push_back(Seconds(t1, t2));
    for (size_t k = 0; k < out_local.size(); ++k) {
      max_abs = std::max(max_abs, double(std::fabs(out_local[k])));
      max_diff = std::max(max_diff, double(std::fabs(out_local[k] - out_remote[k])));
    }
  }
  row.layer_calls = layer_calls;
  row.inproc = Summarize(t_local);
  row.remote = Summarize(t_remote);
  row.rel_diff = max_abs > 0 ? max_diff / max_abs : 0;

  // 2. Wire: what the wire-only servers compute, then the wire-only servers
  // over gRPC vs raw TCP, alternating call by call.
  core::SetComputeThreads(o.threads);
  std::vector<double> compute;
  for (Batch& b : batches) {
    b.server_compute = ServerCompute(b, layer, wire_local, o.quick ? 3 : 15);
    compute.push_back(b.server_compute);
  }
  row.server_compute = Summarize(compute);
  std::vector<double> codec;
  for (const Batch& b : batches) codec.push_back(CodecTime(b, o.wire, H, o.quick ? 3 : 15));
  row.codec = Summarize(codec).median;
  const int wire_calls = o.quick ? 20 : (tokens >= 256 ? 150 : 300);
  std::vector<double> t_grpc, t_raw, t_net;
  uint64_t lo_bytes = 0;
  size_t tokens_sent = 0;
  for (int i = -num_batches; i < wire_calls; ++i) {
    const Batch& b = batches[(i + num_batches) % num_batches];
    const core::ExpertBatch view = b.View(layer.index, H);
    const uint64_t lo0 = LoopbackTxBytes();
    auto t0 = Clock::now();
    Check(wire_only.Compute(view, out_remote.data()), "remote Compute (wire-only servers)");
    auto t1 = Clock::now();
    const uint64_t lo1 = LoopbackTxBytes();
    auto t2 = Clock::now();
    Check(raw.RoundTrip(b.frames), "raw TCP round trip");
    auto t3 = Clock::now();
    if (i < 0) continue;
    t_grpc.push_back(Seconds(t0, t1));
    t_net.push_back(Seconds(t0, t1) - b.server_compute);
    t_raw.push_back(Seconds(t2, t3));
    lo_bytes += lo1 - lo0;
    tokens_sent += static_cast<size_t>(tokens);
  }
  row.wire_calls = wire_calls;
  row.grpc = Summarize(t_grpc);
  row.grpc_net = Summarize(t_net);
  row.raw = Summarize(t_raw);
  row.lo_per_token = tokens_sent ? double(lo_bytes) / tokens_sent : 0;

  double req = 0, rep = 0, min = 0, visits = 0, back = 0;
  for (const Batch& b : batches) {
    req += b.request_bytes;
    rep += b.reply_bytes;
    min += b.min_bytes;
    visits += b.visits;
    back += b.reply_rows;
  }
  const double total_tokens = double(tokens) * batches.size();
  row.req_per_token = req / total_tokens;
  row.rep_per_token = rep / total_tokens;
  row.min_per_token = min / total_tokens;
  row.visits_per_token = visits / total_tokens;
  row.rows_back_per_token = back / total_tokens;
  return row;
}

// ---- micro-batching
// ----------------------------------------------------------------

// Forwards to a backend that can be switched between steps (the model is
// loaded once, the servers change with N) and adds up the time the caller
// spends inside Await: waiting for expert servers, with nothing else to do.
class TimedBackend final : public core::ExpertBackend {
 public:
  void set_target(core::ExpertBackend* target) { target_ = target; }
  void ResetTimes() { await_s_ = 0; }
  double await_seconds() const { return await_s_; }

  std::string Name() const override { return "timed"; }
  absl::Status LoadFfn(int32_t, int32_t, const core::FfnWeights&) override {
    return absl::FailedPreconditionError("wire_bench: the experts are remote");
  }
  absl::Status UnloadFfn(int32_t, int32_t) override {
    return absl::FailedPreconditionError("wire_bench: the experts are remote");
  }
  bool HasFfn(int32_t layer, int32_t ffn_id) const override {
    return target_ != nullptr && target_->HasFfn(layer, ffn_id);
  }
  absl::Status Compute(const core::ExpertBatch& batch, float* out) override {
    DMOE_ASSIGN_OR_RETURN(const uint64_t ticket, Submit(batch, out));
    return Await(ticket);
  }
  absl::StatusOr<uint64_t> Submit(const core::ExpertBatch& batch, float* out) override {
    return target_->Submit(batch, out);
  }
  absl::Status Await(uint64_t ticket) override {
    const auto t0 = Clock::now();
    absl::Status st = target_->Await(ticket);
    await_s_ += Seconds(t0, Clock::now());
    return st;
  }
  void Cancel(uint64_t ticket) override { target_->Cancel(ticket); }
  size_t WeightBytes() const override { return 0; }

 private:
  core::ExpertBackend* target_ = nullptr;
  double await_s_ = 0;
};

struct MicroModel {
  int micro_batches = 1;
  TimedBackend* experts = nullptr;  // owned by model
  std::unique_ptr<core::Model> model;
};

MicroModel LoadMicroModel(const std::string& dir, int micro_batches) {
  MicroModel m;
  m.micro_batches = micro_batches;
  core::ModelOptions opts;
  auto timed = std::make_unique<TimedBackend>();
  m.experts = timed.get();
  opts.experts = std::move(timed);
  opts.load_routed_experts = false;
  opts.load_shared_experts = false;
  opts.micro_batches = micro_batches;
  auto model = core::Model::Load(dir, std::move(opts));
  if (!model.ok()) Die(model.status(), "Model::Load");
  m.model = *std::move(model);
  return m;
}

struct MicroRow {
  int servers = 0, seqs = 0, tokens = 0;  // tokens per sequence in the step
  int steps = 0;
  Stats t[2];              // step time with micro_batches 1, 2 (seconds)
  double await_s[2] = {};  // time in Await per step (median)
};

// One step shape (prefill: `tokens` new tokens per sequence at position 0;
// decode: 1 token per sequence at position `tokens`) with both models.
MicroRow RunMicro(MicroModel (&models)[2], int n, int seqs, int tokens, bool decode, int steps) {
  MicroRow row;
  row.servers = n;
  row.seqs = seqs;
  row.tokens = decode ? 1 : tokens;
  row.steps = steps;
  const core::ModelConfig& cfg = models[0].model->config();
  std::mt19937 rng(11);
  std::uniform_int_distribution<int32_t> vocab(0, static_cast<int32_t>(cfg.vocab_size) - 1);
  std::vector<std::vector<int32_t>> prompt(seqs, std::vector<int32_t>(tokens)),
      next(seqs, std::vector<int32_t>(1));
  for (auto& p : prompt)
    for (int32_t& id : p) id = vocab(rng);
  for (auto& p : next) p[0] = vocab(rng);
  std::vector<float> logits;
  for (int k = 0; k < 2; ++k) {
    MicroModel& m = models[k];
    core::KvCache cache(cfg, size_t{1} << 30);
    std::vector<core::SeqInput> prefill(seqs), step(seqs);
    for (int i = 0; i < seqs; ++i) {
      auto id = cache.Allocate(tokens + 1);
      if (!id.ok()) Die(id.status(), "KvCache::Allocate");
      prefill[i] = {*id, prompt[i], false};
      step[i] = {*id, next[i], false};
    }
    std::vector<double> times, waits;
    if (decode) Check(m.model->Forward(prefill, cache, &logits), "prefill");
    for (int r = -1; r < steps; ++r) {  // r < 0: warm-up
      // The same step again: its tokens go to the same cache positions.
      for (const core::SeqInput& in : prefill) cache.SetLength(in.seq, decode ? tokens : 0);
      m.experts->ResetTimes();
      const auto t0 = Clock::now();
      Check(m.model->Forward(decode ? step : prefill, cache, &logits), "Forward");
      const double t = Seconds(t0, Clock::now());
      if (r < 0) continue;
      times.push_back(t);
      waits.push_back(m.experts->await_seconds());
    }
    row.t[k] = Summarize(times);
    row.await_s[k] = Summarize(waits).median;
  }
  return row;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  if (!ParseOptions(argc, argv, &o)) return 2;
  const std::string bin_dir = BinDir();
  char work_template[] = "/tmp/dmoe-wire-bench-XXXXXX";
  if (!mkdtemp(work_template)) {
    std::perror("mkdtemp");
    return 1;
  }
  const std::string work_dir = work_template;
  g_work_dir = work_dir;
  const std::string model = o.model.empty() ? kDefaultModel : o.model;
  if (o.model.empty()) Check(EnsureModel(model, bin_dir, work_dir), "model");
  const std::string wire_model = work_dir + "/wire-only-model";
  Check(WriteWireOnlyModel(model, wire_model), "wire-only model");

  // The first N's servers load their weights while this process loads its own.
  struct Servers {
    ServerSet full, wire;
    Clock::time_point launched;
  };
  auto launch = [&](int n) {
    auto sv = std::make_unique<Servers>();
    sv->launched = Clock::now();
    Check(sv->full.Launch(bin_dir, model, n, o.threads, work_dir, "full"), "full servers");
    Check(sv->wire.Launch(bin_dir, wire_model, n, o.threads, work_dir, "wire"),
          "wire-only servers");
    return sv;
  };
  std::unique_ptr<Servers> servers = launch(o.servers.front());

  const auto load_start = Clock::now();
  Layer layer = LoadLayer(model, /*with_gate=*/true);
  // The wire-only servers' FFNs in-process, to time what those servers compute.
  Layer wire_layer = LoadLayer(wire_model, /*with_gate=*/false);
  const core::ModelConfig& cfg = layer.cfg;
  const int cores = std::max(1u, std::thread::hardware_concurrency());
  const size_t elem = 2;  // bf16 weights on the servers
  const size_t expert_bytes = 3 * cfg.hidden_size * cfg.moe_intermediate_size * elem;
  const size_t shared_bytes = cfg.n_shared_experts * expert_bytes;

  std::printf(
      "wire_bench: one MoE layer (layer %d of %s: hidden %lld, %lld experts x "
      "inter %lld, top-%lld, %lld shared), bf16 experts, %s on the wire%s\n",
      layer.index, model.c_str(), static_cast<long long>(cfg.hidden_size),
      static_cast<long long>(cfg.n_routed_experts),
      static_cast<long long>(cfg.moe_intermediate_size),
      static_cast<long long>(cfg.num_experts_per_tok), static_cast<long long>(cfg.n_shared_experts),
      WireName(o.wire), o.quick ? " [--quick: smoke only, numbers not meaningful]" : "");
  std::printf(
      "host: %d cores; each expert server --threads %d; in-process threads = "
      "min(N x %d, %d); loaded %.2f GB in-process in %.1f s\n",
      cores, o.threads, o.threads, cores, layer.local->WeightBytes() / 1e9,
      Seconds(load_start, Clock::now()));
  const char* experiments = std::getenv("GRPC_EXPERIMENTS");
  std::printf("GRPC_EXPERIMENTS=%s (inherited by the servers)\n",
              experiments ? experiments : "(unset)");
  std::fflush(stdout);

  // 5. Micro-batching: the model loaded twice (micro_batches 1 and 2), its
  // experts switched to each N's full servers.
  const int micro_n =
      std::find(o.servers.begin(), o.servers.end(), 2) != o.servers.end() ? 2 : o.servers.back();
  const auto micro_start = Clock::now();
  MicroModel micro_models[2] = {LoadMicroModel(model, 1), LoadMicroModel(model, 2)};
  std::printf(
      "micro-batching: 2-layer model loaded twice (micro_batches 1, 2) in %.1f "
      "s\n",
      Seconds(micro_start, Clock::now()));
  std::fflush(stdout);

  std::vector<Row> rows;
  std::vector<MicroRow> micro_rows;
  std::vector<MemoryRow> memory;
  for (int n : o.servers) {
    auto placement = place::Placement::Contiguous(cfg, n);
    if (!placement.ok()) Die(placement.status(), "placement");
    if (!servers) servers = launch(n);
    ServerSet& full_set = servers->full;
    ServerSet& wire_set = servers->wire;
    Check(full_set.WaitReady(), "full servers");
    Check(wire_set.WaitReady(), "wire-only servers");
    std::fprintf(stderr,
                 "wire_bench: N=%d: %d + %d expert servers ready (launched "
                 "%.1f s earlier)\n",
                 n, n, n, Seconds(servers->launched, Clock::now()));
    auto full = RemoteBackend(full_set, *placement, o.wire);
    auto wire_only = RemoteBackend(wire_set, *placement, o.wire);
    RawEchoClient raw;
    Check(raw.Connect(wire_set.echo_ports()), "raw echo");
    for (int t : o.tokens) {
      rows.push_back(RunRow(layer, *wire_layer.local, *placement, n, t, *full, *wire_only, raw, o));
      std::fprintf(stderr, "wire_bench: N=%d T=%d done\n", n, t);
    }
    if (!o.quick || n == micro_n) {
      core::SetComputeThreads(o.threads);
      for (MicroModel& m : micro_models) m.experts->set_target(full.get());
      const int seqs = o.quick ? 4 : 8, len = o.quick ? 8 : 32;
      const int steps = o.quick ? 1 : 5;
      micro_rows.push_back(RunMicro(micro_models, n, seqs, len, false, steps));
      micro_rows.push_back(RunMicro(micro_models, n, seqs, len, true, o.quick ? 2 : 20));
      for (MicroModel& m : micro_models) m.experts->set_target(nullptr);
      std::fprintf(stderr, "wire_bench: N=%d micro-batching done\n", n);
    }
    for (int s = 0; s < n; ++s) {
      MemoryRow m;
      m.servers = n;
      m.server = s;
      m.slots = static_cast<int64_t>(placement->Slots(layer.index, s).size());
      m.weights = m.slots * expert_bytes + shared_bytes;
      m.full = full_set.Memory(s);
      m.wire_only = wire_set.Memory(s);
      memory.push_back(m);
    }
    full.reset();
    wire_only.reset();
    servers.reset();  // SIGTERM, wait
  }

  std::printf(
      "\n1. Layer time, expert compute included: in-process CPU backend vs "
      "RemoteExpertBackend through N full servers\n"
      "   (median / p90 over `calls`; overhead = remote / in-process; rel.diff "
      "= max|remote - in-process| / max|in-process|)\n");
  std::printf("%2s %5s %6s %5s %3s %10s %10s %10s %10s %8s %10s %9s\n", "N", "T", "visits", "calls",
              "thr", "in-proc ms", "p90", "remote ms", "p90", "overhead", "+ms", "rel.diff");
  for (const Row& r : rows) {
    std::printf(
        "%2d %5d %6.2f %5d %3d %10.3f %10.3f %10.3f %10.3f %7.2fx %10.3f "
        "%9.1e\n",
        r.servers, r.tokens, r.visits_per_token, r.layer_calls, r.inproc_threads,
        r.inproc.median * 1e3, r.inproc.p90 * 1e3, r.remote.median * 1e3, r.remote.p90 * 1e3,
        r.remote.median / r.inproc.median, (r.remote.median - r.inproc.median) * 1e3, r.rel_diff);
  }

  std::printf(
      "\n2. Wire: the same batches through N wire-only servers (moe_inter %lld:"
      " same bytes, ~no FLOPs) vs a raw-TCP round trip\n"
      "   of the same bytes per server to the same processes (median / p90 over"
      " `calls`). srv = what those servers still\n"
      "   compute (their share's FFNs in-process, max over servers); net = gRPC"
      " - srv, per call; codec = the part of net\n"
      "   spent packing/unpacking activations (router: all shares in turn; "
      "servers: max). Goal: gRPC <= 1.5x raw TCP.\n",
      static_cast<long long>(kWireOnlyInter));
  std::printf("%2s %5s %5s %9s %9s %8s %9s %8s %9s %9s %9s %8s %s\n", "N", "T", "calls", "gRPC us",
              "p90", "srv us", "net us", "codec", "raw us", "p90", "gRPC/raw", "net/raw",
              "goal <= 1.5x");
  for (const Row& r : rows) {
    const double ratio = r.grpc.median / r.raw.median;
    std::printf(
        "%2d %5d %5d %9.1f %9.1f %8.1f %9.1f %8.1f %9.1f %9.1f %8.2fx %7.2fx "
        "%s\n",
        r.servers, r.tokens, r.wire_calls, r.grpc.median * 1e6, r.grpc.p90 * 1e6,
        r.server_compute.median * 1e6, r.grpc_net.median * 1e6, r.codec * 1e6, r.raw.median * 1e6,
        r.raw.p90 * 1e6, ratio, r.grpc_net.median / r.raw.median, ratio <= 1.5 ? "met" : "MISSED");
  }

  std::printf(
      "\n3. Bytes on the wire per token (%s): gRPC messages as sent (protobuf +"
      " 5-byte prefix), both ways, vs the minimum\n"
      "   hidden x %zu B x (servers visited + rows back: one per (token, "
      "expert) with the default per-assignment replies); lo = loopback "
      "interface tx\n   bytes during the wire loop (all headers; upper "
      "bound)\n",
      WireName(o.wire),
      o.wire == common::WireDType::kF32    ? size_t{4}
      : o.wire == common::WireDType::kBF16 ? size_t{2}
                                           : size_t{1});
  std::printf("%2s %5s %6s %5s %10s %10s %10s %10s %7s %10s %7s\n", "N", "T", "visits", "back",
              "request", "reply", "total", "minimum", "ratio", "lo B/tok", "lo/min");
  for (const Row& r : rows) {
    const double total = r.req_per_token + r.rep_per_token;
    std::printf(
        "%2d %5d %6.2f %5.2f %10.0f %10.0f %10.0f %10.0f %6.3fx %10.0f "
        "%6.2fx\n",
        r.servers, r.tokens, r.visits_per_token, r.rows_back_per_token, r.req_per_token,
        r.rep_per_token, total, r.min_per_token, total / r.min_per_token, r.lo_per_token,
        r.lo_per_token / r.min_per_token);
  }

  std::printf(
      "\n4. Expert server memory after the runs: peak (VmHWM) and current "
      "(VmRSS = anon + file) RSS vs weights (slots' experts\n"
      "   + shared FFN, bf16); wire-only = RSS of the same server with ~no "
      "weights (runtime + gRPC + buffers)\n");
  std::printf("%2s %6s %5s %9s %9s %9s %9s %9s %8s %8s %9s %9s\n", "N", "server", "slots",
              "weights", "peak", "RSS", "anon", "file", "peak/w", "RSS/w", "RSS-w", "wire-only");
  constexpr double kMiB = 1048576.0;
  for (const MemoryRow& m : memory) {
    std::printf(
        "%2d %6d %5lld %5.0f MiB %5.0f MiB %5.0f MiB %5.0f MiB %5.0f MiB "
        "%7.3fx %7.3fx %5.0f MiB %5.0f MiB\n",
        m.servers, m.server, static_cast<long long>(m.slots), m.weights / kMiB, m.full.hwm / kMiB,
        m.full.rss / kMiB, m.full.anon / kMiB, m.full.file / kMiB, double(m.full.hwm) / m.weights,
        double(m.full.rss) / m.weights, (double(m.full.rss) - double(m.weights)) / kMiB,
        m.wire_only.rss / kMiB);
  }

  std::printf(
      "\n5. Micro-batching: one step of the 2-layer model, experts on N full "
      "servers, router threads %d (median / p90 over `steps`);\n"
      "   await = time per step the router waited in ExpertBackend::Await; "
      "overlap = 1 - t(2)/t(1)\n",
      o.threads);
  std::printf("%2s %8s %10s %5s %9s %9s %9s %9s %9s %9s %8s\n", "N", "step", "tokens", "steps",
              "t(1) ms", "p90", "await", "t(2) ms", "p90", "await", "overlap");
  for (const MicroRow& r : micro_rows) {
    const std::string shape = absl::StrCat(r.seqs, "x", r.tokens);
    std::printf("%2d %8s %10s %5d %9.2f %9.2f %9.2f %9.2f %9.2f %9.2f %7.1f%%\n", r.servers,
                r.tokens == 1 ? "decode" : "prefill", shape.c_str(), r.steps, r.t[0].median * 1e3,
                r.t[0].p90 * 1e3, r.await_s[0] * 1e3, r.t[1].median * 1e3, r.t[1].p90 * 1e3,
                r.await_s[1] * 1e3, 100 * (1 - r.t[1].median / r.t[0].median));
  }

  std::error_code ec;
  fs::remove_all(work_dir, ec);
  return 0;
}
