#include "router_service/scheduler.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace dmoe::router {

struct Scheduler::Request {
  // Set before the request is queued, then read-only.
  RequestId id = 0;
  bool is_forward = false;
  std::vector<int32_t> prompt;  // after a preemption: + the tokens generated so far
  int64_t prompt_len = 0;       // the client's prompt
  int64_t max_tokens = 0;       // generate only
  std::vector<int32_t> stops;   // stop ids + eos ids (unless ignore_eos)
  std::string request_id;
  GenerateCallbacks gen;         // generate only
  bool all_positions = false;    // forward only
  ForwardCallback forward_done;  // forward only
  // Set by Cancel (under mu_), read by the scheduler thread.
  std::atomic<bool> cancelled{false};

  // Scheduler thread only.
  int32_t seq = -1;  // KV cache sequence, -1 before admission
  int64_t prefilled = 0;
  int64_t generated = 0;
  int32_t last_token = 0;        // the decode input of the next step
  std::vector<int32_t> tokens;   // the client's prompt + the tokens generated: one per position
  int64_t preempted_cached = 0;  // tokens cached when last preempted
  uint64_t admitted_at = 0;      // admission order; the latest is preempted first
  bool in_step = false;          // part of the batch being run
  bool done = false;             // finished by the step just run
  std::unique_ptr<core::Sampler> sampler;
  ForwardResult result;

  int64_t Capacity() const { return prompt_len + (is_forward ? 0 : max_tokens); }
  bool Prefilling() const { return prefilled < static_cast<int64_t>(prompt.size()); }
};

absl::StatusOr<std::unique_ptr<Scheduler>> Scheduler::Create(std::unique_ptr<core::Model> model,
                                                             SchedulerOptions options) {
  if (model == nullptr) return absl::InvalidArgumentError("scheduler: no model");
  if (options.kv_cache_bytes == 0) {
    return absl::InvalidArgumentError("scheduler: the KV cache budget must be positive");
  }
  if (options.max_batch_tokens < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "scheduler: max_batch_tokens must be at least 1, got ", options.max_batch_tokens));
  }
  if (options.max_queue < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("scheduler: max_queue must be at least 1, got ", options.max_queue));
  }
  std::unique_ptr<Scheduler> s(new Scheduler(std::move(model), options));
  s->thread_ = std::thread([p = s.get()] { p->Loop(); });
  return s;
}

Scheduler::Scheduler(std::unique_ptr<core::Model> model, SchedulerOptions options)
    : options_(options),
      model_(std::move(model)),
      cache_(model_->config(), options.kv_cache_bytes, options.kv_block_tokens,
             options.prefix_cache && options.kv_admission == KvAdmission::kPaged, options.kv_dtype),
      bytes_per_token_(cache_.BytesPerToken()) {
  kv_free_ = FreeKvBytes();
}

Scheduler::~Scheduler() { Shutdown(absl::ZeroDuration()); }

absl::Status Scheduler::ValidateTokens(std::span<const int32_t> tokens, const char* field) const {
  const core::ModelConfig& c = config();
  if (tokens.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(field, " is empty: give at least one token id"));
  }
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || tokens[i] >= c.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          field, "[", i, "] = ", tokens[i], " is outside the vocabulary [0, ", c.vocab_size, ")"));
    }
  }
  return absl::OkStatus();
}

