// A cap on the generations in flight in one gateway (HTTP and gRPC together):
// beyond it requests are refused at once (HTTP 429 / RESOURCE_EXHAUSTED)
// instead of queueing behind the routers' own queues.
//
// Thread safety: thread-safe. A Slot must not outlive its limiter.
#ifndef DMOE_GATEWAY_INFLIGHT_LIMITER_H_
#define DMOE_GATEWAY_INFLIGHT_LIMITER_H_

#include <utility>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "prometheus/gauge.h"

namespace dmoe::gateway {

class InflightLimiter {
 public:
  // `gauge` (may be null) mirrors the count; it must outlive the limiter.
  InflightLimiter(int max_inflight, prometheus::Gauge* gauge) : max_(max_inflight), gauge_(gauge) {}

  // One admitted request; empty (false) when the cap was reached. Movable.
  class Slot {
   public:
    Slot() = default;
    Slot(Slot&& o) noexcept : limiter_(std::exchange(o.limiter_, nullptr)) {}
    Slot& operator=(Slot&& o) noexcept {
      if (this != &o) {
        Reset();
        limiter_ = std::exchange(o.limiter_, nullptr);
      }
      return *this;
    }
    ~Slot() { Reset(); }
    explicit operator bool() const { return limiter_ != nullptr; }
    void Reset() {
      if (limiter_ != nullptr) limiter_->Release();
      limiter_ = nullptr;
    }

   private:
    friend class InflightLimiter;
    explicit Slot(InflightLimiter* l) : limiter_(l) {}
    InflightLimiter* limiter_ = nullptr;
  };

  Slot TryAcquire() {
    absl::MutexLock l(&mu_);
    if (count_ >= max_) return Slot();
    ++count_;
    if (gauge_ != nullptr) gauge_->Increment();
    return Slot(this);
  }

  int max() const { return max_; }
  int current() const {
    absl::MutexLock l(&mu_);
    return count_;
  }
  // True when the count reached zero within `timeout`.
  bool WaitForIdle(absl::Duration timeout) {
    absl::MutexLock l(&mu_);
    return mu_.AwaitWithTimeout(absl::Condition(this, &InflightLimiter::Idle), timeout);
  }

 private:
  void Release() {
    absl::MutexLock l(&mu_);
    --count_;
    if (gauge_ != nullptr) gauge_->Decrement();
  }
  bool Idle() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return count_ == 0; }

  const int max_;
  prometheus::Gauge* const gauge_;
  mutable absl::Mutex mu_;
  int count_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace dmoe::gateway

#endif  // DMOE_GATEWAY_INFLIGHT_LIMITER_H_
