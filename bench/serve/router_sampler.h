// The router's memory and concurrency over a serve_bench run: its gauges
// (moe_router_active_sequences, moe_router_queued_requests) sampled from
// /metrics while the load runs, and its KV counters (preemptions, recomputed
// tokens, prefix-cache queried / hit tokens) scraped before and after.
//
// Contract:
//   ParseRouterValues(text)  the unlabelled series of kRouterValueNames found in
//                            Prometheus text (others and unparsable lines
//                            ignored).
//   RouterSampler            Start(host, port, period) scrapes every `period` on
//                            its own thread until Stop(), which returns the mean
//                            and max of each gauge over the samples and the
//                            counters' growth between the first and the last
//                            scrape (Start and Stop scrape once each). Without
//                            a port it samples nothing (n = 0).
#ifndef DMOE_BENCH_SERVE_ROUTER_SAMPLER_H_
#define DMOE_BENCH_SERVE_ROUTER_SAMPLER_H_

#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "nlohmann/json.hpp"

namespace dmoe::bench::serve {

inline constexpr const char* kRouterGauges[] = {"moe_router_active_sequences",
                                                "moe_router_queued_requests"};
inline constexpr const char* kRouterCounters[] = {
    "moe_router_preemptions_total", "moe_router_recomputed_tokens_total",
    "moe_router_prefix_cache_queried_tokens_total", "moe_router_prefix_cache_hit_tokens_total"};

std::map<std::string, double> ParseRouterValues(const std::string& text);

struct RouterSample {
  int n = 0;                                // scrapes
  std::map<std::string, double> mean, max;  // gauges
  std::map<std::string, double> growth;     // counters: last - first
  // Tokens from the prefix cache / tokens looked up (0 when none were).
  double PrefixHitRate() const;
  std::string Format() const;  // "" when n == 0
  nlohmann::json ToJson() const;
};

class RouterSampler {
 public:
  ~RouterSampler() { Stop(); }
  void Start(const std::string& host, int port, std::chrono::milliseconds period);
  RouterSample Stop();

 private:
  void Scrape();
  std::string host_;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::thread thread_;
  std::mutex mu_;
  std::vector<std::map<std::string, double>> samples_;
};

}  // namespace dmoe::bench::serve

#endif  // DMOE_BENCH_SERVE_ROUTER_SAMPLER_H_
