// The server side of one Dispatch stream (one router): a gRPC callback bidi
// reactor with one outstanding read and one outstanding write.
//
// Reads: each message is either a whole request or one chunk of a chunked
// request; chunks of one request_id are collected (no copying) until the last
// arrives, then the request is handed to the ComputeWorker without blocking.
// When the worker's queue is full the request is answered at once with
// RESOURCE_EXHAUSTED. Chunk sequence errors are answered in-band with
// INVALID_ARGUMENT (one unchunked error reply per request_id).
//
// Writes: replies from the worker (any thread) are queued and written one at a
// time. Request and response messages come from per-stream pools, so their
// byte buffers are reused once the stream is warm.
//
// Lifetime: reference-counted. gRPC holds one reference until OnDone, and each
// request queued at the worker holds one until the worker calls Done; the last
// one deletes the reactor. The stream finishes (OK) when the client has
// half-closed and every request has been answered, or (UNAVAILABLE) once a
// drain has begun and in-flight requests are answered; a cancelled or broken
// stream drops its pending replies.
#ifndef DMOE_EXPERT_SERVICE_INTERNAL_DISPATCH_REACTOR_H_
#define DMOE_EXPERT_SERVICE_INTERNAL_DISPATCH_REACTOR_H_

#include <atomic>
#include <deque>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "absl/synchronization/mutex.h"
#include "dmoe/v1/expert.pb.h"
#include "expert_service/internal/compute_worker.h"
#include "grpcpp/support/server_callback.h"

namespace dmoe::expert::internal {

class DispatchReactor;

// The live Dispatch streams of a server, so that shutdown can drain them.
// Thread-safe.
class StreamRegistry {
 public:
  // Starts draining: every live stream and every stream opened later finishes
  // with UNAVAILABLE once its in-flight requests are answered.
  void DrainAll();
  bool draining() const;
  // Streams that have not run OnDone yet.
  size_t live() const;
  // Blocks until every reactor ever created has been deleted (their OnDone ran
  // and the worker released them): the registry and the worker may then go.
  void WaitAllDeleted();

 private:
  friend class DispatchReactor;
  // Counts the reactor; false when draining has begun (it must refuse work).
  bool Add(DispatchReactor* r);
  void Remove(DispatchReactor* r);
  void Deleted();

  mutable absl::Mutex mu_;
  absl::flat_hash_set<DispatchReactor*> streams_ ABSL_GUARDED_BY(mu_);
  int64_t alive_ ABSL_GUARDED_BY(mu_) = 0;  // created, not yet deleted
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
};

class DispatchReactor final : public grpc::ServerBidiReactor<v1::ExpertRequest, v1::ExpertResponse>,
                              public ReplySink {
 public:
  // Starts reading. `worker` and `registry` must outlive the reactor.
  DispatchReactor(ComputeWorker& worker, StreamRegistry& registry);

  // grpc::ServerBidiReactor
  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;

  // ReplySink
  v1::ExpertResponse* NewResponse() override;
  void Send(v1::ExpertResponse* response) override;
  void Done(std::vector<std::unique_ptr<v1::ExpertRequest>> chunks) override;

  // Stops taking requests; finishes the stream once in-flight ones are
  // answered.
  void Drain();

 private:
  friend class StreamRegistry;
  ~DispatchReactor() override { registry_.Deleted(); }
  void Ref() { refs_.fetch_add(1, std::memory_order_relaxed); }
  void Unref();

  // Handles one received message (reactor thread). Returns nothing; replies
  // and queueing happen inside.
  void Handle(std::unique_ptr<v1::ExpertRequest> msg) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Answers `request_id` with `status` in-band (from a reaction).
  void ReplyError(uint64_t request_id, const absl::Status& status)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Enqueue(std::vector<std::unique_ptr<v1::ExpertRequest>> chunks)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::unique_ptr<v1::ExpertRequest> TakeRequest() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RecycleRequest(std::unique_ptr<v1::ExpertRequest> r) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Starts the next write or, when everything is answered and the stream may
  // end, Finish. gRPC operations are started under mu_ so that none follows
  // Finish; in gRPC 1.51 reads, writes and OnDone never run inline.
  void PumpLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  ComputeWorker& worker_;
  StreamRegistry& registry_;
  std::atomic<int> refs_{1};

  absl::Mutex mu_;
  std::unique_ptr<v1::ExpertRequest> reading_ ABSL_GUARDED_BY(mu_);  // target of the read
  // Chunks 0..k of the request being assembled (same request_id).
  std::vector<std::unique_ptr<v1::ExpertRequest>> assembling_ ABSL_GUARDED_BY(mu_);
  std::vector<std::unique_ptr<v1::ExpertRequest>> free_requests_ ABSL_GUARDED_BY(mu_);
  std::vector<std::unique_ptr<v1::ExpertResponse>> free_responses_ ABSL_GUARDED_BY(mu_);
  std::deque<std::unique_ptr<v1::ExpertResponse>> outgoing_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<v1::ExpertResponse> writing_ ABSL_GUARDED_BY(mu_);  // in flight
  int in_flight_ ABSL_GUARDED_BY(mu_) = 0;         // requests queued at the worker
  bool read_closed_ ABSL_GUARDED_BY(mu_) = false;  // client half-closed or stream broken
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  bool broken_ ABSL_GUARDED_BY(mu_) = false;  // cancelled or a write failed
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace dmoe::expert::internal

#endif  // DMOE_EXPERT_SERVICE_INTERNAL_DISPATCH_REACTOR_H_
