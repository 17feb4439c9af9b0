#include "router_service/internal/dispatch_stream.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"

namespace dmoe::router::internal {

using dmoe::v1::ExpertRequest;
using dmoe::v1::ExpertResponse;

DispatchStream::DispatchStream(std::shared_ptr<DispatchHub> hub, int server)
    : hub_(std::move(hub)), server_(server), read_buf_(std::make_unique<ExpertResponse>()) {}

std::shared_ptr<DispatchStream> DispatchStream::Start(dmoe::v1::ExpertService::Stub* stub,
                                                      std::shared_ptr<DispatchHub> hub,
                                                      int server) {
  std::shared_ptr<DispatchStream> s(new DispatchStream(std::move(hub), server));
  {
    absl::MutexLock lock(&s->hub_->mu);
    ++s->hub_->live_streams;
  }
  stub->async()->Dispatch(&s->context_, s.get());
  // Writes come from the owner's thread, outside any reaction: the hold keeps
  // the call from finishing under them until Close().
  s->AddHold();
  s->StartRead(s->read_buf_.get());
  s->StartCall();
  return s;
}

std::unique_ptr<ExpertRequest> DispatchStream::TakeRequest() {
  absl::MutexLock lock(&hub_->mu);
  if (free_requests_.empty()) return std::make_unique<ExpertRequest>();
  std::unique_ptr<ExpertRequest> r = std::move(free_requests_.back());
  free_requests_.pop_back();
  return r;
}

namespace {

// The capacity of a request's buffers that a recycled message keeps: its
// activations and per-token / per-assignment arrays (no reflection walk: this
// runs for every request sent).
size_t BufferBytes(const ExpertRequest& r) {
  return r.x().data().capacity() + r.x().row_scales().capacity() +
         static_cast<size_t>(r.token_offsets().Capacity()) * sizeof(uint32_t) +
         static_cast<size_t>(r.expert_ids().Capacity()) * sizeof(int32_t) +
         static_cast<size_t>(r.weights().Capacity()) * sizeof(float) +
         static_cast<size_t>(r.shared_duty().Capacity()) * sizeof(bool);
}

}  // namespace

size_t DispatchStream::PooledBytes() const {
  absl::MutexLock lock(&hub_->mu);
  size_t bytes = 0;
  for (const auto& r : free_requests_) bytes += BufferBytes(*r);
  return bytes;
}

void DispatchStream::RecycleLocked(std::unique_ptr<ExpertRequest> req) {
  if (req == nullptr) return;
  if (free_requests_.size() < kMaxPooledRequests && BufferBytes(*req) <= kPooledBufferMaxBytes) {
    free_requests_.push_back(std::move(req));
  }
}

void DispatchStream::Expect(uint64_t id, int64_t tokens) {
  absl::MutexLock lock(&hub_->mu);
  expected_.push_back(id);
  max_expected_ = std::max(max_expected_, id);
  if (done_) return;  // nothing will come back; nothing to count
  outstanding_.push_back({id, tokens});
  hub_->in_flight[server_].fetch_add(tokens, std::memory_order_relaxed);
}

void DispatchStream::Forget(uint64_t id) {
  absl::MutexLock lock(&hub_->mu);
  std::erase(expected_, id);
  std::erase_if(inbox_, [id](const auto& r) { return r->request_id() == id; });
}

void DispatchStream::Send(std::unique_ptr<ExpertRequest> req) {
  const ExpertRequest* start = nullptr;
  {
    absl::MutexLock lock(&hub_->mu);
    if (broken_) {
      RecycleLocked(std::move(req));
      return;
    }
    if (writing_ == nullptr) {
      writing_ = std::move(req);
      start = writing_.get();
    } else {
      write_queue_.push_back(std::move(req));
    }
  }
  if (start != nullptr) StartWrite(start);  // outside the lock: may react inline
}

bool DispatchStream::HasNewsLocked() const { return !inbox_.empty() || broken_; }

bool DispatchStream::BrokenLocked() const { return broken_; }

void DispatchStream::TakeRepliesLocked(std::vector<std::unique_ptr<ExpertResponse>>* out) {
  while (!inbox_.empty()) {
    out->push_back(std::move(inbox_.front()));
    inbox_.pop_front();
  }
}

bool DispatchStream::Broken() const {
  absl::MutexLock lock(&hub_->mu);
  return broken_;
}

bool DispatchStream::Finished() const {
  absl::MutexLock lock(&hub_->mu);
  return done_;
}

std::string DispatchStream::Close(absl::Duration grace) {
  bool wait = false;
  {
    absl::MutexLock lock(&hub_->mu);
    if (!closed_) {
      closed_ = true;
      wait = broken_ && !done_ && grace > absl::ZeroDuration();
      MarkBrokenLocked("closed by the router");
    } else {
      return broken_reason_;
    }
  }
  RemoveHold();  // from here on OnDone runs once the outstanding operations end
  if (wait) {
    absl::MutexLock lock(&hub_->mu);
    hub_->mu.AwaitWithTimeout(absl::Condition(&done_), grace);
  }
  context_.TryCancel();  // no-op for a finished call
  absl::MutexLock lock(&hub_->mu);
  return broken_reason_;
}

void DispatchStream::MarkBrokenLocked(const std::string& why) {
  if (broken_) return;
  broken_ = true;
  broken_reason_ = why;
  for (auto& r : write_queue_) RecycleLocked(std::move(r));
  write_queue_.clear();
}

void DispatchStream::AccountReplyLocked(uint64_t id, int64_t rows, bool last) {
  auto& counter = hub_->in_flight[server_];
  auto it = std::find_if(outstanding_.begin(), outstanding_.end(),
                         [id](const Outstanding& o) { return o.id == id; });
  if (it == outstanding_.end()) return;
  if (!last) {  // a chunk of the reply: part of the request is done
    const int64_t n = std::min(rows, it->tokens);
    it->tokens -= n;
    counter.fetch_sub(n, std::memory_order_relaxed);
    return;
  }
  counter.fetch_sub(it->tokens, std::memory_order_relaxed);
  outstanding_.erase(it);
}

void DispatchStream::OnReadDone(bool ok) {
  if (!ok) {
    absl::MutexLock lock(&hub_->mu);
    MarkBrokenLocked("the stream was closed");
    return;  // no further reads; OnDone follows once the hold is removed
  }
  {
    absl::MutexLock lock(&hub_->mu);
    const ExpertResponse& r = *read_buf_;
    const bool last = r.error_code() != 0 || r.chunk_index() + 1 >= std::max(r.chunk_count(), 1u);
    AccountReplyLocked(r.request_id(), r.y().rows(), last);
    if (r.request_id() > max_expected_ ||
        std::find(expected_.begin(), expected_.end(), r.request_id()) != expected_.end()) {
      inbox_.push_back(std::move(read_buf_));
      read_buf_ = std::make_unique<ExpertResponse>();
    }
    // else: the reply to a request the owner abandoned; read_buf_ is reused.
  }
  StartRead(read_buf_.get());
}

void DispatchStream::OnWriteDone(bool ok) {
  const ExpertRequest* next = nullptr;
  {
    absl::MutexLock lock(&hub_->mu);
    RecycleLocked(std::move(writing_));
    if (!ok) {
      MarkBrokenLocked("a write failed (the stream was closed)");
    } else if (!write_queue_.empty()) {
      writing_ = std::move(write_queue_.front());
      write_queue_.pop_front();
      next = writing_.get();
    }
  }
  if (next != nullptr) StartWrite(next);
}

void DispatchStream::OnDone(const grpc::Status& s) {
  // The last touch of `this`: once done_ is seen the owner may destroy it.
  {
    absl::MutexLock lock(&hub_->mu);
    std::string why = s.ok() ? std::string("the server ended the stream")
                             : absl::StrCat("gRPC status ", static_cast<int>(s.error_code()), ": ",
                                            s.error_message());
    MarkBrokenLocked(why);
    broken_reason_ = std::move(why);  // the final status says more than "closed"
    done_ = true;
    for (const Outstanding& o : outstanding_) {
      hub_->in_flight[server_].fetch_sub(o.tokens, std::memory_order_relaxed);
    }
    outstanding_.clear();
    --hub_->live_streams;
  }
}

}  // namespace dmoe::router::internal
