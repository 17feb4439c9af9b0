#include "bench/serve/launcher.h"

#include <signal.h>

#include <chrono>
#include <filesystem>
#include <fstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace dmoe::bench::serve {
namespace {

std::string Tail(const std::string& s, size_t n = 1500) {
  return s.size() <= n ? s : "..." + s.substr(s.size() - n);
}

std::string ReadAll(const std::string& path) {
  std::ifstream f(path);
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

}  // namespace

std::string ClusterConfig::SpinNote() const {
  const std::vector<std::string> env = SpinEnv();
  return env.empty() ? "" : absl::StrCat(", ", absl::StrJoin(env, " "));
}

std::string ClusterConfig::Describe() const {
  std::string kv;
  if (kv_cache_bytes > 0) absl::StrAppend(&kv, ", KV cache ", kv_cache_bytes, " bytes");
  if (!kv_admission.empty()) absl::StrAppend(&kv, ", KV admission ", kv_admission);
  if (!prefix_cache.empty()) absl::StrAppend(&kv, ", prefix cache ", prefix_cache);
  if (!kv_dtype.empty()) absl::StrAppend(&kv, ", KV dtype ", kv_dtype);
  if (kv_block_tokens > 0) absl::StrAppend(&kv, ", KV blocks of ", kv_block_tokens, " tokens");
  if (servers == 0) {
    return absl::StrCat(name, ": one process (router computes the experts, ", dtype, ", threads ",
                        router_threads == 0 ? "all" : std::to_string(router_threads), SpinNote(),
                        kv, ")");
  }
  return absl::StrCat(name, ": router + ", servers, " expert servers (", expert_threads,
                      " thread(s) each), shared expert on ", shared_expert, ", wire ", wire_dtype,
                      ", micro-batches ", micro_batches, ", ", dtype, SpinNote(), kv);
}

std::vector<std::string> ClusterConfig::SpinEnv() const {
  if (spin == "default" || (spin == "auto" && servers == 0)) return {};
  if (spin == "passive") return {"OMP_WAIT_POLICY=passive"};
  if (spin == "auto") {
    const std::string env = ColocatedSpinEnv();
    if (env.empty()) return {};
    return {env};
  }
  return {absl::StrCat("GOMP_SPINCOUNT=", spin)};
}

absl::StatusOr<ClusterConfig> ParseClusterConfig(const std::string& spec) {
  ClusterConfig c;
  const size_t colon = spec.find(':');
  c.name = spec.substr(0, colon);
  if (c.name.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("configuration \"", spec, "\": expected NAME:key=value,..."));
  }
  if (colon == std::string::npos) return c;
  for (absl::string_view kv : absl::StrSplit(spec.substr(colon + 1), ',', absl::SkipEmpty())) {
    const size_t eq = kv.find('=');
    const std::string key(kv.substr(0, eq));
    const std::string value(eq == absl::string_view::npos ? "" : kv.substr(eq + 1));
    auto bad = [&](const char* want) {
      return absl::InvalidArgumentError(
          absl::StrCat("configuration ", c.name, ": ", key, "=", value, ": expected ", want));
    };
    int n = 0;
    const bool is_int = absl::SimpleAtoi(value, &n);
    if (key == "servers") {
      if (!is_int || n < 0 || n > 64) return bad("0..64");
      c.servers = n;
    } else if (key == "shared") {
      if (value != "expert" && value != "router") return bad("expert or router");
      c.shared_expert = value;
    } else if (key == "wire") {
      if (value != "auto" && value != "f32" && value != "bf16" && value != "fp8") {
        return bad("auto, f32, bf16 or fp8");
      }
      c.wire_dtype = value;
    } else if (key == "micro") {
      if (!is_int || n < 1 || n > 16) return bad("1..16");
      c.micro_batches = n;
    } else if (key == "threads") {
      if (!is_int || n < 0 || n > 1024) return bad("0..1024");
      c.router_threads = n;
    } else if (key == "expert-threads") {
      if (!is_int || n < 0 || n > 1024) return bad("0..1024");
      c.expert_threads = n;
    } else if (key == "dtype") {
      if (value != "f32" && value != "bf16") return bad("f32 or bf16");
      c.dtype = value;
    } else if (key == "kv-block") {
      if (!is_int || n < 0 || n > 4096) return bad("0..4096");
      c.kv_block_tokens = n;
    } else if (key == "kv-bytes") {
      int64_t scale = 1;
      std::string digits = value;
      if (!digits.empty() &&
          (digits.back() == 'K' || digits.back() == 'M' || digits.back() == 'G')) {
        scale = digits.back() == 'K' ? 1 << 10 : digits.back() == 'M' ? 1 << 20 : 1 << 30;
        digits.pop_back();
      }
      int64_t v = 0;
      if (!absl::SimpleAtoi(digits, &v) || v < 1 || v > (int64_t{1} << 50) / scale) {
        return bad("a byte count >= 1, with an optional K, M or G suffix");
      }
      c.kv_cache_bytes = v * scale;
    } else if (key == "kv-admission") {
      if (value != "paged" && value != "reserve") return bad("paged or reserve");
      c.kv_admission = value;
    } else if (key == "kv-dtype") {
      if (value != "auto" && value != "f32" && value != "f16" && value != "bf16") {
        return bad("auto, f32, f16 or bf16");
      }
      c.kv_dtype = value;
    } else if (key == "prefix-cache") {
      if (value != "on" && value != "off") return bad("on or off");
      c.prefix_cache = value;
    } else if (key == "spin") {
      if (value != "auto" && value != "default" && value != "passive" && (!is_int || n < 0)) {
        return bad("auto, default, passive or a spin count >= 0");
      }
      c.spin = value;
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          "configuration ", c.name, ": unknown key \"", key,
          "\" (servers, shared, wire, micro, threads, expert-threads, dtype, kv-block, "
          "kv-bytes, kv-admission, prefix-cache, kv-dtype, spin)"));
    }
  }
  return c;
}

