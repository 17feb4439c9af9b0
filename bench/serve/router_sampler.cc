#include "bench/serve/router_sampler.h"

#include <algorithm>
#include <cstdlib>
#include <sstream>

#include "absl/strings/str_format.h"
#include "bench/serve/http_stream.h"

namespace dmoe::bench::serve {

std::map<std::string, double> ParseRouterValues(const std::string& text) {
  std::map<std::string, double> out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    if (line.empty() || line[0] == '#') continue;
    const size_t space = line.find(' ');
    if (space == std::string::npos) continue;
    const std::string name = line.substr(0, space);
    const bool wanted = std::any_of(std::begin(kRouterGauges), std::end(kRouterGauges),
                                    [&](const char* n) { return name == n; }) ||
                        std::any_of(std::begin(kRouterCounters), std::end(kRouterCounters),
                                    [&](const char* n) { return name == n; });
    if (!wanted) continue;
    char* end = nullptr;
    const double v = std::strtod(line.c_str() + space + 1, &end);
    if (end != line.c_str() + space + 1) out[name] = v;
  }
  return out;
}

double RouterSample::PrefixHitRate() const {
  auto get = [&](const char* k) {
    auto it = growth.find(k);
    return it == growth.end() ? 0.0 : it->second;
  };
  const double queried = get("moe_router_prefix_cache_queried_tokens_total");
  return queried > 0 ? get("moe_router_prefix_cache_hit_tokens_total") / queried : 0.0;
}

std::string RouterSample::Format() const {
  if (n == 0) return "";
  auto at = [](const std::map<std::string, double>& m, const char* k) {
    auto it = m.find(k);
    return it == m.end() ? 0.0 : it->second;
  };
  return absl::StrFormat(
      "  router over the run (%d samples): active sequences mean %.1f max %.0f, queued mean "
      "%.1f max %.0f; preemptions %.0f (recomputed tokens %.0f); prefix cache hit %.1f%% of "
      "%.0f prompt tokens\n",
      n, at(mean, "moe_router_active_sequences"), at(max, "moe_router_active_sequences"),
      at(mean, "moe_router_queued_requests"), at(max, "moe_router_queued_requests"),
      at(growth, "moe_router_preemptions_total"), at(growth, "moe_router_recomputed_tokens_total"),
      100 * PrefixHitRate(), at(growth, "moe_router_prefix_cache_queried_tokens_total"));
}

nlohmann::json RouterSample::ToJson() const {
  return {{"samples", n},
          {"mean", mean},
          {"max", max},
          {"growth", growth},
          {"prefix_hit_rate", PrefixHitRate()}};
}

void RouterSampler::Scrape() {
  HttpStreamClient c(host_, port_, 5);
  const HttpResult r = c.Get("/metrics");
  if (r.status != 200) return;
  std::map<std::string, double> v = ParseRouterValues(r.body);
  std::lock_guard<std::mutex> lock(mu_);
  samples_.push_back(std::move(v));
}

void RouterSampler::Start(const std::string& host, int port, std::chrono::milliseconds period) {
  Stop();
  host_ = host;
  port_ = port;
  samples_.clear();
  if (port_ <= 0) return;
  stop_ = false;
  Scrape();
  thread_ = std::thread([this, period] {
    while (!stop_.load()) {
      const auto next = std::chrono::steady_clock::now() + period;
      while (!stop_.load() && std::chrono::steady_clock::now() < next) {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
      if (!stop_.load()) Scrape();
    }
  });
}

RouterSample RouterSampler::Stop() {
  RouterSample s;
  if (!thread_.joinable()) return s;
  stop_ = true;
  thread_.join();
  Scrape();
  std::lock_guard<std::mutex> lock(mu_);
  s.n = static_cast<int>(samples_.size());
  if (s.n == 0) return s;
  for (const char* g : kRouterGauges) {
    double sum = 0, mx = 0;
    for (const auto& v : samples_) {
      auto it = v.find(g);
      const double x = it == v.end() ? 0.0 : it->second;
      sum += x;
      mx = std::max(mx, x);
    }
    s.mean[g] = sum / s.n;
    s.max[g] = mx;
  }
  for (const char* c : kRouterCounters) {
    auto first = samples_.front().find(c), last = samples_.back().find(c);
    if (first != samples_.front().end() && last != samples_.back().end()) {
      s.growth[c] = last->second - first->second;
    }
  }
  return s;
}

}  // namespace dmoe::bench::serve
