#include "gateway/generation.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/grpc_status.h"

namespace dmoe::gateway {

absl::StatusOr<std::unique_ptr<Generation>> Generation::Start(RouterPool& pool,
                                                              v1::GenerateRequest request,
                                                              absl::Time deadline) {
  absl::StatusOr<RouterPool::Lease> lease = pool.Pick();
  if (!lease.ok()) return lease.status();
  std::unique_ptr<Generation> g(new Generation(pool, std::move(request), deadline));
  g->StartOn(*std::move(lease));
  return g;
}

Generation::~Generation() {
  std::unique_ptr<internal::GenerateCall> call;
  RouterPool::Lease lease;
  {
    absl::MutexLock l(&mu_);
    call = std::move(call_);
    lease = std::move(lease_);
  }
  call.reset();  // cancels if still running and waits for gRPC to let go; then the lease
}

void Generation::StartOn(RouterPool::Lease lease) {
  tried_.push_back(lease.index());
  ++attempts_;
  auto call = std::make_unique<internal::GenerateCall>(lease.stub(), &pool_, request_, deadline_);
  std::unique_ptr<internal::GenerateCall> old;
  {
    absl::MutexLock l(&mu_);
    if (cancelled_) call->Cancel();
    old = std::exchange(call_, std::move(call));
    lease_ = std::move(lease);
  }
}

std::string Generation::router() const {
  absl::MutexLock l(&mu_);
  return lease_.index() >= 0 ? lease_.address() : std::string();
}

void Generation::Cancel() {
  absl::MutexLock l(&mu_);
  cancelled_ = true;
  if (call_ != nullptr) call_->Cancel();
}

Generation::Event Generation::Next(absl::Duration wait, v1::GenerateResponse* message,
                                   absl::Status* end) {
  const absl::Time until = absl::Now() + wait;
  while (!ended_) {
    internal::GenerateCall* call;
    int index;
    std::string address;
    {
      // call_ is only replaced on this thread, so the pointer stays valid below.
      absl::MutexLock l(&mu_);
      call = call_.get();
      index = lease_.index();
      address = lease_.address();
    }
    grpc::Status upstream;
    switch (call->Next(std::max(until - absl::Now(), absl::ZeroDuration()), message, &upstream)) {
      case internal::GenerateCall::Event::kTimeout:
        return Event::kTimeout;
      case internal::GenerateCall::Event::kMessage:
        got_token_ = true;
        return Event::kToken;
      case internal::GenerateCall::Event::kEnd:
        break;
    }
    absl::Status st = common::FromGrpc(upstream);
    if (st.ok()) {
      ended_ = true;
      break;
    }
    if (st.code() == absl::StatusCode::kDeadlineExceeded) {
      st = absl::DeadlineExceededError(
          absl::StrCat("router ", address, ": no answer before the gateway's request deadline (",
                       st.message(), ")"));
    } else {
      st = absl::Status(st.code(), absl::StrCat("router ", address, ": ", st.message()));
    }
    bool cancelled;
    {
      absl::MutexLock l(&mu_);
      cancelled = cancelled_;
    }
    const bool failover = !got_token_ && !cancelled && absl::Now() < deadline_ &&
                          (st.code() == absl::StatusCode::kUnavailable ||
                           st.code() == absl::StatusCode::kResourceExhausted);
    if (failover) {
      if (first_error_.ok()) first_error_ = st;
      if (st.code() == absl::StatusCode::kUnavailable) {
        pool_.MarkUnhealthy(index, std::string(st.message()));
      }
      absl::StatusOr<RouterPool::Lease> next = pool_.Pick(tried_);
      if (next.ok()) {
        StartOn(*std::move(next));
        continue;
      }
      st = first_error_;
    }
    ended_ = true;
    end_ = st;
  }
  // Done: give the router slot back now rather than when the caller lets go.
  {
    absl::MutexLock l(&mu_);
    lease_.Release();
  }
  *end = end_;
  return Event::kEnd;
}

}  // namespace dmoe::gateway