absl::StatusOr<std::string> EnsureModel(const std::string& bin_dir, const std::string& preset,
                                        int layers, const std::string& dir) {
  if (std::filesystem::exists(dir + "/config.json")) return dir;
  std::filesystem::create_directories(dir);
  std::vector<std::string> argv = {bin_dir + "/dmoe", "make-model", "--preset", preset,
                                   "--out",           dir};
  if (layers > 0) {
    argv.push_back("--layers");
    argv.push_back(std::to_string(layers));
  }
  testing::ChildProcess make;
  const std::string log = dir + ".make-model.log";
  if (!make.Start(argv, log)) return absl::InternalError("cannot start dmoe make-model");
  const int rc = make.Wait(std::chrono::minutes(30));
  if (rc != 0) {
    std::filesystem::remove(dir + "/config.json");
    return absl::InternalError(absl::StrCat("dmoe make-model --preset ", preset, " exited with ",
                                            rc, ":\n", Tail(make.Log())));
  }
  return dir;
}

absl::StatusOr<int> LocalCluster::WaitPort(const std::string& what, const std::string& port_file,
                                           const testing::ChildProcess& child,
                                           const std::string& log) {
  const int port = testing::WaitForPortFile(port_file, child, std::chrono::minutes(5));
  if (port == 0) {
    return absl::UnavailableError(
        absl::StrCat(what, " did not come up (log ", log, "):\n", Tail(ReadAll(log))));
  }
  return port;
}

