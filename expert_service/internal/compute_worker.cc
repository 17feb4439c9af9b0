#include "expert_service/internal/compute_worker.h"

#include <cmath>
#include <cstring>
#include <span>

#include "absl/strings/str_cat.h"
#include "common/wire.h"
#include "core/combine.h"
#include "core/status.h"
#include "expert_service/internal/request_validation.h"

namespace dmoe::expert::internal {
namespace {

uint64_t ItemRows(const WorkItem& item) {
  uint64_t rows = 0;
  for (const auto& c : item.chunks) rows += c->x().rows();
  return rows;
}

// The prefix of a chunk's error messages: "" for unchunked requests.
std::string ChunkPrefix(const WorkItem& item, size_t i) {
  return item.chunks.size() > 1 ? absl::StrCat("chunk ", i, ": ") : std::string();
}

}  // namespace

void FillError(uint64_t request_id, const absl::Status& status, v1::ExpertResponse* response) {
  response->set_request_id(request_id);
  response->clear_y();
  response->set_error_code(static_cast<int32_t>(status.code()));
  response->set_error_message(std::string(status.message()));
}

ComputeWorker::ComputeWorker(const core::ModelConfig& cfg, core::ExpertBackend& backend,
                             absl::Mutex& backend_mu, SlotTable& slots,
                             ComputeWorkerOptions options)
    : cfg_(cfg),
      backend_(backend),
      backend_mu_(backend_mu),
      slots_(slots),
      options_(options),
      hidden_(cfg.hidden_size) {
  thread_ = std::thread([this] { Loop(); });
}

ComputeWorker::~ComputeWorker() { Stop(); }

bool ComputeWorker::TryEnqueue(WorkItem& item) {
  {
    absl::MutexLock lock(&mu_);
    if (stop_ || queued_requests_ >= options_.max_queue) {
      if (options_.observer != nullptr)
        options_.observer->OnAnswered(absl::StatusCode::kResourceExhausted);
      return false;
    }
    queue_.push_back(Entry{std::move(item), nullptr});
    ++queued_requests_;
    if (options_.observer != nullptr) options_.observer->OnQueueDepth(queued_requests_);
  }
  cv_.Signal();
  return true;
}

void ComputeWorker::RunAfterQueued(std::function<void()> fn) {
  {
    absl::MutexLock lock(&mu_);
    if (!stop_) {
      queue_.push_back(Entry{WorkItem{}, std::move(fn)});
      cv_.Signal();
      return;
    }
  }
  fn();
}

void ComputeWorker::Stop() {
  {
    absl::MutexLock lock(&mu_);
    if (stop_) return;
    stop_ = true;
  }
  cv_.SignalAll();
  if (thread_.joinable()) thread_.join();
}

size_t ComputeWorker::queued() const {
  absl::MutexLock lock(&mu_);
  return queued_requests_;
}

void ComputeWorker::Loop() {
  std::vector<WorkItem> batch;
  for (;;) {
    std::function<void()> barrier;
    batch.clear();
    {
      absl::MutexLock lock(&mu_);
      while (queue_.empty() && !stop_) cv_.Wait(&mu_);
      if (queue_.empty()) return;  // stopped and drained
      if (queue_.front().barrier) {
        barrier = std::move(queue_.front().barrier);
        queue_.pop_front();
      } else {
        // The oldest request's layer, and every later request of that layer
        // queued before the next barrier, as long as the tokens fit.
        const uint32_t layer = queue_.front().item.chunks[0]->layer();
        uint64_t tokens = 0;
        for (auto it = queue_.begin(); it != queue_.end() && !it->barrier;) {
          const uint64_t rows = ItemRows(it->item);
          if (it->item.chunks[0]->layer() == layer &&
              (batch.empty() ||
               tokens + rows <= static_cast<uint64_t>(options_.max_batch_tokens))) {
            tokens += rows;
            batch.push_back(std::move(it->item));
            it = queue_.erase(it);
            --queued_requests_;
          } else {
            ++it;
          }
        }
        if (options_.observer != nullptr) options_.observer->OnQueueDepth(queued_requests_);
      }
    }
    if (barrier) {
      barrier();
    } else {
      ProcessBatch(batch);
    }
  }
}

absl::Status ComputeWorker::Append(const WorkItem& item) {
  const v1::ExpertRequest& c0 = *item.chunks[0];
  DMOE_ASSIGN_OR_RETURN(const common::WireDType in_type, ValidateExpertRequest(c0, cfg_));

  // Roll the batch back to where it was when this request fails.
  const int64_t tokens0 = tokens_;
  const size_t assignments0 = ffn_ids_.size();
  auto fail = [&](absl::Status st) {
    tokens_ = tokens0;
    token_offsets_.resize(tokens0 + 1);
    ffn_ids_.resize(assignments0);
    weights_.resize(assignments0);
    return st;
  };

  for (size_t i = 0; i < item.chunks.size(); ++i) {
    const v1::ExpertRequest& c = *item.chunks[i];
    const std::string where = ChunkPrefix(item, i);
    if (absl::Status st = ValidateExpertChunk(c0, c, cfg_, in_type, slots_, where); !st.ok()) {
      return fail(std::move(st));
    }
    const int64_t rows = c.x().rows();
    const auto& off = c.token_offsets();
    const size_t need = static_cast<size_t>(tokens_ + rows) * hidden_;
    if (x_.size() < need) x_.resize(need);
    {
      absl::Status st = common::UnpackActivations(in_type, c.x().data(), c.x().row_scales(), rows,
                                                  hidden_, x_.data() + tokens_ * hidden_);
      if (!st.ok()) return fail(absl::Status(st.code(), where + std::string(st.message())));
    }
    for (int64_t t = 0; t < rows; ++t) {
      for (int32_t a = off[t]; a < off[t + 1]; ++a) {
        ffn_ids_.push_back(c.expert_ids(a));
        weights_.push_back(c.weights(a));
      }
      if (c.shared_duty_size() != 0 && c.shared_duty(t)) {
        ffn_ids_.push_back(core::kSharedFfn);
        weights_.push_back(1.0f);
      }
      token_offsets_.push_back(static_cast<int32_t>(ffn_ids_.size()));
    }
    tokens_ += rows;
  }
  return absl::OkStatus();
}

void ComputeWorker::ProcessBatch(std::vector<WorkItem>& batch) {
  tokens_ = 0;
  token_offsets_.assign(1, 0);
  ffn_ids_.clear();
  weights_.clear();
  first_row_.assign(batch.size(), -1);
  int32_t layer = -1;
  for (size_t i = 0; i < batch.size(); ++i) {
    const int64_t first = tokens_;
    absl::Status st = Append(batch[i]);
    if (st.ok()) {
      first_row_[i] = first;
      layer = static_cast<int32_t>(batch[i].chunks[0]->layer());
    } else {
      v1::ExpertResponse* r = batch[i].sink->NewResponse();
      FillError(batch[i].chunks[0]->request_id(), st, r);
      batch[i].sink->Send(r);
      if (options_.observer != nullptr) options_.observer->OnAnswered(st.code());
    }
  }
  if (layer >= 0) {
    absl::Status st;
    absl::Duration compute;
    // Per-assignment rows when any request asks for them; the others of the
    // batch then get the per-token sums of those rows, which are the bits
    // the backend's own sum gives.
    bool per_assignment = false, per_token = false;
    for (size_t i = 0; i < batch.size(); ++i) {
      if (first_row_[i] < 0) continue;
      (batch[i].chunks[0]->per_assignment_reply() ? per_assignment : per_token) = true;
    }
    per_assignment_ = per_assignment;
    if (tokens_ > 0) {
      core::ExpertBatch b;
      b.layer = layer;
      b.num_tokens = tokens_;
      b.hidden = hidden_;
      b.x = x_.data();
      b.token_offsets = token_offsets_;
      b.ffn_ids = ffn_ids_;
      b.weights = weights_;
      absl::MutexLock lock(&backend_mu_);
      const absl::Time start = absl::Now();
      if (per_assignment) {
        st = ComputePerAssignment(b, per_token);
      } else {
        const size_t need = static_cast<size_t>(tokens_) * hidden_;
        if (out_.size() < need) out_.resize(need);
        st = backend_.Compute(b, out_.data());
      }
      compute = absl::Now() - start;
    }
    counts_.clear();
    if (st.ok()) {
      // Tokens computed per routed expert of this layer.
      expert_tokens_.assign(cfg_.n_routed_experts, 0);
      for (int32_t id : ffn_ids_) {
        if (id != core::kSharedFfn) ++expert_tokens_[id];  // ids were range-checked
      }
      for (int32_t e = 0; e < cfg_.n_routed_experts; ++e) {
        if (expert_tokens_[e] != 0) counts_.push_back({LayerExpert{layer, e}, expert_tokens_[e]});
      }
      slots_.CountTokens(counts_);
    }
    if (options_.observer != nullptr && tokens_ > 0)
      options_.observer->OnBatch(layer, tokens_, compute, counts_);
    for (size_t i = 0; i < batch.size(); ++i) {
      if (first_row_[i] < 0) continue;
      if (st.ok()) {
        Reply(batch[i], first_row_[i]);
      } else {
        v1::ExpertResponse* r = batch[i].sink->NewResponse();
        FillError(batch[i].chunks[0]->request_id(), st, r);
        batch[i].sink->Send(r);
      }
      if (options_.observer != nullptr) options_.observer->OnAnswered(st.code());
    }
  }
  for (WorkItem& item : batch) item.sink->Done(std::move(item.chunks));
}

absl::Status ComputeWorker::ComputePerAssignment(const core::ExpertBatch& b, bool sum_tokens) {
  const int64_t assignments = static_cast<int64_t>(ffn_ids_.size());
  const size_t need = static_cast<size_t>(assignments) * hidden_;
  if (out_.size() < need) out_.resize(need);
  if (backend_.SupportsPerAssignmentOut()) {
    core::ExpertBatch pa = b;
    pa.per_assignment_out = true;
    DMOE_RETURN_IF_ERROR(backend_.Compute(pa, out_.data()));
  } else {
    // Every assignment its own token: a sum of one term is weight * FFN(x).
    if (xa_.size() < need) xa_.resize(need);
    ones_.resize(assignments + 1);
    for (int64_t t = 0; t < tokens_; ++t) {
      for (int32_t a = token_offsets_[t]; a < token_offsets_[t + 1]; ++a) {
        std::memcpy(xa_.data() + a * hidden_, x_.data() + t * hidden_, hidden_ * sizeof(float));
      }
    }
    for (int64_t a = 0; a <= assignments; ++a) {
      ones_[a] = static_cast<int32_t>(a);
    }
    core::ExpertBatch pa = b;
    pa.num_tokens = assignments;
    pa.x = xa_.data();
    pa.token_offsets = ones_;
    DMOE_RETURN_IF_ERROR(backend_.Compute(pa, out_.data()));
  }
  if (sum_tokens) {
    rows_.resize(assignments);
    for (int64_t a = 0; a < assignments; ++a) {
      rows_[a] = out_.data() + a * hidden_;
    }
    const size_t summed = static_cast<size_t>(tokens_) * hidden_;
    if (summed_.size() < summed) summed_.resize(summed);
    core::SumAssignmentRows(std::span<const int32_t>(token_offsets_.data(), tokens_ + 1), rows_,
                            hidden_, summed_.data());
  }
  return absl::OkStatus();
}

void ComputeWorker::Reply(const WorkItem& item, int64_t first_row) {
  const v1::ExpertRequest& c0 = *item.chunks[0];
  const int reply_dtype =
      c0.reply_dtype() != v1::ACTIVATION_DTYPE_UNSPECIFIED ? c0.reply_dtype() : c0.x().dtype();
  const common::WireDType type = *WireType(reply_dtype, "reply");  // validated in Append
  // Rows of out_ (per assignment) or of the per-token results.
  const bool by_assignment = c0.per_assignment_reply();
  const float* source = by_assignment || !per_assignment_ ? out_.data() : summed_.data();
  int64_t row = first_row;
  for (const auto& chunk : item.chunks) {
    const int64_t tokens = chunk->x().rows();
    const int64_t rows =
        by_assignment ? token_offsets_[row + tokens] - token_offsets_[row] : tokens;
    const int64_t from = by_assignment ? token_offsets_[row] : row;
    v1::ExpertResponse* r = item.sink->NewResponse();
    r->set_request_id(chunk->request_id());
    r->set_chunk_index(chunk->chunk_index());
    r->set_chunk_count(chunk->chunk_count());
    v1::Activations* y = r->mutable_y();
    y->set_dtype(static_cast<v1::ActivationDType>(reply_dtype));
    y->set_rows(static_cast<uint32_t>(rows));
    y->set_cols(static_cast<uint32_t>(hidden_));
    common::PackActivations(source + from * hidden_, rows, hidden_, 0, type, y->mutable_data(),
                            y->mutable_row_scales());
    item.sink->Send(r);
    row += tokens;
  }
}

}  // namespace dmoe::expert::internal
