// One upstream RouterService.Generate stream on gRPC's callback API, read into a
// queue that the caller drains with Next().
//
// The call starts in the constructor; one read is always outstanding (tokens
// are a few bytes each and max_tokens bounds a stream, so the queue needs no
// flow control). Cancel() and the destructor TryCancel() the call: the router
// sees the cancellation and frees the sequence. The destructor waits for gRPC's
// OnDone, so no reaction can reach a destroyed object.
//
// Thread safety: Next() from one thread at a time; Cancel() from any thread.
#ifndef DMOE_GATEWAY_INTERNAL_GENERATE_CALL_H_
#define DMOE_GATEWAY_INTERNAL_GENERATE_CALL_H_

#include <deque>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "dmoe/v1/router.grpc.pb.h"
#include "gateway/router_pool.h"
#include "grpcpp/grpcpp.h"

namespace dmoe::gateway::internal {

class GenerateCall final : public grpc::ClientReadReactor<v1::GenerateResponse> {
 public:
  // Starts request on `stub` with `deadline`. `pool` registers the call so that
  // RouterPool::Close() cancels it; when the pool is already closed the call
  // never starts and ends with UNAVAILABLE. `stub` and `pool` must outlive it.
  GenerateCall(v1::RouterService::Stub* stub, RouterPool* pool, const v1::GenerateRequest& request,
               absl::Time deadline);
  ~GenerateCall() override;

  GenerateCall(const GenerateCall&) = delete;
  GenerateCall& operator=(const GenerateCall&) = delete;

  enum class Event { kMessage, kEnd, kTimeout };
  // Waits up to `wait` for the next message (kMessage, into *message) or the
  // end of the stream (kEnd, status into *end, once every message was taken).
  Event Next(absl::Duration wait, v1::GenerateResponse* message, grpc::Status* end);

  void Cancel() { context_.TryCancel(); }

  // gRPC reactions.
  void OnReadDone(bool ok) override;
  void OnDone(const grpc::Status& status) override;

 private:
  bool Ready() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !queue_.empty() || done_; }

  RouterPool* const pool_;
  grpc::ClientContext context_;
  v1::GenerateRequest request_;
  v1::GenerateResponse incoming_;  // the outstanding read's target
  bool registered_ = false;

  absl::Mutex mu_;
  std::deque<v1::GenerateResponse> queue_ ABSL_GUARDED_BY(mu_);
  bool done_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status status_ ABSL_GUARDED_BY(mu_);
  absl::Notification finished_;  // OnDone ran (or the call never started)
};

}  // namespace dmoe::gateway::internal

#endif  // DMOE_GATEWAY_INTERNAL_GENERATE_CALL_H_
