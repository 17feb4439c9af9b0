// The routers a gateway sends generations to, their load, and the choice of one
// per request.
//
// A background thread polls every router's GetLoad (all in parallel, each with
// a deadline) every `poll_interval`. A router is healthy when its last poll
// answered; one that failed is skipped until a later poll succeeds (a request
// that finds it unreachable can also mark it unhealthy at once). Pick() returns
// the healthy router with the least reported load (active + queued sequences);
// ties go to the one with fewer requests in flight from this gateway, then round
// robin. The report is up to one poll interval old, so a burst of requests
// between two polls is spread only by the in-flight tie-break.
//
// The pool also registers the upstream calls in flight, so that Close() can
// cancel every one of them (shutdown).
//
// Thread safety: every method is thread-safe. A Lease must not outlive its pool.
#ifndef DMOE_GATEWAY_ROUTER_POOL_H_
#define DMOE_GATEWAY_ROUTER_POOL_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "dmoe/v1/router.grpc.pb.h"
#include "grpcpp/grpcpp.h"

namespace dmoe::gateway {

struct RouterPoolOptions {
  std::vector<std::string> addresses;  // "host:port", at least one
  absl::Duration poll_interval = absl::Milliseconds(200);
  absl::Duration poll_timeout = absl::Seconds(1);  // deadline of one GetLoad
};

// What the pool knows of one router (a copy).
struct RouterState {
  std::string address;
  bool healthy = false;
  uint32_t active_sequences = 0;
  uint32_t queued_requests = 0;
  uint64_t kv_cache_free_bytes = 0;
  int inflight = 0;        // requests this gateway has in flight there
  std::string last_error;  // why it is unhealthy ("" when healthy)
};

class RouterPool {
 public:
  // Validates the addresses (INVALID_ARGUMENT naming the bad one), opens the
  // channels, runs one poll round (so health is known on return) and starts
  // the poller thread.
  static absl::StatusOr<std::unique_ptr<RouterPool>> Create(RouterPoolOptions options);
  ~RouterPool();  // stops the poller; Close() is implied

  RouterPool(const RouterPool&) = delete;
  RouterPool& operator=(const RouterPool&) = delete;

  // One in-flight slot on one router; releasing it (destruction) lowers the
  // router's in-flight count. Movable.
  class Lease {
   public:
    Lease() = default;
    Lease(Lease&& other) noexcept { *this = std::move(other); }
    Lease& operator=(Lease&& other) noexcept;
    ~Lease() { Release(); }
    int index() const { return index_; }
    const std::string& address() const;
    v1::RouterService::Stub* stub() const;
    void Release();

   private:
    friend class RouterPool;
    Lease(RouterPool* pool, int index) : pool_(pool), index_(index) {}
    RouterPool* pool_ = nullptr;
    int index_ = -1;
  };

  // The least-loaded healthy router whose index is not in `exclude`.
  // UNAVAILABLE (listing why each router is out) when there is none, or after Close().
  absl::StatusOr<Lease> Pick(const std::vector<int>& exclude = {});

  // Takes router `index` out of rotation until its next successful poll.
  void MarkUnhealthy(int index, const std::string& why);

  int size() const { return static_cast<int>(routers_.size()); }
  int HealthyCount() const;
  std::vector<RouterState> Snapshot() const;

  // Runs one poll round now and waits for it (tests; startup).
  void PollNow();
  // Called on the poller thread after every round with the new states.
  void SetPollListener(std::function<void(const std::vector<RouterState>&)> listener);

  // Upstream call registry: Register returns false once the pool is closed (the
  // caller must not start the call). A registered context must be unregistered
  // before it is destroyed.
  bool Register(grpc::ClientContext* context);
  void Unregister(grpc::ClientContext* context);
  // Refuses new calls and picks (UNAVAILABLE "gateway is shutting down") and
  // cancels every registered call.
  void Close();

 private:
  struct Router {
    std::string address;
    std::shared_ptr<grpc::Channel> channel;
    std::unique_ptr<v1::RouterService::Stub> stub;
  };
  explicit RouterPool(RouterPoolOptions options);
  void PollLoop();
  void ReleaseSlot(int index);

  // Const after construction.
  const RouterPoolOptions options_;
  std::vector<Router> routers_;

  mutable absl::Mutex mu_;
  std::vector<RouterState> states_ ABSL_GUARDED_BY(mu_);
  uint64_t round_robin_ ABSL_GUARDED_BY(mu_) = 0;
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  absl::flat_hash_set<grpc::ClientContext*> calls_ ABSL_GUARDED_BY(mu_);
  std::function<void(const std::vector<RouterState>&)> listener_ ABSL_GUARDED_BY(mu_);

  absl::Mutex poll_mu_;  // one poll round at a time
  absl::Notification stop_;
  std::thread poller_;
};

}  // namespace dmoe::gateway

#endif  // DMOE_GATEWAY_ROUTER_POOL_H_
