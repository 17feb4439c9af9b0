#include "bench/serve/load.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <memory>
#include <mutex>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"

namespace dmoe::bench::serve {
namespace {

using Clock = std::chrono::steady_clock;

double Since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Which requests to issue: the warm-up, then by count or by duration.
class Issuer {
 public:
  Issuer(const LoadSpec& spec, Clock::time_point t0) : spec_(spec), t0_(t0) {}
  // The next request's index, or -1 when no more are to be issued.
  int Next() {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopped_) return -1;
    const int i = issued_;
    if (i >= spec_.warmup_requests) {
      if (i == spec_.warmup_requests) measured_start_ = Since(t0_);
      const int measured = i - spec_.warmup_requests;
      const bool count_done = spec_.num_requests > 0 && measured >= spec_.num_requests;
      const bool time_done =
          spec_.duration_s > 0 && measured > 0 && Since(t0_) - measured_start_ >= spec_.duration_s;
      if (count_done || time_done) {
        stopped_ = true;
        return -1;
      }
    }
    ++issued_;
    return i;
  }
  int issued() {
    std::lock_guard<std::mutex> lock(mu_);
    return issued_;
  }

 private:
  const LoadSpec& spec_;
  const Clock::time_point t0_;
  std::mutex mu_;
  int issued_ = 0;
  bool stopped_ = false;
  double measured_start_ = 0;
};

class Records {
 public:
  void Put(int i, RequestRecord r) {
    std::lock_guard<std::mutex> lock(mu_);
    if (static_cast<int>(v_.size()) <= i) v_.resize(i + 1);
    v_[i] = std::move(r);
    ++done_;
    if (!v_[i].ok) ++failed_;
  }
  std::vector<RequestRecord> Take() {
    std::lock_guard<std::mutex> lock(mu_);
    return std::move(v_);
  }
  std::pair<int, int> Counts() {
    std::lock_guard<std::mutex> lock(mu_);
    return {done_, failed_};
  }

 private:
  std::mutex mu_;
  std::vector<RequestRecord> v_;
  int done_ = 0, failed_ = 0;
};

RequestRecord Send(HttpStreamClient& client, const RequestSpec& req, Clock::time_point t0) {
  const double start = Since(t0);
  HttpStreamClient::StopFn stop;
  if (req.stop_after > 0) {
    stop = [left = req.stop_after](const SseEvent& e) mutable {
      left -= TokensInEvent(e);
      return left <= 0;
    };
  }
  const HttpResult r = client.Post(req.path, req.body, std::move(stop));
  return RecordFromHttp(r, start, req.prompt_tokens);
}

}  // namespace

std::string LoadSpec::Describe() const {
  std::string s = mode == Mode::kClosed
                      ? absl::StrCat("closed loop, concurrency ", concurrency)
                      : absl::StrCat("open loop, Poisson ", rate, " req/s (at most ", concurrency,
                                     " in flight)");
  if (num_requests > 0) absl::StrAppend(&s, ", ", num_requests, " requests");
  if (duration_s > 0) absl::StrAppend(&s, ", ", duration_s, " s");
  absl::StrAppend(&s, " after ", warmup_requests, " warm-up");
  return s;
}

std::vector<RequestRecord> RunLoad(const Target& target, const std::vector<RequestSpec>& requests,
                                   const LoadSpec& spec) {
  const Clock::time_point t0 = Clock::now();
  Issuer issuer(spec, t0);
  Records records;
  std::atomic<bool> finished{false};
  std::thread progress;
  if (spec.progress) {
    progress = std::thread([&] {
      auto next = Clock::now() + std::chrono::seconds(5);
      while (!finished.load()) {
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
        if (Clock::now() < next) continue;
        next += std::chrono::seconds(5);
        const auto [done, failed] = records.Counts();
        std::fprintf(stderr, "serve_bench:   t=%5.0f s  %d issued, %d done, %d failed\n", Since(t0),
                     issuer.issued(), done, failed);
      }
    });
  }
  const int users = std::max(1, spec.concurrency);
  std::vector<std::thread> threads;
  if (spec.mode == LoadSpec::Mode::kClosed) {
    for (int u = 0; u < users; ++u) {
      threads.emplace_back([&] {
        HttpStreamClient client(target.host, target.port, spec.timeout_s);
        for (int i; (i = issuer.Next()) >= 0;) {
          records.Put(i, Send(client, requests[i % requests.size()], t0));
        }
      });
    }
  } else {
    // Arrivals go to a queue that `users` workers drain.
    std::mutex mu;
    std::condition_variable cv;
    std::deque<int> queue;
    bool closed = false;
    for (int u = 0; u < users; ++u) {
      threads.emplace_back([&] {
        HttpStreamClient client(target.host, target.port, spec.timeout_s);
        while (true) {
          int i;
          {
            std::unique_lock<std::mutex> lock(mu);
            cv.wait(lock, [&] { return closed || !queue.empty(); });
            if (queue.empty()) return;
            i = queue.front();
            queue.pop_front();
          }
          records.Put(i, Send(client, requests[i % requests.size()], t0));
        }
      });
    }
    std::mt19937_64 rng(spec.seed);
    std::exponential_distribution<double> gap(spec.rate > 0 ? spec.rate : 1.0);
    Clock::time_point at = Clock::now();
    for (int i; (i = issuer.Next()) >= 0;) {
      std::this_thread::sleep_until(at);
      {
        std::lock_guard<std::mutex> lock(mu);
        queue.push_back(i);
      }
      cv.notify_one();
      at += std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(gap(rng)));
    }
    {
      std::lock_guard<std::mutex> lock(mu);
      closed = true;
    }
    cv.notify_all();
  }
  for (auto& t : threads) t.join();
  finished = true;
  if (progress.joinable()) progress.join();
  return records.Take();
}

}  // namespace dmoe::bench::serve
