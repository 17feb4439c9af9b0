#include "gateway/internal/generate_call.h"

#include <utility>

namespace dmoe::gateway::internal {

GenerateCall::GenerateCall(v1::RouterService::Stub* stub, RouterPool* pool,
                           const v1::GenerateRequest& request, absl::Time deadline)
    : pool_(pool), request_(request) {
  context_.set_deadline(absl::ToChronoTime(deadline));
  registered_ = pool_->Register(&context_);
  if (!registered_) {
    absl::MutexLock l(&mu_);
    done_ = true;
    status_ = grpc::Status(grpc::StatusCode::UNAVAILABLE, "gateway is shutting down");
    finished_.Notify();
    return;
  }
  stub->async()->Generate(&context_, &request_, this);
  StartRead(&incoming_);
  StartCall();
}

GenerateCall::~GenerateCall() {
  if (registered_) {
    context_.TryCancel();
    finished_.WaitForNotification();
    pool_->Unregister(&context_);
  }
}

void GenerateCall::OnReadDone(bool ok) {
  if (!ok) return;  // the stream ended; OnDone brings the status
  {
    absl::MutexLock l(&mu_);
    queue_.push_back(std::move(incoming_));
  }
  incoming_.Clear();
  StartRead(&incoming_);
}

void GenerateCall::OnDone(const grpc::Status& status) {
  {
    absl::MutexLock l(&mu_);
    done_ = true;
    status_ = status;
  }
  // Last touch of this object from gRPC's side: the destructor may run as soon
  // as Notify publishes (absl::Notification is safe to destroy after a wait).
  finished_.Notify();
}

GenerateCall::Event GenerateCall::Next(absl::Duration wait, v1::GenerateResponse* message,
                                       grpc::Status* end) {
  absl::MutexLock l(&mu_);
  if (!mu_.AwaitWithTimeout(absl::Condition(this, &GenerateCall::Ready), wait)) {
    return Event::kTimeout;
  }
  if (!queue_.empty()) {
    *message = std::move(queue_.front());
    queue_.pop_front();
    return Event::kMessage;
  }
  *end = status_;
  return Event::kEnd;
}

}  // namespace dmoe::gateway::internal
