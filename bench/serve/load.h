// serve_bench's users: a closed loop of C users, each sending its next
// request when its last one ended, or an open loop of Poisson arrivals at a
// rate (at most C in flight; an arrival waits for a free user otherwise).
//
// Contract:
//   RunLoad(target, requests, spec)
//     issues spec.warmup_requests requests, then measured ones until
//     spec.num_requests were issued (if > 0) or spec.duration_s passed since the
//     first measured one (if > 0); requests[i mod size] is the i-th. Returns
//     one record per request in issue order (index < warmup_requests: warm-up),
//     start_s since the load began; waits for every request to end (each
//     within spec.timeout_s without a byte). Progress is printed to stderr
//     every ~5 s when `progress` is set.
#ifndef DMOE_BENCH_SERVE_LOAD_H_
#define DMOE_BENCH_SERVE_LOAD_H_

#include <cstdint>
#include <string>
#include <vector>

#include "bench/serve/stats.h"
#include "bench/serve/workload.h"

namespace dmoe::bench::serve {

struct Target {
  std::string host = "127.0.0.1";
  int port = 0;
};

struct LoadSpec {
  enum class Mode { kClosed, kOpen };
  Mode mode = Mode::kClosed;
  int concurrency = 1;  // closed: users; open: most requests in flight
  double rate = 0;      // open: mean arrivals per second
  int num_requests = 0;
  double duration_s = 0;
  int warmup_requests = 0;
  double timeout_s = 600;
  uint64_t seed = 1;
  bool progress = false;
  std::string Describe() const;
};

std::vector<RequestRecord> RunLoad(const Target& target, const std::vector<RequestSpec>& requests,
                                   const LoadSpec& spec);

}  // namespace dmoe::bench::serve

#endif  // DMOE_BENCH_SERVE_LOAD_H_
