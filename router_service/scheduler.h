// Continuous batching for the router: one thread that owns a core::Model and
// its core::KvCache and turns a stream of requests into Model::Forward steps.
//
// Requests enter a bounded FIFO admission queue. Admission reserves KV cache
// for prompt + max_tokens tokens (core::KvCache::Allocate); a request that does
// not fit now waits at the head of the queue (later requests wait behind it:
// admission is strictly FIFO) until running sequences free their cache. Each
// step builds one batch: every decoding sequence contributes its last token,
// then prefills are added in admission order, whole prompts or chunks of them,
// while the step's token budget (max_batch_tokens) allows. After the step every
// sequence that produced its last-position logit samples one token (a seeded
// core::Sampler per sequence), which is handed to the request's callback; a
// sequence ends at an eos id (unless ignore_eos), a stop id or max_tokens, and
// its cache is freed at once.
//
// When Model::Forward fails (e.g. an expert server is down) only the requests
// of that batch end, with the step's status; the scheduler keeps serving.
// Forward requests (logits of a prompt) are one-off sequences through the same
// queue and steps; their cache is freed when their logits are delivered.
//
// Callbacks run on the scheduler thread, never inside Submit*/Cancel: they must
// be quick and must not block or call back into the Scheduler's blocking
// methods (Shutdown). After a successful Submit exactly one terminal callback
// (GenerateCallbacks::on_done or the ForwardCallback) is made, also on
// cancellation (CANCELLED) and at shutdown (UNAVAILABLE); nothing after it.
//
// Thread safety: every public method may be called from any thread.
#ifndef DMOE_ROUTER_SERVICE_SCHEDULER_H_
#define DMOE_ROUTER_SERVICE_SCHEDULER_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/kv_cache.h"
#include "core/model.h"
#include "core/sampler.h"

namespace dmoe::router {

// How admission uses the KV cache. kReserve: a request reserves prompt +
// max_tokens (in whole blocks) when admitted and never waits for memory
// afterwards. kPaged: a request is admitted when the free blocks hold its
// prompt above a watermark (1% of the blocks, at least 1); sequences take
// blocks as they grow, and when a step's blocks are not free the most
// recently admitted sequence is preempted: its blocks are freed, its tokens
// kept, and it goes back to the front of the queue to be recomputed (same
// tokens as without the preemption). No request fails for lack of memory.
enum class KvAdmission { kReserve, kPaged };

struct SchedulerOptions {
  size_t kv_cache_bytes = size_t{1} << 30;                       // KV cache budget
  int64_t kv_block_tokens = core::KvCache::kDefaultBlockTokens;  // tokens per KV block
  KvAdmission kv_admission = KvAdmission::kPaged;
  // Prefix caching (paged admission only): full KV blocks are kept, content-
  // addressed by the tokens up to their end, and a new sequence starts from
  // the cached blocks of its longest cached prefix (core::KvCache). Tokens
  // and logits are bitwise those without it.
  bool prefix_cache = true;
  // KV cache storage (core::KvDtype): f32 is exact; f16 / bf16 hold twice the tokens.
  core::KvDtype kv_dtype = core::KvDtype::kF32;
  int64_t max_batch_tokens = 2048;  // tokens per step (decodes + prefill chunks)
  int64_t max_queue = 256;          // requests waiting for admission, at most
  // Called on the scheduler thread after each step with its duration.
  std::function<void(absl::Duration)> on_step;
  // Called on the scheduler thread after each successful step with where its
  // time went (Model::Forward's stages, sampling, and the scheduler's own work
  // from the start of Step to the end) and whether it carried prompt tokens.
  std::function<void(const core::StageTimes&, bool prefill)> on_step_stages;
};

struct GenerateParams {
  std::vector<int32_t> prompt;  // at least one token, ids in [0, vocab)
  int64_t max_tokens = 16;      // >= 1; prompt + max_tokens <= max_position_embeddings
  core::SamplingParams sampling;
  std::vector<int32_t> stop_token_ids;  // end generation (the stop token is emitted)
  bool ignore_eos = false;              // else the config's eos_token_ids also stop
  std::string request_id;               // for logs
};

struct TokenEvent {
  int32_t token = 0;
  int64_t index = 0;               // 0-based among the generated tokens
  std::string_view finish_reason;  // "" or, on the last token, "stop" / "length"
};

struct GenerateCallbacks {
  std::function<void(const TokenEvent&)> on_token;
  // Last call: OK after the token carrying a finish reason, or the error.
  std::function<void(const absl::Status&)> on_done;
};

struct ForwardResult {
  int64_t rows = 0;  // prompt length, or 1 for the last position only
  int64_t vocab = 0;
  std::vector<float> logits;  // [rows, vocab]
};
using ForwardCallback = std::function<void(absl::StatusOr<ForwardResult>)>;

struct SchedulerLoad {
  int64_t active_sequences = 0;  // admitted, not finished
  int64_t queued_requests = 0;   // waiting for admission
  size_t kv_cache_free_bytes = 0;
  size_t kv_cache_budget_bytes = 0;
  // Since start: model steps run, tokens they carried, steps that failed.
  uint64_t steps = 0;
  uint64_t step_tokens = 0;
  uint64_t failed_steps = 0;
  // Since start: sequences preempted for KV blocks, and the cached tokens
  // they had (recomputed when they resume).
  uint64_t preemptions = 0;
  uint64_t recomputed_tokens = 0;
  // KV blocks: all of them, those attached to sequences, and prefix-cached
  // ones no sequence holds (reusable, evicted when blocks are needed).
  size_t kv_bytes_per_token = 0;  // of the loaded model in the cache's dtype
  int64_t kv_blocks_total = 0;
  int64_t kv_blocks_used = 0;
  int64_t kv_blocks_cached = 0;
  // Since start: prompt tokens looked up in the prefix cache at admission
  // (recomputations included) and those found there; cached blocks evicted.
  uint64_t prefix_queried_tokens = 0;
  uint64_t prefix_hit_tokens = 0;
  uint64_t prefix_evicted_blocks = 0;
  // Since start: values an f16 cache stored saturated at +-65504.
  uint64_t kv_saturated_values = 0;
};

using RequestId = uint64_t;

class Scheduler {
 public:
  // Takes ownership of `model` and starts the scheduler thread. InvalidArgument
  // for a zero KV budget, max_batch_tokens < 1 or max_queue < 1.
  static absl::StatusOr<std::unique_ptr<Scheduler>> Create(std::unique_ptr<core::Model> model,
                                                           SchedulerOptions options);
  // Shutdown(absl::ZeroDuration()) when not yet shut down.
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  const core::ModelConfig& config() const { return model_->config(); }
  const SchedulerOptions& options() const { return options_; }

