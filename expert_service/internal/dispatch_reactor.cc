#include "expert_service/internal/dispatch_reactor.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace dmoe::expert::internal {
namespace {

// Idle messages kept per stream for reuse; enough for a router that pipelines
// a few layers, small enough not to pin memory for idle streams.
constexpr size_t kMaxFreeRequests = 8;
constexpr size_t kMaxFreeResponses = 16;
// More chunks than this for one request is a client bug, not a big request
// (4 MiB chunks: 16 GiB).
constexpr uint32_t kMaxChunks = 4096;

const char kShuttingDown[] = "expert server is shutting down";

}  // namespace

// ---- StreamRegistry
// ----------------------------------------------------------

bool StreamRegistry::Add(DispatchReactor* r) {
  absl::MutexLock lock(&mu_);
  ++alive_;
  if (draining_) return false;
  streams_.insert(r);
  return true;
}

void StreamRegistry::Remove(DispatchReactor* r) {
  absl::MutexLock lock(&mu_);
  streams_.erase(r);
}

void StreamRegistry::Deleted() {
  absl::MutexLock lock(&mu_);
  --alive_;
}

void StreamRegistry::WaitAllDeleted() {
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(
      +[](int64_t* alive) { return *alive == 0; }, &alive_));
}

void StreamRegistry::DrainAll() {
  std::vector<DispatchReactor*> live;
  {
    absl::MutexLock lock(&mu_);
    draining_ = true;
    for (DispatchReactor* r : streams_) {
      r->Ref();  // a stream in the set has not run OnDone's Unref yet
      live.push_back(r);
    }
  }
  for (DispatchReactor* r : live) {
    r->Drain();
    r->Unref();
  }
}

bool StreamRegistry::draining() const {
  absl::MutexLock lock(&mu_);
  return draining_;
}

size_t StreamRegistry::live() const {
  absl::MutexLock lock(&mu_);
  return streams_.size();
}

// ---- DispatchReactor
// ---------------------------------------------------------

DispatchReactor::DispatchReactor(ComputeWorker& worker, StreamRegistry& registry)
    : worker_(worker), registry_(registry) {
  const bool accepted = registry_.Add(this);
  absl::MutexLock lock(&mu_);
  if (!accepted) {
    draining_ = true;
    finished_ = true;
    Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, kShuttingDown));
    return;
  }
  reading_ = TakeRequest();
  StartRead(reading_.get());
}

