#include "gateway/router_pool.h"

#include <algorithm>
#include <cstdio>
#include <tuple>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/blocking_counter.h"

namespace dmoe::gateway {
namespace {

constexpr char kNotPolled[] = "not polled yet";

absl::Status CheckAddress(const std::string& address) {
  const size_t colon = address.rfind(':');
  int port = 0;
  if (colon == std::string::npos || colon == 0 ||
      !absl::SimpleAtoi(address.substr(colon + 1), &port) || port < 1 || port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("router address '", address, "' is not HOST:PORT (port 1-65535)"));
  }
  return absl::OkStatus();
}

std::shared_ptr<grpc::Channel> OpenChannel(const std::string& address) {
  grpc::ChannelArguments args;
  // Forward replies carry logits (large); prompts in requests are small.
  args.SetMaxReceiveMessageSize(-1);
  // A router that restarts should be back in rotation within a few polls, not
  // after gRPC's default reconnect backoff (up to 120 s).
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
}

}  // namespace

RouterPool::Lease& RouterPool::Lease::operator=(Lease&& other) noexcept {
  if (this != &other) {
    Release();
    pool_ = std::exchange(other.pool_, nullptr);
    index_ = std::exchange(other.index_, -1);
  }
  return *this;
}

const std::string& RouterPool::Lease::address() const { return pool_->routers_[index_].address; }

v1::RouterService::Stub* RouterPool::Lease::stub() const {
  return pool_->routers_[index_].stub.get();
}

void RouterPool::Lease::Release() {
  if (pool_ != nullptr) pool_->ReleaseSlot(index_);
  pool_ = nullptr;
  index_ = -1;
}

RouterPool::RouterPool(RouterPoolOptions options) : options_(std::move(options)) {}

absl::StatusOr<std::unique_ptr<RouterPool>> RouterPool::Create(RouterPoolOptions options) {
  if (options.addresses.empty()) {
    return absl::InvalidArgumentError("no routers: give at least one HOST:PORT");
  }
  for (const std::string& a : options.addresses) {
    if (absl::Status st = CheckAddress(a); !st.ok()) return st;
  }
  if (options.poll_interval <= absl::ZeroDuration() ||
      options.poll_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("router poll interval and timeout must be positive");
  }
  std::unique_ptr<RouterPool> pool(new RouterPool(std::move(options)));
  {
    absl::MutexLock l(&pool->mu_);
    for (const std::string& a : pool->options_.addresses) {
      Router r;
      r.address = a;
      r.channel = OpenChannel(a);
      r.stub = v1::RouterService::NewStub(r.channel);
      pool->routers_.push_back(std::move(r));
      RouterState s;
      s.address = a;
      s.last_error = kNotPolled;
      pool->states_.push_back(std::move(s));
    }
  }
  pool->PollNow();
  pool->poller_ = std::thread([p = pool.get()] { p->PollLoop(); });
  return pool;
}

RouterPool::~RouterPool() {
  Close();
  stop_.Notify();
  if (poller_.joinable()) poller_.join();
}

void RouterPool::PollLoop() {
  while (!stop_.WaitForNotificationWithTimeout(options_.poll_interval)) PollNow();
}