absl::Status Scheduler::CheckFitsBudget(int64_t tokens, const std::string& what) const {
  // Whole blocks: the bytes a sequence of `tokens` reserves, against the
  // blocks the budget holds.
  const size_t need = cache_.ReserveBytes(tokens);
  const size_t usable = static_cast<size_t>(cache_.total_blocks()) * cache_.BlockBytes();
  if (need > usable) {
    return absl::ResourceExhaustedError(
        absl::StrCat("request needs ", need, " bytes of KV cache (", what, " = ", tokens,
                     " tokens x ", bytes_per_token_, " bytes, in blocks of ", cache_.block_tokens(),
                     " tokens), more than the router's whole KV cache of ", usable, " bytes (",
                     cache_.total_blocks(), " blocks in the --kv-cache-bytes budget of ",
                     options_.kv_cache_bytes, " bytes)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<RequestId> Scheduler::SubmitGenerate(GenerateParams p, GenerateCallbacks cb) {
  const core::ModelConfig& c = config();
  if (auto st = ValidateTokens(p.prompt, "prompt_tokens"); !st.ok()) return st;
  if (p.max_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_tokens must be at least 1, got ", p.max_tokens));
  }
  const int64_t prompt_len = static_cast<int64_t>(p.prompt.size());
  if (prompt_len + p.max_tokens > c.max_position_embeddings) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt (", prompt_len, " tokens) + max_tokens (", p.max_tokens,
                     ") = ", prompt_len + p.max_tokens, " exceeds the model's context of ",
                     c.max_position_embeddings, " tokens (max_position_embeddings)"));
  }
  if (auto st = p.sampling.Validate(); !st.ok()) return st;
  if (auto st =
          CheckFitsBudget(prompt_len + p.max_tokens,
                          absl::StrCat(prompt_len, " prompt + ", p.max_tokens, " max_tokens"));
      !st.ok()) {
    return st;
  }
  auto r = std::make_unique<Request>();
  r->prompt = std::move(p.prompt);
  r->tokens = r->prompt;
  r->prompt_len = prompt_len;
  r->max_tokens = p.max_tokens;
  r->stops = std::move(p.stop_token_ids);
  if (!p.ignore_eos) {
    for (int64_t e : c.eos_token_ids) r->stops.push_back(static_cast<int32_t>(e));
  }
  r->request_id = std::move(p.request_id);
  r->gen = std::move(cb);
  r->sampler = std::make_unique<core::Sampler>(p.sampling);
  return Enqueue(std::move(r));
}

absl::StatusOr<RequestId> Scheduler::SubmitForward(std::vector<int32_t> tokens, bool all_positions,
                                                   ForwardCallback done) {
  const core::ModelConfig& c = config();
  if (auto st = ValidateTokens(tokens, "tokens"); !st.ok()) return st;
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (n > c.max_position_embeddings) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokens: ", n, " tokens exceed the model's context of ",
                     c.max_position_embeddings, " tokens (max_position_embeddings)"));
  }
  if (auto st = CheckFitsBudget(n, absl::StrCat(n, " prompt tokens")); !st.ok()) return st;
  auto r = std::make_unique<Request>();
  r->is_forward = true;
  r->prompt = std::move(tokens);
  r->tokens = r->prompt;
  r->prompt_len = n;
  r->all_positions = all_positions;
  r->forward_done = std::move(done);
  return Enqueue(std::move(r));
}

absl::StatusOr<RequestId> Scheduler::Enqueue(std::unique_ptr<Request> r) {
  absl::MutexLock l(&mu_);
  if (draining_ || stop_) return absl::UnavailableError("router is shutting down");
  if (static_cast<int64_t>(queue_.size()) >= options_.max_queue) {
    return absl::ResourceExhaustedError(absl::StrCat("router overloaded: ", queue_.size(),
                                                     " requests queued (--max-queue ",
                                                     options_.max_queue, "); retry later"));
  }
  r->id = next_id_++;
  if (r->request_id.empty()) r->request_id = absl::StrCat("r", r->id);
  const RequestId id = r->id;
  live_[id] = r.get();
  queue_.push_back(std::move(r));
  return id;
}

void Scheduler::Cancel(RequestId id) {
  absl::MutexLock l(&mu_);
  auto it = live_.find(id);
  if (it != live_.end()) it->second->cancelled.store(true, std::memory_order_relaxed);
  // The thread is awake whenever something is queued or running, so it sees the
  // flag at its next admission or step; no signal needed.
}

SchedulerLoad Scheduler::GetLoad() const {
  absl::MutexLock l(&mu_);
  SchedulerLoad load;
  load.active_sequences = active_;
  load.queued_requests = static_cast<int64_t>(queue_.size());
  load.kv_cache_free_bytes = kv_free_;
  load.kv_cache_budget_bytes = static_cast<size_t>(cache_.total_blocks()) * cache_.BlockBytes();
  load.steps = steps_;
  load.step_tokens = step_tokens_;
  load.failed_steps = failed_steps_;
  load.preemptions = preemptions_;
  load.recomputed_tokens = recomputed_tokens_;
  load.kv_blocks_total = cache_.total_blocks();
  load.kv_bytes_per_token = bytes_per_token_;
  load.kv_blocks_used = kv_blocks_used_;
  load.kv_blocks_cached = kv_blocks_cached_;
  load.prefix_queried_tokens = prefix_queried_tokens_;
  load.prefix_hit_tokens = prefix_hit_tokens_;
  load.prefix_evicted_blocks = prefix_evicted_blocks_;
  load.kv_saturated_values = kv_saturated_;
  return load;
}