void DispatchReactor::Unref() {
  if (refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete this;
}

std::unique_ptr<v1::ExpertRequest> DispatchReactor::TakeRequest() {
  if (free_requests_.empty()) return std::make_unique<v1::ExpertRequest>();
  auto r = std::move(free_requests_.back());
  free_requests_.pop_back();
  return r;
}

void DispatchReactor::RecycleRequest(std::unique_ptr<v1::ExpertRequest> r) {
  if (r != nullptr && free_requests_.size() < kMaxFreeRequests)
    free_requests_.push_back(std::move(r));
}

void DispatchReactor::OnReadDone(bool ok) {
  absl::MutexLock lock(&mu_);
  if (!ok) {
    // Half-close by the client, or the stream is gone.
    read_closed_ = true;
    RecycleRequest(std::move(reading_));
    if (!assembling_.empty()) {
      const uint64_t id = assembling_[0]->request_id();
      const size_t got = assembling_.size();
      const uint32_t count = assembling_[0]->chunk_count();
      for (auto& c : assembling_) RecycleRequest(std::move(c));
      assembling_.clear();
      ReplyError(id, absl::InvalidArgumentError(absl::StrCat(
                         "request ", id, ": stream closed after chunk ", got - 1, " of ", count)));
    }
    PumpLocked();
    return;
  }
  Handle(std::move(reading_));
  if (!finished_ && !draining_ && !broken_) {
    reading_ = TakeRequest();
    StartRead(reading_.get());
  }
}

void DispatchReactor::Handle(std::unique_ptr<v1::ExpertRequest> msg) {
  const uint64_t id = msg->request_id();
  if (draining_) {
    RecycleRequest(std::move(msg));
    ReplyError(id, absl::UnavailableError(kShuttingDown));
    return;
  }
  const uint32_t index = msg->chunk_index();
  const uint32_t count = msg->chunk_count();
  if (!assembling_.empty()) {
    const v1::ExpertRequest& first = *assembling_[0];
    const uint64_t first_id = first.request_id();
    if (id == first_id && count == first.chunk_count() && index == assembling_.size()) {
      assembling_.push_back(std::move(msg));
      if (assembling_.size() == count) {
        Enqueue(std::move(assembling_));
        assembling_.clear();
      }
      return;
    }
    // The request being assembled is broken: answer it once, drop its chunks.
    const absl::Status st = absl::InvalidArgumentError(
        absl::StrCat("request ", first_id, ": expected chunk ", assembling_.size(), " of ",
                     first.chunk_count(), ", got request ", id, " chunk ", index, " of ", count));
    for (auto& c : assembling_) RecycleRequest(std::move(c));
    assembling_.clear();
    ReplyError(first_id, st);
    if (id == first_id) {  // a stray chunk of the request just answered
      RecycleRequest(std::move(msg));
      return;
    }
  }
  if (count <= 1) {
    if (index != 0) {
      RecycleRequest(std::move(msg));
      ReplyError(id, absl::InvalidArgumentError(absl::StrCat("request ", id, ": chunk_index ",
                                                             index, " with chunk_count ", count)));
      return;
    }
    std::vector<std::unique_ptr<v1::ExpertRequest>> one;
    one.push_back(std::move(msg));
    Enqueue(std::move(one));
    return;
  }
  if (index != 0 || count > kMaxChunks) {
    RecycleRequest(std::move(msg));
    ReplyError(id, absl::InvalidArgumentError(
                       count > kMaxChunks ? absl::StrCat("request ", id, ": chunk_count ", count,
                                                         " exceeds ", kMaxChunks)
                                          : absl::StrCat("request ", id, ": chunk ", index, " of ",
                                                         count, " arrived without chunk 0")));
    return;
  }
  assembling_.push_back(std::move(msg));
}

void DispatchReactor::Enqueue(std::vector<std::unique_ptr<v1::ExpertRequest>> chunks) {
  WorkItem item{this, std::move(chunks)};
  Ref();
  ++in_flight_;
  if (worker_.TryEnqueue(item)) return;
  --in_flight_;
  refs_.fetch_sub(1,
                  std::memory_order_relaxed);  // gRPC still holds its reference
  const uint64_t id = item.chunks[0]->request_id();
  for (auto& c : item.chunks) RecycleRequest(std::move(c));
  ReplyError(id, absl::ResourceExhaustedError(
                     absl::StrCat("request ", id, ": expert server queue is full (",
                                  worker_.max_queue(), " requests queued)")));
}

void DispatchReactor::ReplyError(uint64_t request_id, const absl::Status& status) {
  std::unique_ptr<v1::ExpertResponse> r;
  if (free_responses_.empty()) {
    r = std::make_unique<v1::ExpertResponse>();
  } else {
    r = std::move(free_responses_.back());
    free_responses_.pop_back();
  }
  r->Clear();
  FillError(request_id, status, r.get());
  outgoing_.push_back(std::move(r));
  PumpLocked();
}

v1::ExpertResponse* DispatchReactor::NewResponse() {
  std::unique_ptr<v1::ExpertResponse> r;
  {
    absl::MutexLock lock(&mu_);
    if (!free_responses_.empty()) {
      r = std::move(free_responses_.back());
      free_responses_.pop_back();
    }
  }
  if (r == nullptr) return new v1::ExpertResponse();
  // Not Clear(): that deletes `y` and with it the byte buffers we want to
  // reuse.
  r->set_request_id(0);
  r->set_chunk_index(0);
  r->set_chunk_count(0);
  r->set_error_code(0);
  r->clear_error_message();
  if (r->has_y()) r->mutable_y()->Clear();  // keeps data's capacity
  return r.release();
}

void DispatchReactor::Send(v1::ExpertResponse* response) {
  absl::MutexLock lock(&mu_);
  outgoing_.emplace_back(response);
  PumpLocked();
}

void DispatchReactor::Done(std::vector<std::unique_ptr<v1::ExpertRequest>> chunks) {
  {
    absl::MutexLock lock(&mu_);
    for (auto& c : chunks) RecycleRequest(std::move(c));
    --in_flight_;
    PumpLocked();
  }
  Unref();
}

void DispatchReactor::PumpLocked() {
  if (finished_ || broken_) {
    // Nobody will read these any more.
    while (!outgoing_.empty()) {
      if (free_responses_.size() < kMaxFreeResponses)
        free_responses_.push_back(std::move(outgoing_.front()));
      outgoing_.pop_front();
    }
  }
  if (finished_) return;
  if (writing_ == nullptr && !outgoing_.empty()) {
    writing_ = std::move(outgoing_.front());
    outgoing_.pop_front();
    StartWrite(writing_.get());
    return;
  }
  if (broken_) {
    // Cancelled or a write failed: end now; queued work completes into the
    // void.
    finished_ = true;
    Finish(grpc::Status(grpc::StatusCode::CANCELLED, "stream cancelled"));
    return;
  }
  if (writing_ != nullptr || in_flight_ > 0 || !assembling_.empty()) return;
  if (read_closed_) {
    finished_ = true;
    Finish(grpc::Status::OK);
  } else if (draining_) {
    finished_ = true;
    Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, kShuttingDown));
  }
}

void DispatchReactor::OnWriteDone(bool ok) {
  absl::MutexLock lock(&mu_);
  if (writing_ != nullptr && free_responses_.size() < kMaxFreeResponses) {
    free_responses_.push_back(std::move(writing_));
  }
  writing_.reset();
  if (!ok) broken_ = true;
  PumpLocked();
}

void DispatchReactor::OnCancel() {
  absl::MutexLock lock(&mu_);
  broken_ = true;
  PumpLocked();
}

void DispatchReactor::Drain() {
  absl::MutexLock lock(&mu_);
  if (finished_ || draining_) return;
  draining_ = true;
  if (!assembling_.empty()) {
    const uint64_t id = assembling_[0]->request_id();
    for (auto& c : assembling_) RecycleRequest(std::move(c));
    assembling_.clear();
    ReplyError(id, absl::UnavailableError(kShuttingDown));
  }
  PumpLocked();
}

void DispatchReactor::OnDone() {
  registry_.Remove(this);
  Unref();
}

}  // namespace dmoe::expert::internal