absl::StatusOr<int> LocalCluster::Start(const ClusterConfig& c, const std::string& model_dir,
                                        const std::string& work_dir) {
  Stop();
  std::filesystem::create_directories(work_dir);
  const std::string dir = work_dir + "/" + c.name;
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  std::vector<std::string> addresses;
  for (int s = 0; s < c.servers; ++s) {
    auto child = std::make_unique<testing::ChildProcess>();
    const std::string port_file = absl::StrCat(dir, "/expert", s, ".port");
    const std::string log = absl::StrCat(dir, "/expert", s, ".log");
    if (!child->Start({bin_dir_ + "/dmoe-expert", "--model", model_dir, "--server-index",
                       std::to_string(s), "--num-servers", std::to_string(c.servers), "--port", "0",
                       "--port-file", port_file, "--dtype", c.dtype, "--threads",
                       std::to_string(c.expert_threads), "--metrics-port", "0"},
                      log, c.SpinEnv())) {
      return absl::InternalError("cannot start dmoe-expert");
    }
    experts_.push_back(std::move(child));
    absl::StatusOr<int> port =
        WaitPort(absl::StrCat("expert server ", s), port_file, *experts_.back(), log);
    if (!port.ok()) return port.status();
    addresses.push_back(absl::StrCat("127.0.0.1:", *port));
  }
  std::vector<std::string> argv = {bin_dir_ + "/dmoe-router",
                                   "--model",
                                   model_dir,
                                   "--port",
                                   "0",
                                   "--port-file",
                                   dir + "/router.port",
                                   "--metrics-port",
                                   "0",
                                   "--metrics-port-file",
                                   dir + "/router.metrics.port",
                                   "--dtype",
                                   c.dtype,
                                   "--threads",
                                   std::to_string(c.router_threads)};
  if (c.kv_cache_bytes > 0) {
    argv.push_back("--kv-cache-bytes");
    argv.push_back(std::to_string(c.kv_cache_bytes));
  }
  if (!c.kv_admission.empty()) {
    argv.push_back("--kv-admission");
    argv.push_back(c.kv_admission);
  }
  if (!c.prefix_cache.empty()) {
    argv.push_back("--prefix-cache");
    argv.push_back(c.prefix_cache);
  }
  if (!c.kv_dtype.empty()) {
    argv.push_back("--kv-dtype");
    argv.push_back(c.kv_dtype);
  }
  if (c.kv_block_tokens > 0) {
    argv.push_back("--kv-block-tokens");
    argv.push_back(std::to_string(c.kv_block_tokens));
  }
  if (c.servers > 0) {
    for (const std::string& a :
         {std::string("--experts"), absl::StrJoin(addresses, ","), std::string("--shared-expert"),
          c.shared_expert, std::string("--wire-dtype"), c.wire_dtype,
          std::string("--micro-batches"), std::to_string(c.micro_batches)}) {
      argv.push_back(a);
    }
  }
  router_ = std::make_unique<testing::ChildProcess>();
  if (!router_->Start(argv, dir + "/router.log", c.SpinEnv())) {
    return absl::InternalError("cannot start dmoe-router");
  }
  absl::StatusOr<int> router_port =
      WaitPort("dmoe-router", dir + "/router.port", *router_, dir + "/router.log");
  if (!router_port.ok()) return router_port.status();
  router_metrics_port_ =
      testing::WaitForPortFile(dir + "/router.metrics.port", *router_, std::chrono::seconds(10));
  gateway_ = std::make_unique<testing::ChildProcess>();
  std::vector<std::string> gw = {bin_dir_ + "/dmoe-gateway",
                                 "--routers",
                                 absl::StrCat("127.0.0.1:", *router_port),
                                 "--http-port",
                                 "0",
                                 "--port-file",
                                 dir + "/gateway.port",
                                 "--max-inflight",
                                 "1024"};
  if (std::filesystem::exists(model_dir + "/tokenizer.json")) {
    gw.push_back("--tokenizer");
    gw.push_back(model_dir);
  }
  if (!gateway_->Start(gw, dir + "/gateway.log", c.SpinEnv())) {
    return absl::InternalError("cannot start dmoe-gateway");
  }
  return WaitPort("dmoe-gateway", dir + "/gateway.port", *gateway_, dir + "/gateway.log");
}

void LocalCluster::Stop() {
  if (gateway_) gateway_->Kill(SIGTERM, std::chrono::seconds(10));
  if (router_) router_->Kill(SIGTERM, std::chrono::seconds(10));
  for (auto& e : experts_) e->Kill(SIGINT, std::chrono::seconds(10));
  gateway_.reset();
  router_.reset();
  experts_.clear();
}

}  // namespace dmoe::bench::serve
