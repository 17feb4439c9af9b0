// One long-lived dmoe.v1.ExpertService/Dispatch stream to one expert server,
// driven through gRPC's callback API (a ClientBidiReactor).
//
// Why the callback API rather than a sync ClientReaderWriter with a reader
// thread: a router talks to N servers per MoE layer; the reactor needs no
// thread per stream, a pending Write never blocks the Compute thread (a stalled
// server cannot hold the router past its deadline inside a sync Write), and
// abandoning a stream is TryCancel + RemoveHold, never a join of a thread that
// may be blocked in Read.
//
// Protocol inside the process:
//   - The owner (the Compute thread of RemoteExpertBackend) calls Expect(id,
//     tokens) and then Send(chunk) for each chunk of request `id`. Writes are
//     queued; one is outstanding at a time.
//   - Several requests may be out at once (micro-batches). A reply is queued in
//     the inbox for the owner while its request_id is expected: from Expect(id)
//     until Forget(id), which the owner calls when it has the whole reply or
//     abandons the request (an error elsewhere or a deadline). Replies to
//     forgotten requests are dropped here, so a late reply can never be taken
//     as the answer to a later request. A reply to an id never sent (above
//     every Expect()ed one) is queued too: the owner reports the protocol
//     error.
//   - A failed read or write marks the stream broken; the owner then Close()s it
//     and opens a new one.
//   - Lifetime: the owner keeps its reference until Finished() (the end of
//     OnDone), and so does whoever holds the stream's channel. Then the last
//     reference to a ClientContext and to a grpc::Channel is always dropped on
//     the owner's thread: a Channel destroyed inside a reaction (on the thread
//     that runs its own callback queue) crashes gRPC 1.51 ("prior > 0" in
//     grpc_cq_internal_unref), seen in this backend's tests.
//
// Reactions never block: they take `hub->mu` for a few pointer moves, and no
// gRPC operation is started while holding it (gRPC may run a reaction inline).
//
// Thread safety: the methods are safe to call from one owner thread while
// gRPC's threads run the reactions. Methods named *Locked require hub->mu.
#ifndef DMOE_ROUTER_SERVICE_INTERNAL_DISPATCH_STREAM_H_
#define DMOE_ROUTER_SERVICE_INTERNAL_DISPATCH_STREAM_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "dmoe/v1/expert.grpc.pb.h"
#include "grpcpp/grpcpp.h"