void Scheduler::Shutdown(absl::Duration grace) {
  absl::MutexLock sl(&shutdown_mu_);
  if (!thread_.joinable()) return;
  {
    absl::MutexLock l(&mu_);
    draining_ = true;
    auto idle = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return queue_.empty() && active_ == 0; };
    if (grace > absl::ZeroDuration()) mu_.AwaitWithTimeout(absl::Condition(&idle), grace);
    stop_ = true;
  }
  thread_.join();
}

void Scheduler::Loop() {
  while (Admit()) {
    if (!running_.empty()) Step();
  }
}

bool Scheduler::Admit() {
  std::vector<std::unique_ptr<Request>> admitted, cancelled;
  bool stop = false;
  {
    absl::MutexLock l(&mu_);
    // running_ is written only by this thread, so reading it here is safe.
    auto has_work = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
      return stop_ || !queue_.empty() || !running_.empty();
    };
    mu_.Await(absl::Condition(&has_work));
    stop = stop_;
    for (auto it = queue_.begin(); it != queue_.end();) {
      if (stop || (*it)->cancelled.load(std::memory_order_relaxed)) {
        cancelled.push_back(std::move(*it));
        it = queue_.erase(it);
      } else {
        ++it;
      }
    }
    // Strict FIFO: the head waits for room, and everything behind it waits too.
    // Reserve: room for prompt + max_tokens. Paged: free blocks for the
    // prompt (+ recomputed tokens) above the watermark that running
    // sequences grow into.
    size_t free = FreeKvBytes();
    int64_t free_blocks = cache_.free_blocks() - WatermarkBlocks();
    while (!stop && !queue_.empty()) {
      if (options_.kv_admission == KvAdmission::kReserve) {
        const size_t need = cache_.ReserveBytes(queue_.front()->Capacity());
        if (need > free) break;
        free -= need;
      } else {
        // Cached prefix blocks are not taken, but those no one holds stop
        // counting as free once held.
        const Request& q = *queue_.front();
        const core::KvCache::PrefixMatch m = cache_.MatchPrefix(q.prompt, MaxPrefix(q));
        const int64_t need =
            cache_.BlocksFor(static_cast<int64_t>(q.prompt.size())) - m.blocks + m.unheld;
        if (need > free_blocks && !(running_.empty() && admitted.empty())) break;
        free_blocks -= need;
      }
      admitted.push_back(std::move(queue_.front()));
      queue_.pop_front();
      ++active_;  // counted from here so that queued + active never dips
    }
  }
  const absl::Status shutting_down = absl::UnavailableError("router is shutting down");
  for (auto& r : cancelled) {
    Finish(std::move(r), stop ? shutting_down : absl::CancelledError("request cancelled"));
  }
  for (auto& r : admitted) {
    absl::StatusOr<int32_t> seq =
        options_.kv_admission == KvAdmission::kReserve
            ? cache_.Allocate(r->Capacity())
            : cache_.AllocateUnreserved(r->Capacity(), r->prompt, MaxPrefix(*r));
    if (!seq.ok()) {
      {
        absl::MutexLock l(&mu_);
        --active_;
      }
      Finish(std::move(r), seq.status());
      continue;
    }
    r->seq = *seq;
    r->admitted_at = ++admissions_;
    const int64_t hit = cache_.Length(r->seq);
    r->prefilled = hit;
    if (cache_.prefix_cache()) {
      absl::MutexLock l(&mu_);
      prefix_queried_tokens_ += r->prompt.size();
      prefix_hit_tokens_ += static_cast<uint64_t>(hit);
      recomputed_tokens_ += static_cast<uint64_t>(std::max<int64_t>(0, r->preempted_cached - hit));
    } else if (r->preempted_cached > 0) {
      absl::MutexLock l(&mu_);
      recomputed_tokens_ += static_cast<uint64_t>(r->preempted_cached);
    }
    r->preempted_cached = 0;
    running_.push_back(std::move(r));
  }
  if (stop) {
    for (auto& r : running_) Finish(std::move(r), shutting_down);
    running_.clear();
  }
  PublishLoad();
  return !stop;
}

int64_t Scheduler::MaxPrefix(const Request& r) {
  if (r.is_forward && r.all_positions) return 0;
  return static_cast<int64_t>(r.prompt.size()) - 1;
}

