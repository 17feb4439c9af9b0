// serve_bench's side-by-side configurations: a whole dmoe deployment started
// on loopback (dmoe-expert x N, dmoe-router, dmoe-gateway), one after another,
// so that the same workload runs against each.
//
// Contract:
//   ParseClusterConfig("NAME:key=value,...")
//     keys: servers (0 = one process: the router computes the experts), shared
//     (expert|router), wire (auto|f32|bf16|fp8), micro (micro-batches),
//     threads (router compute threads; 0 = all cores), expert-threads (per
//     expert server), dtype (f32|bf16), kv-block (router --kv-block-tokens;
//     0 = its default), kv-bytes (router --kv-cache-bytes; K/M/G suffixes of
//     1024), kv-admission (paged|reserve), prefix-cache (on|off), kv-dtype
//     (auto|f32|f16|bf16), spin (auto|default|passive|N: how
//     long idle OpenMP threads spin, see ClusterConfig::SpinEnv). InvalidArgument
//     naming the key for an unknown key or a bad value.
//   EnsureModel(preset, layers, dir)
//     `dir` when it holds config.json, else runs dmoe make-model --preset
//     --layers --out dir (with the generated tokenizer) and returns it.
//   LocalCluster::Start(config, model_dir, work_dir)
//     starts the processes with logs and port files in work_dir, waits until
//     the gateway listens (5 min at most) and returns its HTTP port (the
//     router's /metrics port: router_metrics_port()); an error
//     names the process that did not come up and the end of its log. Stop()
//     (and the destructor) sends SIGTERM and waits, then SIGKILLs.
#ifndef DMOE_BENCH_SERVE_LAUNCHER_H_
#define DMOE_BENCH_SERVE_LAUNCHER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/colocation.h"
#include "testing/subprocess.h"

namespace dmoe::bench::serve {

struct ClusterConfig {
  std::string name;
  int servers = 0;
  std::string shared_expert = "expert";
  std::string wire_dtype = "auto";
  int micro_batches = 2;
  int router_threads = 0;
  int expert_threads = 1;
  std::string dtype = "bf16";
  // "auto": processes that share the host's cores with others (servers > 0)
  // get common/colocation.h's short spin (none when serve_bench's own
  // environment sets GOMP_SPINCOUNT or OMP_WAIT_POLICY: the children inherit
  // it), a lone process keeps libgomp's default; "default": libgomp's default
  // everywhere; "passive": OMP_WAIT_POLICY=passive; N: GOMP_SPINCOUNT=N.
  std::string spin = "auto";
  int kv_block_tokens = 0;     // 0: the router's default
  int64_t kv_cache_bytes = 0;  // 0: the router's default
  std::string kv_admission;    // "": the router's default
  std::string prefix_cache;    // "": the router's default
  std::string kv_dtype;        // "": the router's default
  std::string Describe() const;
  // The environment entries for every process of this configuration.
  std::vector<std::string> SpinEnv() const;

 private:
  std::string SpinNote() const;
};

absl::StatusOr<ClusterConfig> ParseClusterConfig(const std::string& spec);

absl::StatusOr<std::string> EnsureModel(const std::string& bin_dir, const std::string& preset,
                                        int layers, const std::string& dir);

class LocalCluster {
 public:
  explicit LocalCluster(std::string bin_dir) : bin_dir_(std::move(bin_dir)) {}
  ~LocalCluster() { Stop(); }
  absl::StatusOr<int> Start(const ClusterConfig& c, const std::string& model_dir,
                            const std::string& work_dir);
  // The router's /metrics port (after Start), 0 if it has none.
  int router_metrics_port() const { return router_metrics_port_; }
  void Stop();

 private:
  absl::StatusOr<int> WaitPort(const std::string& what, const std::string& port_file,
                               const testing::ChildProcess& child, const std::string& log);
  std::string bin_dir_;
  std::vector<std::unique_ptr<testing::ChildProcess>> experts_;
  std::unique_ptr<testing::ChildProcess> router_, gateway_;
  int router_metrics_port_ = 0;
};

}  // namespace dmoe::bench::serve

#endif  // DMOE_BENCH_SERVE_LAUNCHER_H_