namespace dmoe::router::internal {

// State shared by a backend and all the streams it ever opened; held by
// shared_ptr so that a stream finishing after its backend is gone stays valid.
struct DispatchHub {
  explicit DispatchHub(int num_servers) : in_flight(num_servers) {}
  // Guards the mutable state of every stream of this hub (one lock: the
  // owner waits for news from any of its streams with one Await).
  absl::Mutex mu;
  // Streams started and not yet finished (OnDone not run).
  int live_streams ABSL_GUARDED_BY(mu) = 0;
  // [num_servers] tokens sent to a server whose replies have not come back
  // (or whose stream has not ended): the live load used to pick replicas.
  std::vector<std::atomic<int64_t>> in_flight;
};

// Buffers a dispatch pool keeps between batches (requests here, reply buffers
// in RemoteExpertBackend) are at most this large; bigger ones (prefill) are
// freed when done, so that the router's memory is its working set rather than
// the high-water mark of every pooled object (issue 13: the router's RSS grew
// in steps over a 30-minute soak).
inline constexpr size_t kPooledBufferMaxBytes = size_t{256} << 10;
inline constexpr size_t kMaxPooledRequests = 8;

class DispatchStream final
    : public grpc::ClientBidiReactor<dmoe::v1::ExpertRequest, dmoe::v1::ExpertResponse> {
 public:
  // Starts a Dispatch call on `stub` (the stream connects in the background;
  // a connection failure shows up as a broken stream).
  static std::shared_ptr<DispatchStream> Start(dmoe::v1::ExpertService::Stub* stub,
                                               std::shared_ptr<DispatchHub> hub, int server);
  ~DispatchStream() override = default;

  // A request message to fill: a recycled one keeps the capacity of its
  // buffers. Every field must be set by the caller (nothing is cleared).
  // Sent requests return to a pool of at most kMaxPooledRequests, and only
  // when they use at most kPooledBufferMaxBytes: the pool holds the decode
  // working set, not every request's largest prefill chunk ever.
  std::unique_ptr<dmoe::v1::ExpertRequest> TakeRequest();
  // Bytes held by pooled requests.
  size_t PooledBytes() const;
  // Announces request `id` carrying `tokens` rows in total. Ids must increase.
  void Expect(uint64_t id, int64_t tokens);
  // Stops expecting request `id`: its queued and future replies are dropped.
  void Forget(uint64_t id);
  // Queues `req` for writing (dropped if the stream is broken).
  void Send(std::unique_ptr<dmoe::v1::ExpertRequest> req);

  // The caller holds hub->mu through its own pointer to the same hub (one Await
  // over many streams), which the analysis cannot equate with hub_->mu: these
  // three are not checked (ABSL_NO_THREAD_SAFETY_ANALYSIS).
  // True when the owner has something to look at: a reply, or a broken stream.
  bool HasNewsLocked() const ABSL_NO_THREAD_SAFETY_ANALYSIS;
  bool BrokenLocked() const ABSL_NO_THREAD_SAFETY_ANALYSIS;
  // Moves the queued replies, oldest first, into `out`.
  void TakeRepliesLocked(std::vector<std::unique_ptr<dmoe::v1::ExpertResponse>>* out)
      ABSL_NO_THREAD_SAFETY_ANALYSIS;

  bool Broken() const;
  // True once OnDone has run: gRPC no longer uses the stream.
  bool Finished() const;
  // Ends the call (idempotent). With `grace` > 0 and a stream that already
  // broke, waits up to `grace` for gRPC's final status first. Returns a text
  // saying why the stream ended (the final status where known).
  std::string Close(absl::Duration grace);

  // Reactions.
  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnDone(const grpc::Status& s) override;

 private:
  DispatchStream(std::shared_ptr<DispatchHub> hub, int server);
  void MarkBrokenLocked(const std::string& why) ABSL_EXCLUSIVE_LOCKS_REQUIRED(hub_->mu);
  // Pools `req` for TakeRequest when it is small and the pool has room, else frees it.
  void RecycleLocked(std::unique_ptr<dmoe::v1::ExpertRequest> req)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(hub_->mu);
  // In-flight accounting: `rows` of request `id` came back (`last`: all of it).
  void AccountReplyLocked(uint64_t id, int64_t rows, bool last)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(hub_->mu);

  // Const after construction.
  const std::shared_ptr<DispatchHub> hub_;
  const int server_;

  grpc::ClientContext context_;
  // The message the outstanding Read fills; touched only by Start and reactions.
  std::unique_ptr<dmoe::v1::ExpertResponse> read_buf_;

  // Guarded by hub_->mu.
  std::vector<uint64_t> expected_ ABSL_GUARDED_BY(hub_->mu);  // ids whose replies are wanted
  uint64_t max_expected_ ABSL_GUARDED_BY(hub_->mu) = 0;       // the highest id Expect()ed
  std::deque<std::unique_ptr<dmoe::v1::ExpertResponse>> inbox_ ABSL_GUARDED_BY(hub_->mu);
  std::unique_ptr<dmoe::v1::ExpertRequest> writing_ ABSL_GUARDED_BY(hub_->mu);  // outstanding
  std::deque<std::unique_ptr<dmoe::v1::ExpertRequest>> write_queue_ ABSL_GUARDED_BY(hub_->mu);
  std::vector<std::unique_ptr<dmoe::v1::ExpertRequest>> free_requests_ ABSL_GUARDED_BY(hub_->mu);
  struct Outstanding {
    uint64_t id;
    int64_t tokens;  // not yet answered
  };
  std::deque<Outstanding> outstanding_ ABSL_GUARDED_BY(hub_->mu);  // ascending ids
  bool broken_ ABSL_GUARDED_BY(hub_->mu) = false;
  std::string broken_reason_ ABSL_GUARDED_BY(hub_->mu);
  bool closed_ ABSL_GUARDED_BY(hub_->mu) = false;
  bool done_ ABSL_GUARDED_BY(hub_->mu) = false;  // OnDone has run
};

}  // namespace dmoe::router::internal

#endif  // DMOE_ROUTER_SERVICE_INTERNAL_DISPATCH_STREAM_H_