void RouterPool::PollNow() {
  absl::MutexLock round(&poll_mu_);
  struct Probe {
    grpc::ClientContext context;
    v1::RouterLoadRequest request;
    v1::RouterLoadResponse response;
    grpc::Status status;
  };
  const int n = size();
  std::vector<std::unique_ptr<Probe>> probes(n);
  absl::BlockingCounter pending(n);
  for (int i = 0; i < n; ++i) {
    probes[i] = std::make_unique<Probe>();
    Probe* p = probes[i].get();
    p->context.set_deadline(absl::ToChronoTime(absl::Now() + options_.poll_timeout));
    routers_[i].stub->async()->GetLoad(&p->context, &p->request, &p->response,
                                       [p, &pending](grpc::Status st) {
                                         p->status = std::move(st);
                                         pending.DecrementCount();
                                       });
  }
  pending.Wait();
  std::vector<RouterState> states;
  std::function<void(const std::vector<RouterState>&)> listener;
  {
    absl::MutexLock l(&mu_);
    for (int i = 0; i < n; ++i) {
      RouterState& s = states_[i];
      const Probe& p = *probes[i];
      if (s.healthy != p.status.ok() || s.last_error == kNotPolled) {
        // Transitions only (and the first poll): a line per change, not per poll.
        std::fprintf(stderr, "dmoe-gateway: router %s %s%s\n", s.address.c_str(),
                     p.status.ok() ? "healthy" : "unhealthy: ",
                     p.status.ok() ? "" : p.status.error_message().c_str());
      }
      s.healthy = p.status.ok();
      if (s.healthy) {
        s.active_sequences = p.response.active_sequences();
        s.queued_requests = p.response.queued_requests();
        s.kv_cache_free_bytes = p.response.kv_cache_free_bytes();
        s.last_error.clear();
      } else {
        s.last_error = absl::StrCat("GetLoad failed: ", p.status.error_message());
      }
    }
    states = states_;
    listener = listener_;
  }
  if (listener) listener(states);
}

void RouterPool::SetPollListener(std::function<void(const std::vector<RouterState>&)> listener) {
  absl::MutexLock l(&mu_);
  listener_ = std::move(listener);
}

absl::StatusOr<RouterPool::Lease> RouterPool::Pick(const std::vector<int>& exclude) {
  absl::MutexLock l(&mu_);
  if (closed_) return absl::UnavailableError("gateway is shutting down");
  const int n = size();
  const uint64_t start = round_robin_++;
  int best = -1;
  std::tuple<uint64_t, int> best_key;
  for (int k = 0; k < n; ++k) {
    const int i = static_cast<int>((start + k) % n);
    const RouterState& s = states_[i];
    if (!s.healthy || std::find(exclude.begin(), exclude.end(), i) != exclude.end()) continue;
    const std::tuple<uint64_t, int> key(uint64_t{s.active_sequences} + s.queued_requests,
                                        s.inflight);
    if (best < 0 || key < best_key) {
      best = i;
      best_key = key;
    }
  }
  if (best < 0) {
    std::vector<std::string> why;
    for (int i = 0; i < n; ++i) {
      const RouterState& s = states_[i];
      why.push_back(absl::StrCat(s.address, ": ",
                                 s.healthy ? "already tried for this request" : s.last_error));
    }
    return absl::UnavailableError(
        absl::StrCat("no healthy router available (", absl::StrJoin(why, "; "), ")"));
  }
  ++states_[best].inflight;
  return Lease(this, best);
}

void RouterPool::ReleaseSlot(int index) {
  absl::MutexLock l(&mu_);
  --states_[index].inflight;
}

void RouterPool::MarkUnhealthy(int index, const std::string& why) {
  absl::MutexLock l(&mu_);
  if (states_[index].healthy) {
    std::fprintf(stderr, "dmoe-gateway: router %s unhealthy: %s\n", states_[index].address.c_str(),
                 why.c_str());
  }
  states_[index].healthy = false;
  states_[index].last_error = why;
}

int RouterPool::HealthyCount() const {
  absl::MutexLock l(&mu_);
  return static_cast<int>(std::count_if(states_.begin(), states_.end(),
                                        [](const RouterState& s) { return s.healthy; }));
}

std::vector<RouterState> RouterPool::Snapshot() const {
  absl::MutexLock l(&mu_);
  return states_;
}

bool RouterPool::Register(grpc::ClientContext* context) {
  absl::MutexLock l(&mu_);
  if (closed_) return false;
  calls_.insert(context);
  return true;
}

void RouterPool::Unregister(grpc::ClientContext* context) {
  absl::MutexLock l(&mu_);
  calls_.erase(context);
}

void RouterPool::Close() {
  absl::MutexLock l(&mu_);
  closed_ = true;
  // TryCancel is thread-safe; a context stays alive while it is registered.
  for (grpc::ClientContext* c : calls_) c->TryCancel();
}

}  // namespace dmoe::gateway
