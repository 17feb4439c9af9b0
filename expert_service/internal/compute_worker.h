// The expert server's compute worker: one thread, a bounded queue of requests
// from every Dispatch stream, and micro-batching across streams.
//
// Each loop takes the oldest queued request and every other queued request of
// the same layer (up to max_batch_tokens tokens, never across a barrier),
// validates each one on its own (an invalid request gets its in-band error and
// leaves the others alone), runs ONE backend Compute over the concatenated
// tokens, and sends each request its rows back through its ReplySink.
//
// Validation happens here, not in the gRPC reactions, so that it sees the slot
// table in queue order: a barrier (RunAfterQueued) runs after every request
// queued before it has been answered, which is how UnloadSlots drains.
//
// Thread safety: TryEnqueue / RunAfterQueued / Stop may be called from any
// thread; the worker thread is the only caller of backend Compute, under
// `backend_mu` (held per batch), which LoadSlots also takes per FFN load.
#ifndef DMOE_EXPERT_SERVICE_INTERNAL_COMPUTE_WORKER_H_
#define DMOE_EXPERT_SERVICE_INTERNAL_COMPUTE_WORKER_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/config.h"
#include "core/expert_backend.h"
#include "dmoe/v1/expert.pb.h"
#include "expert_service/internal/slot_table.h"

namespace dmoe::expert::internal {

// Where a request's replies go; implemented by the Dispatch stream reactor.
// All methods are thread-safe.
class ReplySink {
 public:
  // A cleared response message to fill (reused: its buffers keep their
  // capacity).
  virtual v1::ExpertResponse* NewResponse() = 0;
  // Queues a message from NewResponse for writing; the sink owns it again.
  virtual void Send(v1::ExpertResponse* response) = 0;
  // The worker is done with a request: its chunks go back to the sink's pool
  // and the reference the queued item held on the sink is dropped.
  virtual void Done(std::vector<std::unique_ptr<v1::ExpertRequest>> chunks) = 0;

 protected:
  ~ReplySink() = default;
};

// One request as it arrived: 1 chunk, or chunk 0..n-1 of one request_id.
struct WorkItem {
  ReplySink* sink = nullptr;  // referenced until sink->Done(chunks)
  std::vector<std::unique_ptr<v1::ExpertRequest>> chunks;
};

// The error reply for a request; `request_id` is echoed, the reply is
// unchunked.
void FillError(uint64_t request_id, const absl::Status& status, v1::ExpertResponse* response);

// Told what the worker does (the server's metrics). Methods must be quick and
// must not call back into the worker: OnQueueDepth and the RESOURCE_EXHAUSTED
// OnAnswered of TryEnqueue run under the worker's lock, on the enqueuing
// thread; the others on the worker thread.
class ComputeObserver {
 public:
  virtual ~ComputeObserver() = default;
  // One backend Compute over `tokens` rows of `layer` took `compute`.
  // `expert_tokens`: tokens computed per (layer, routed expert), non-zero
  // entries only; empty when the Compute failed.
  virtual void OnBatch(int32_t layer, int64_t tokens, absl::Duration compute,
                       std::span<const std::pair<LayerExpert, uint64_t>> expert_tokens) = 0;
  // A request answered: OK, its in-band error, or RESOURCE_EXHAUSTED when
  // TryEnqueue refused it (the caller answers it so).
  virtual void OnAnswered(absl::StatusCode code) = 0;
  // Requests now queued.
  virtual void OnQueueDepth(size_t queued) = 0;
};

struct ComputeWorkerOptions {
  size_t max_queue = 256;               // queued requests; beyond: RESOURCE_EXHAUSTED
  int64_t max_batch_tokens = 8192;      // tokens per Compute call (one request may exceed it)
  ComputeObserver* observer = nullptr;  // not owned; null = none
};

class ComputeWorker {
 public:
  // `cfg`, `backend`, `backend_mu` and `slots` must outlive the worker.
  ComputeWorker(const core::ModelConfig& cfg, core::ExpertBackend& backend, absl::Mutex& backend_mu,
                SlotTable& slots, ComputeWorkerOptions options);
  ~ComputeWorker();  // Stop()
  ComputeWorker(const ComputeWorker&) = delete;
  ComputeWorker& operator=(const ComputeWorker&) = delete;

  // Queues `item` without blocking. On false (queue full or stopped) `item` is
  // left untouched and the caller answers it.
  bool TryEnqueue(WorkItem& item);
  // Runs `fn` on the worker thread once every request queued before it has
  // been answered. Not bounded by max_queue. After Stop, runs `fn` inline.
  void RunAfterQueued(std::function<void()> fn);
  // Answers everything queued, then joins the thread. Idempotent.
  void Stop();

  size_t max_queue() const { return options_.max_queue; }
  size_t queued() const;

 private:
  struct Entry {
    WorkItem item;
    std::function<void()> barrier;  // set for barriers (item empty)
  };
  void Loop();
  void ProcessBatch(std::vector<WorkItem>& batch);
  // Appends a valid request to the batch buffers; on error they are unchanged.
  absl::Status Append(const WorkItem& item);
  void Reply(const WorkItem& item, int64_t first_row);
  // Runs the batch through the backend with one output row per assignment
  // into out_ (ExpertBatch::per_assignment_out, or one single-assignment
  // "token" per assignment where the backend cannot), and, when
  // `sum_tokens`, the per-token sums of those rows into summed_.
  absl::Status ComputePerAssignment(const core::ExpertBatch& b, bool sum_tokens);

  // Const after construction.
  const core::ModelConfig& cfg_;
  core::ExpertBackend& backend_;
  absl::Mutex& backend_mu_;
  SlotTable& slots_;
  const ComputeWorkerOptions options_;
  const int64_t hidden_;

  mutable absl::Mutex mu_;
  absl::CondVar cv_;
  std::deque<Entry> queue_ ABSL_GUARDED_BY(mu_);
  size_t queued_requests_ ABSL_GUARDED_BY(mu_) = 0;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;

  // Batch buffers, used by the worker thread only; grown, never shrunk.
  std::vector<float> x_;                 // [tokens, hidden] inputs of the batch
  std::vector<float> out_;               // [tokens or assignments, hidden] results
  std::vector<float> summed_;            // [tokens, hidden] per-token sums of out_ rows
  std::vector<float> xa_;                // [assignments, hidden] x row per assignment
  std::vector<int32_t> ones_;            // [assignments + 1] 0, 1, 2, ...
  std::vector<const float*> rows_;       // [assignments] into out_
  bool per_assignment_ = false;          // out_ holds per-assignment rows
  std::vector<int32_t> token_offsets_;   // [tokens + 1] into ffn_ids_ / weights_
  std::vector<int32_t> ffn_ids_;         // [assignments] expert id or kSharedFfn
  std::vector<float> weights_;           // [assignments]
  int64_t tokens_ = 0;                   // rows of the batch so far
  std::vector<uint64_t> expert_tokens_;  // [n_routed] assignments per expert in the batch
  std::vector<std::pair<LayerExpert, uint64_t>> counts_;  // the non-zero ones
  std::vector<int64_t> first_row_;  // [batch] first row of each request, -1 = failed
};

}  // namespace dmoe::expert::internal

#endif  // DMOE_EXPERT_SERVICE_INTERNAL_COMPUTE_WORKER_H_