  // Queues a generation. Errors (no callback is made then): INVALID_ARGUMENT
  // for a bad request (message names the field); RESOURCE_EXHAUSTED when the
  // request needs more KV cache than the whole budget (names the bytes) or the
  // admission queue is full ("router overloaded: N requests queued");
  // UNAVAILABLE after Shutdown began.
  absl::StatusOr<RequestId> SubmitGenerate(GenerateParams params, GenerateCallbacks callbacks);

  // Queues a forward pass over `tokens`: logits of every position when
  // `all_positions`, else of the last one. Errors as SubmitGenerate.
  absl::StatusOr<RequestId> SubmitForward(std::vector<int32_t> tokens, bool all_positions,
                                          ForwardCallback done);

  // Ends the request at the next step (queued: at once) with CANCELLED and
  // frees its cache. No-op for an unknown or finished id.
  void Cancel(RequestId id);

  SchedulerLoad GetLoad() const;

  // Refuses new requests (UNAVAILABLE), lets admitted and queued ones run for
  // up to `grace`, then ends the rest with UNAVAILABLE and stops the thread.
  // Blocks until the thread has exited. Idempotent.
  void Shutdown(absl::Duration grace);

 private:
  struct Request;
  Scheduler(std::unique_ptr<core::Model> model, SchedulerOptions options);

  absl::Status ValidateTokens(std::span<const int32_t> tokens, const char* field) const;
  absl::Status CheckFitsBudget(int64_t tokens, const std::string& what) const;
  absl::StatusOr<RequestId> Enqueue(std::unique_ptr<Request> r);
  void Loop();
  // Moves admissible queued requests into running_; ends cancelled queued ones.
  // Returns false when the thread must exit.
  bool Admit();
  void Step();
  // Frees `r`'s cache, unregisters it and makes its terminal callback.
  void Finish(std::unique_ptr<Request> r, const absl::Status& status);
  void PublishLoad();
  // Bytes of the blocks no sequence has reserved.
  size_t FreeKvBytes() const;
  // Paged admission keeps this many blocks free for running sequences.
  int64_t WatermarkBlocks() const;
  // Fills batch_/members_ from running_ (decodes first, then prefill chunks in
  // admission order) and returns the unused token budget.
  int64_t BuildBatch(bool* decode_skipped);
  // Tokens of `r`'s prompt the prefix cache may provide (all but the last,
  // whose logits are needed; none when every position's logits are).
  static int64_t MaxPrefix(const Request& r);
  // Publishes the cache's block counts (mu_ held).
  void PublishBlocks() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Paged: true when the batch's new blocks are free; otherwise preempts the
  // most recently admitted sequence and returns false (rebuild the batch).
  bool MakeRoom();

  // Const after construction.
  const SchedulerOptions options_;
  const std::unique_ptr<core::Model> model_;
  // Scheduler thread only, except the cache's geometry (block_tokens,
  // total_blocks, BlockBytes, ReserveBytes), which is const after construction
  // and read by Submit* on any thread.
  core::KvCache cache_;
  const size_t bytes_per_token_;
  std::vector<std::unique_ptr<Request>> running_;  // admission order
  std::vector<core::SeqInput> batch_;              // per-step scratch
  std::vector<Request*> members_;                  // [batch_.size()]
  std::vector<float> logits_;                      // [rows, vocab]
  uint64_t admissions_ = 0;

  mutable absl::Mutex mu_;
  std::deque<std::unique_ptr<Request>> queue_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<RequestId, Request*> live_ ABSL_GUARDED_BY(mu_);  // queued + running
  RequestId next_id_ ABSL_GUARDED_BY(mu_) = 1;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  int64_t active_ ABSL_GUARDED_BY(mu_) = 0;
  size_t kv_free_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t steps_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t step_tokens_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t failed_steps_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t preemptions_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t recomputed_tokens_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t kv_blocks_used_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t kv_blocks_cached_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t prefix_queried_tokens_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t prefix_hit_tokens_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t prefix_evicted_blocks_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t kv_saturated_ ABSL_GUARDED_BY(mu_) = 0;
  std::thread thread_;  // started in Create, joined by Shutdown
  absl::Mutex shutdown_mu_;
};

}  // namespace dmoe::router

#endif  // DMOE_ROUTER_SERVICE_SCHEDULER_H_