void Scheduler::PublishBlocks() {
  kv_free_ = FreeKvBytes();
  kv_blocks_used_ = cache_.used_blocks();
  kv_blocks_cached_ = cache_.cached_blocks();
  prefix_evicted_blocks_ = cache_.evictions();
  kv_saturated_ = cache_.saturated_values();
}

int64_t Scheduler::WatermarkBlocks() const {
  return std::max<int64_t>(1, cache_.total_blocks() / 100);
}

int64_t Scheduler::BuildBatch(bool* decode_skipped) {
  for (auto& r : running_) r->in_step = false;
  batch_.clear();
  members_.clear();
  *decode_skipped = false;
  int64_t budget = options_.max_batch_tokens;
  for (auto& r : running_) {
    if (r->Prefilling()) continue;
    if (budget == 0) {
      *decode_skipped = true;
      continue;
    }
    batch_.push_back({r->seq, {&r->last_token, 1}, false});
    members_.push_back(r.get());
    r->in_step = true;
    --budget;
  }
  for (auto& r : running_) {
    if (budget == 0) break;
    if (!r->Prefilling()) continue;
    const int64_t rest = static_cast<int64_t>(r->prompt.size()) - r->prefilled;
    const int64_t n = std::min(rest, budget);
    batch_.push_back({r->seq, std::span<const int32_t>(r->prompt).subspan(r->prefilled, n),
                      r->is_forward && r->all_positions});
    members_.push_back(r.get());
    r->in_step = true;
    budget -= n;
  }
  return budget;
}

bool Scheduler::MakeRoom() {
  int64_t need = 0;
  for (const core::SeqInput& in : batch_) {
    need +=
        cache_.BlocksToGrow(in.seq, cache_.Length(in.seq) + static_cast<int64_t>(in.tokens.size()));
  }
  if (need <= cache_.free_blocks() || running_.size() <= 1) return true;
  // Preempt the most recently admitted sequence: its blocks go back, its
  // tokens are kept and recomputed when it is admitted again, from the front
  // of the queue. Its sampler is kept, so its tokens are those it would
  // have produced without the preemption (the recompute gives the same bits).
  auto victim = std::max_element(
      running_.begin(), running_.end(),
      [](const auto& a, const auto& b) { return a->admitted_at < b->admitted_at; });
  std::unique_ptr<Request> r = std::move(*victim);
  running_.erase(victim);
  r->preempted_cached = cache_.Length(r->seq);
  cache_.Free(r->seq);
  r->seq = -1;
  r->in_step = false;
  r->prompt = r->tokens;  // recomputed from the start, generated tokens included
  r->prefilled = 0;
  r->result = ForwardResult();
  {
    absl::MutexLock l(&mu_);
    --active_;
    ++preemptions_;
    queue_.push_front(std::move(r));
    PublishBlocks();
  }
  return false;
}

void Scheduler::Step() {
  const auto step_begin = std::chrono::steady_clock::now();
  // Cancelled sequences leave before the batch is built.
  for (auto& r : running_) {
    if (r->cancelled.load(std::memory_order_relaxed)) {
      Finish(std::move(r), absl::CancelledError("request cancelled"));
    }
  }
  std::erase(running_, nullptr);
  if (running_.empty()) {
    PublishLoad();
    return;
  }

  int64_t budget = 0;
  bool decode_skipped = false;
  for (;;) {
    budget = BuildBatch(&decode_skipped);
    if (options_.kv_admission == KvAdmission::kReserve || MakeRoom()) break;
  }

  const absl::Time step_start = absl::Now();
  const absl::Status st = model_->Forward(batch_, cache_, &logits_);

  if (options_.on_step) options_.on_step(absl::Now() - step_start);
  {
    absl::MutexLock l(&mu_);
    ++steps_;
    step_tokens_ += options_.max_batch_tokens - budget;
    if (!st.ok()) ++failed_steps_;
  }
  if (!st.ok()) {
    // Only this batch's requests fail, or (when the error names them) only
    // the sequences it concerns: the others run again next step (nothing was
    // appended to their caches).
    const std::vector<int32_t> failed = core::FailedSequences(st);
    auto concerned = [&](const Request& r) {
      return failed.empty() || std::find(failed.begin(), failed.end(), r.seq) != failed.end();
    };
    std::vector<std::string> ids;
    for (Request* m : members_) {
      if (concerned(*m)) ids.push_back(m->request_id);
    }
    std::fprintf(stderr, "dmoe-router: step of %zu sequences failed for %zu (%s): %s: %s\n",
                 members_.size(), ids.size(), absl::StrJoin(ids, ",").c_str(),
                 absl::StatusCodeToString(st.code()).c_str(), std::string(st.message()).c_str());
    for (auto& r : running_) {
      if (r->in_step && concerned(*r)) Finish(std::move(r), st);
    }
    std::erase(running_, nullptr);
    for (auto& r : running_) r->in_step = false;
    PublishLoad();
    return;
  }

  const int64_t V = config().vocab_size;
  int64_t row = 0;
  bool any_done = false;
  bool prefill = false;
  double sample_s = 0;
  for (size_t i = 0; i < members_.size(); ++i) {
    Request* r = members_[i];
    const int64_t n = static_cast<int64_t>(batch_[i].tokens.size());
    const int64_t rows = batch_[i].all_logits ? n : 1;
    const float* first_row = logits_.data() + row * V;
    row += rows;
    if (r->Prefilling()) {
      r->prefilled += n;
      prefill = true;
    }
    if (r->is_forward) {
      if (r->all_positions) {
        r->result.logits.insert(r->result.logits.end(), first_row, first_row + rows * V);
        r->result.rows += rows;
      } else if (!r->Prefilling()) {
        r->result.logits.assign(first_row, first_row + V);
        r->result.rows = 1;
      }
      if (!r->Prefilling()) {
        r->result.vocab = V;
        r->done = any_done = true;
      }
      continue;
    }
    if (r->Prefilling()) continue;  // a chunk in the middle of the prompt
    const auto sample_begin = std::chrono::steady_clock::now();
    const int32_t token = r->sampler->Sample({first_row, static_cast<size_t>(V)});
    sample_s +=
        std::chrono::duration<double>(std::chrono::steady_clock::now() - sample_begin).count();
    r->last_token = token;
    r->tokens.push_back(token);
    TokenEvent ev;
    ev.token = token;
    ev.index = r->generated++;
    if (std::find(r->stops.begin(), r->stops.end(), token) != r->stops.end()) {
      ev.finish_reason = "stop";
    } else if (r->generated >= r->max_tokens) {
      ev.finish_reason = "length";
    }
    if (r->gen.on_token) r->gen.on_token(ev);
    if (!ev.finish_reason.empty()) r->done = any_done = true;
  }
  // The step's full blocks become cacheable (before finished sequences free
  // theirs, so those stay cached too).
  if (cache_.prefix_cache()) {
    for (Request* r : members_) cache_.Commit(r->seq, r->tokens);
  }
  if (any_done) {
    for (auto& r : running_) {
      if (r->done) Finish(std::move(r), absl::OkStatus());
    }
    std::erase(running_, nullptr);
  }
  if (decode_skipped) {
    // More decoders than the token budget: the ones that ran go to the back so
    // that the skipped ones go first next step (prefill order is unchanged).
    std::stable_partition(running_.begin(), running_.end(),
                          [](const auto& r) { return !r->in_step; });
  }
  for (auto& r : running_) r->in_step = false;
  PublishLoad();
  if (options_.on_step_stages) {
    core::StageTimes stages = model_->last_stage_times();
    stages.Add(core::Stage::kSample, sample_s);
    const double step_s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - step_begin).count();
    stages.Add(core::Stage::kSchedule, std::max(0.0, step_s - stages.Total()));
    options_.on_step_stages(stages, prefill);
  }
}

void Scheduler::Finish(std::unique_ptr<Request> r, const absl::Status& status) {
  const bool admitted = r->seq >= 0;
  if (admitted) cache_.Free(r->seq);
  r->seq = -1;
  {
    // The load is up to date before the client hears of the end.
    absl::MutexLock l(&mu_);
    live_.erase(r->id);
    if (admitted) --active_;
    PublishBlocks();
  }
  if (r->is_forward) {
    if (!r->forward_done) return;
    if (status.ok()) {
      r->forward_done(std::move(r->result));
    } else {
      r->forward_done(status);
    }
  } else if (r->gen.on_done) {
    r->gen.on_done(status);
  }
}

void Scheduler::PublishLoad() {
  absl::MutexLock l(&mu_);
  PublishBlocks();
}

size_t Scheduler::FreeKvBytes() const {
  return static_cast<size_t>(cache_.free_blocks()) * cache_.BlockBytes();
}

}  // namespace dmoe::router
