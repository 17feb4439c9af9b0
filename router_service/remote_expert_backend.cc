// RemoteExpertBackend: Submit = SplitByServer -> pack and send each server its
// share -> (local shared FFN); Await = collect every reply (each request under
// its own deadline), re-send the share of a server that failed to the
// replicas of its experts, then sum per token in request order.
//
// Streams are internal::DispatchStream reactors (callback API; see that header
// for why). This file owns the per-batch protocol: tickets and request ids,
// chunking, reply validation and reassembly, failover, error mapping,
// reconnection.
#include "router_service/remote_expert_backend.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/grpc_status.h"
#include "core/combine.h"
#include "core/status.h"
#include "dmoe/v1/expert.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "router_service/internal/dispatch_stream.h"

namespace dmoe::router {
namespace {

using internal::DispatchHub;
using internal::DispatchStream;

// Pending requests kept for reuse: a few per server for the micro-batches of a
// step and replicas; more only after a burst of failovers.
constexpr size_t kMaxPooledPending = 64;

template <typename T>
size_t CapacityBytes(const std::vector<T>& v) {
  return v.capacity() * sizeof(T);
}

v1::ActivationDType ToProto(common::WireDType t) {
  switch (t) {
    case common::WireDType::kBF16:
      return v1::ACTIVATION_DTYPE_BF16;
    case common::WireDType::kF32:
      return v1::ACTIVATION_DTYPE_F32;
    case common::WireDType::kF8E4M3:
      return v1::ACTIVATION_DTYPE_F8_E4M3;
  }
  return v1::ACTIVATION_DTYPE_UNSPECIFIED;
}

// How long a failed stream is given to report gRPC's final status (only on
// the error path; it makes "connection refused" visible in the message).
constexpr absl::Duration kFinalStatusGrace = absl::Milliseconds(100);

// How long a server that failed is avoided when its experts have replicas
// elsewhere: doubling from the first to the last value while it keeps failing.
constexpr absl::Duration kMinAvoid = absl::Milliseconds(250);
constexpr absl::Duration kMaxAvoid = absl::Seconds(5);

class RemoteExpertBackend final : public core::ExpertBackend, public RemoteExpertControl {
 public:
  explicit RemoteExpertBackend(RemoteExpertOptions options);
  ~RemoteExpertBackend() override;

  std::string Name() const override {
    return absl::StrCat("remote(", servers_.size(), " servers)");
  }
  absl::Status LoadFfn(int32_t layer, int32_t ffn_id, const core::FfnWeights& w) override;
  absl::Status UnloadFfn(int32_t layer, int32_t ffn_id) override;
  bool HasFfn(int32_t layer, int32_t ffn_id) const override;
  absl::Status Compute(const core::ExpertBatch& batch, float* out) override;
  absl::StatusOr<uint64_t> Submit(const core::ExpertBatch& batch, float* out) override;
  absl::Status Await(uint64_t ticket) override;
  void Cancel(uint64_t ticket) override;
  size_t WeightBytes() const override { return local_->WeightBytes(); }

  absl::Status SwitchPlacement(place::Placement placement, std::vector<std::string> servers,
                               absl::Duration timeout) override;
  place::Placement placement() const override {
    absl::MutexLock lock(&mu_);
    return placement_;
  }
  std::vector<std::string> servers() const override {
    absl::MutexLock lock(&mu_);
    std::vector<std::string> out;
    for (const Server& s : servers_) out.push_back(s.address);
    return out;
  }
  size_t PooledBufferBytes() const override;

 private:
  struct Server {
    std::string address;
    std::string label;  // "expert server 2 (host:port)", prefixes its errors
    std::shared_ptr<grpc::Channel> channel;
    std::unique_ptr<v1::ExpertService::Stub> stub;
    std::shared_ptr<DispatchStream> stream;  // null until needed / after a failure
    // After a failure: until then, replicas elsewhere are preferred.
    absl::Time avoid_until = absl::InfinitePast();
    absl::Duration avoid_for = absl::ZeroDuration();  // the last back-off
    bool warned_legacy = false;                       // logged that it sends per-token sums
  };
  // One request: a share of a ticket's batch sent to one server.
  struct Pending {
    enum class State { kWaiting, kDone, kFailed };
    State state = State::kWaiting;
    uint64_t ticket = 0;
    int server = 0;
    uint64_t id = 0;
    std::shared_ptr<DispatchStream> stream;  // the stream it went out on
    place::ServerShare share;                // tokens: indices into the ticket's batch
    std::vector<float> partial;              // [reply_rows, hidden] unpacked reply
    int64_t rows = 0;                        // tokens sent
    // Per-assignment replies: the batch assignment of each reply row (the
    // token's experts in request order, then its shared FFN).
    std::vector<int32_t> row_assignment;
    int64_t reply_rows = 0;  // rows the reply must have
    // The server answered one partial sum per token although per-assignment
    // rows were asked for: a server from before per_assignment_reply (the
    // field is unknown to it), e.g. during a rolling upgrade.
    bool legacy_reply = false;
    int64_t rows_received = 0;  // rows of reply unpacked so far
    uint32_t next_chunk = 0;
    uint32_t chunk_count = 0;  // of the reply, known from its first chunk
    size_t reply_bytes = 0;
    absl::Time sent, deadline;
  };
  // One submitted batch.
  struct Ticket {
    uint64_t id = 0;
    core::ExpertBatch batch;
    float* out = nullptr;
    std::vector<std::unique_ptr<Pending>> pending;  // in sending order
    std::vector<place::ServerState> states;         // [N] excluded: failed for this batch
    std::vector<int32_t> stranded;                  // tokens no live server can serve
    absl::Status failure;  // the first server failure (explains stranded tokens)
    absl::Status error;    // a failure of the whole batch
    bool local_shared = false;
    std::vector<char> has_shared;   // [T] (router duty)
    std::vector<float> shared_out;  // [T, hidden] (router duty)
  };

  absl::Status Validate(const core::ExpertBatch& b, const float* out) const;
  absl::StatusOr<uint64_t> SubmitLocked(const core::ExpertBatch& b, float* out);
  absl::Status AwaitLocked(uint64_t ticket);
  // Installs the pending placement (no batch outstanding).
  void ApplySwitchLocked();
  void SetServers(const std::vector<std::string>& addresses);
  void OpenStream(int s);
  // Closes server s's stream (reopened by the next Send, on a new channel);
  // returns why it ended. The stream and its channel are retired.
  std::string Abandon(int s, absl::Duration grace);
  // Destroys the retired streams and channels that gRPC is done with.
  void ReapRetired();
  Ticket* FindTicket(uint64_t id);
  // Sends `share` of ticket `t` to its server as a new request.
  void Send(Ticket& t, place::ServerShare share);
  // Queues p's request on `stream`; returns its size on the wire.
  size_t Pack(const core::ExpertBatch& b, const Pending& p, DispatchStream& stream);
  // Handles one reply message for `p`: unpacks it, or fails `p` over (a
  // server that is unavailable or overloaded), or records a batch error.
  void HandleReply(Pending& p, const v1::ExpertResponse& r);
  // Server `p.server` failed `p` (`why`): forgets the request, avoids the
  // server for a while and re-sends p's tokens to replicas of their experts
  // on other servers; tokens with no such replica become stranded.
  void FailOver(Pending& p, const absl::Status& why, bool abandon_stream);
  // Records a protocol error of `p`'s server for its ticket and drops the stream.
  void ProtocolError(Pending& p, std::string message);
  void Forget(Pending& p);
  // Releases the ticket (forgets its waiting requests).
  void Retire(uint64_t ticket);
  // Capacity of the buffers a pooled request / ticket keeps for its next use.
  static size_t BufferBytes(const Pending& p);
  static size_t BufferBytes(const Ticket& t);
  absl::Status ComputeLocalShared(Ticket& t);
  absl::Status Combine(const Ticket& t);

  // Const after construction.
  const RemoteExpertOptions options_;
  const std::shared_ptr<DispatchHub> hub_;
  const std::unique_ptr<core::ExpertBackend> local_;  // shared FFNs (SharedDuty::kRouter)

  // Held by Submit / Await / Cancel for their whole run, and by the control
  // methods: a switch happens only between them. Everything below is
  // guarded by it (and touched only by the submitting thread otherwise).
  mutable absl::Mutex mu_;
  place::Placement placement_;
  struct PendingSwitch {
    place::Placement placement;
    std::vector<std::string> servers;
    bool applied = false;
  };
  PendingSwitch* pending_switch_ = nullptr;  // owned by the waiting SwitchPlacement
  std::vector<Server> servers_;
  // Closed streams that gRPC may still use, with their channels: destroyed
  // here once finished, never in a reaction (see dispatch_stream.h).
  struct Retired {
    std::shared_ptr<DispatchStream> stream;
    std::shared_ptr<grpc::Channel> channel;
  };
  std::vector<Retired> retired_;
  uint64_t next_request_id_ = 1;
  uint64_t next_ticket_ = 1;
  std::vector<std::unique_ptr<Ticket>> tickets_;  // outstanding
  std::vector<std::unique_ptr<Ticket>> free_tickets_;
  std::vector<std::unique_ptr<Pending>> free_pending_;
  absl::flat_hash_map<uint64_t, Pending*> waiting_;  // request id -> its waiting request
  // Workspaces, grown only.
  std::vector<int64_t> queued_;  // [N] live load at split time
  std::vector<float> gather_;    // [chunk rows, hidden] x rows of one chunk
  std::vector<std::pair<DispatchStream*, std::unique_ptr<v1::ExpertResponse>>> replies_;
  std::vector<std::unique_ptr<v1::ExpertResponse>> taken_;
  std::vector<DispatchStream*> streams_;
  std::vector<int32_t> stranded_;
  std::vector<int32_t> shared_offsets_;        // [T + 1] local shared batch
  std::vector<int32_t> shared_ids_;            // [tokens with shared]
  std::vector<float> shared_weights_;          // [tokens with shared]
  std::vector<const float*> assignment_rows_;  // [assignments] Combine
};

RemoteExpertBackend::RemoteExpertBackend(RemoteExpertOptions options)
    : options_(std::move(options)),
      hub_(std::make_shared<DispatchHub>(kMaxExpertServers)),
      local_(core::MakeCpuExpertBackend(options_.local_compute)),
      placement_(options_.placement) {
  SetServers(options_.servers);
}

void RemoteExpertBackend::SetServers(const std::vector<std::string>& addresses) {
  const int n = static_cast<int>(addresses.size());
  for (int s = n; s < static_cast<int>(servers_.size()); ++s) {
    if (servers_[s].stream) Abandon(s, absl::ZeroDuration());
  }
  servers_.resize(n);
  for (int s = 0; s < n; ++s) {
    Server& sv = servers_[s];
    if (sv.address == addresses[s]) continue;
    if (sv.stream) Abandon(s, absl::ZeroDuration());
    sv.address = addresses[s];
    sv.label = absl::StrCat("expert server ", s, " (", addresses[s], ")");
    sv.avoid_until = absl::InfinitePast();
    sv.avoid_for = absl::ZeroDuration();
  }
  queued_.resize(n);
}

absl::Status RemoteExpertBackend::SwitchPlacement(place::Placement placement,
                                                  std::vector<std::string> servers,
                                                  absl::Duration timeout) {
  if (static_cast<int>(servers.size()) != placement.num_servers()) {
    return absl::InvalidArgumentError(
        absl::StrCat("placement version ", placement.version(), " has ", placement.num_servers(),
                     " servers but ", servers.size(), " addresses were given"));
  }
  if (servers.size() > static_cast<size_t>(kMaxExpertServers)) {
    return absl::InvalidArgumentError(
        absl::StrCat(servers.size(), " expert servers, at most ", kMaxExpertServers));
  }
  for (size_t s = 0; s < servers.size(); ++s) {
    if (servers[s].empty()) {
      return absl::InvalidArgumentError(absl::StrCat("expert server ", s, " has no address"));
    }
  }
  PendingSwitch sw{std::move(placement), std::move(servers), false};
  absl::MutexLock lock(&mu_);
  if (pending_switch_ != nullptr) {
    return absl::FailedPreconditionError("another placement switch is in progress");
  }
  pending_switch_ = &sw;
  if (tickets_.empty()) ApplySwitchLocked();
  if (!mu_.AwaitWithTimeout(absl::Condition(&sw.applied), timeout)) {
    pending_switch_ = nullptr;
    return absl::DeadlineExceededError(absl::StrCat("placement version ", sw.placement.version(),
                                                    ": no step boundary within ",
                                                    absl::FormatDuration(timeout)));
  }
  return absl::OkStatus();
}

void RemoteExpertBackend::ApplySwitchLocked() {
  PendingSwitch* sw = pending_switch_;
  pending_switch_ = nullptr;
  placement_ = sw->placement;
  SetServers(sw->servers);
  sw->applied = true;
}

RemoteExpertBackend::~RemoteExpertBackend() {
  absl::MutexLock lock(&mu_);
  while (!tickets_.empty()) Retire(tickets_.back()->id);
  free_tickets_.clear();
  free_pending_.clear();  // their stream references
  for (int s = 0; s < static_cast<int>(servers_.size()); ++s) {
    if (servers_[s].stream) Abandon(s, absl::ZeroDuration());
  }
  // Cancelled calls end promptly; wait for gRPC to be done with every stream.
  bool all_finished;
  {
    absl::MutexLock lock(&hub_->mu);
    all_finished = hub_->mu.AwaitWithTimeout(absl::Condition(
                                                 // Await evaluates the condition with h->mu held.
                                                 +[](DispatchHub* h) ABSL_EXCLUSIVE_LOCKS_REQUIRED(
                                                      h->mu) { return h->live_streams == 0; },
                                                 hub_.get()),
                                             absl::Seconds(10));
  }
  ReapRetired();
  if (!all_finished) {
    // A call gRPC has not finished after 10 s of cancellation: leak it rather
    // than free what a late reaction would touch.
    new std::vector<Retired>(std::move(retired_));
  }
}

void RemoteExpertBackend::ReapRetired() {
  std::erase_if(retired_, [](const Retired& r) { return r.stream->Finished(); });
}

absl::Status RemoteExpertBackend::LoadFfn(int32_t layer, int32_t ffn_id,
                                          const core::FfnWeights& w) {
  if (ffn_id != core::kSharedFfn) {
    return absl::FailedPreconditionError(absl::StrCat(
        "layer ", layer, " expert ", ffn_id, ": routed experts live on the expert servers"));
  }
  return local_->LoadFfn(layer, ffn_id, w);
}

absl::Status RemoteExpertBackend::UnloadFfn(int32_t layer, int32_t ffn_id) {
  if (ffn_id != core::kSharedFfn) {
    return absl::FailedPreconditionError(absl::StrCat(
        "layer ", layer, " expert ", ffn_id, ": routed experts live on the expert servers"));
  }
  return local_->UnloadFfn(layer, ffn_id);
}

bool RemoteExpertBackend::HasFfn(int32_t layer, int32_t ffn_id) const {
  absl::MutexLock lock(&mu_);
  if (ffn_id == core::kSharedFfn) {
    if (local_->HasFfn(layer, ffn_id)) return true;
    // Every expert server holds the shared FFN of every MoE layer.
    return options_.shared_duty == place::SharedDuty::kExpertServers &&
           !placement_.Replicas(layer, 0).empty();
  }
  return ffn_id >= 0 && !placement_.Replicas(layer, ffn_id).empty();
}

absl::Status RemoteExpertBackend::Validate(const core::ExpertBatch& b, const float* out) const {
  const int32_t layer = b.layer;
  if (b.per_assignment_out) {
    return absl::UnimplementedError(
        absl::StrCat("layer ", layer, ": remote experts have no per-assignment output"));
  }
  DMOE_RETURN_IF_ERROR(core::ValidateExpertBatch(b, out));
  for (int64_t t = 0; t < b.num_tokens; ++t) {
    bool shared = false;
    for (int32_t a = b.token_offsets[t]; a < b.token_offsets[t + 1]; ++a) {
      if (b.ffn_ids[a] != core::kSharedFfn) continue;
      // The wire carries the shared duty as one flag per token, no weight.
      if (shared) {
        return absl::InvalidArgumentError(
            absl::StrCat("layer ", layer, ": token ", t, " has the shared FFN twice"));
      }
      if (b.weights[a] != 1.0f) {
        return absl::InvalidArgumentError(absl::StrCat("layer ", layer, ": token ", t,
                                                       " has shared FFN weight ", b.weights[a],
                                                       ", the wire supports only 1"));
      }
      shared = true;
    }
  }
  return absl::OkStatus();
}

absl::Status RemoteExpertBackend::Compute(const core::ExpertBatch& b, float* out) {
  absl::MutexLock lock(&mu_);
  if (pending_switch_ != nullptr && tickets_.empty()) ApplySwitchLocked();
  DMOE_ASSIGN_OR_RETURN(const uint64_t ticket, SubmitLocked(b, out));
  absl::Status st = AwaitLocked(ticket);
  if (pending_switch_ != nullptr && tickets_.empty()) ApplySwitchLocked();
  return st;
}

absl::StatusOr<uint64_t> RemoteExpertBackend::Submit(const core::ExpertBatch& b, float* out) {
  absl::MutexLock lock(&mu_);
  if (pending_switch_ != nullptr && tickets_.empty()) ApplySwitchLocked();
  return SubmitLocked(b, out);
}

absl::Status RemoteExpertBackend::Await(uint64_t ticket) {
  absl::MutexLock lock(&mu_);
  absl::Status st = AwaitLocked(ticket);
  if (pending_switch_ != nullptr && tickets_.empty()) ApplySwitchLocked();
  return st;
}

void RemoteExpertBackend::Cancel(uint64_t ticket) {
  absl::MutexLock lock(&mu_);
  if (FindTicket(ticket) != nullptr) Retire(ticket);
  if (pending_switch_ != nullptr && tickets_.empty()) ApplySwitchLocked();
}

absl::StatusOr<uint64_t> RemoteExpertBackend::SubmitLocked(const core::ExpertBatch& b, float* out) {
  DMOE_RETURN_IF_ERROR(Validate(b, out));
  const int64_t T = b.num_tokens;
  const int N = static_cast<int>(servers_.size());

  bool any_local_shared = false;
  std::vector<char> has_shared;
  if (options_.shared_duty == place::SharedDuty::kRouter && T > 0) {
    has_shared.assign(T, 0);
    for (int64_t t = 0; t < T; ++t) {
      for (int32_t a = b.token_offsets[t]; a < b.token_offsets[t + 1]; ++a) {
        if (b.ffn_ids[a] == core::kSharedFfn) has_shared[t] = any_local_shared = true;
      }
    }
    if (any_local_shared && !local_->HasFfn(b.layer, core::kSharedFfn)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "layer ", b.layer, ": shared FFN is not loaded on the router (shared duty: router)"));
    }
  }

  const absl::Time now = absl::Now();
  std::vector<place::ServerState> states(N, place::ServerState::kUp);
  for (int s = 0; s < N; ++s) {
    if (servers_[s].avoid_until > now) states[s] = place::ServerState::kAvoid;
    queued_[s] = hub_->in_flight[s].load(std::memory_order_relaxed);
  }
  std::vector<place::ServerShare> shares;
  if (T > 0) {
    DMOE_ASSIGN_OR_RETURN(
        shares, place::SplitByServer(b, placement_, queued_, options_.shared_duty, states));
  }

  std::unique_ptr<Ticket> t;
  if (free_tickets_.empty()) {
    t = std::make_unique<Ticket>();
  } else {
    t = std::move(free_tickets_.back());
    free_tickets_.pop_back();
  }
  t->id = next_ticket_++;
  t->batch = b;
  t->out = out;
  t->pending.clear();
  for (auto& st : states) {
    if (st == place::ServerState::kAvoid) st = place::ServerState::kUp;  // re-read on failover
  }
  t->states = std::move(states);
  t->stranded.clear();
  t->failure = absl::OkStatus();
  t->error = absl::OkStatus();
  t->local_shared = any_local_shared;
  t->has_shared = std::move(has_shared);
  Ticket& ticket = *t;
  tickets_.push_back(std::move(t));
  ReapRetired();
  for (place::ServerShare& share : shares) {
    if (!share.tokens.empty()) Send(ticket, std::move(share));
  }
  // Overlapped with the round trips.
  if (any_local_shared) {
    absl::Status st = ComputeLocalShared(ticket);
    if (!st.ok()) {
      Retire(ticket.id);
      return st;
    }
  }
  return ticket.id;
}

RemoteExpertBackend::Ticket* RemoteExpertBackend::FindTicket(uint64_t id) {
  for (auto& t : tickets_) {
    if (t->id == id) return t.get();
  }
  return nullptr;
}

void RemoteExpertBackend::Send(Ticket& t, place::ServerShare share) {
  const int s = share.server;
  Server& sv = servers_[s];
  // A stream that broke while idle (e.g. the server restarted between
  // batches) lost nothing of this ticket: replace it before sending.
  if (!sv.stream || sv.stream->Broken()) OpenStream(s);
  std::unique_ptr<Pending> p;
  if (free_pending_.empty()) {
    p = std::make_unique<Pending>();
  } else {
    p = std::move(free_pending_.back());
    free_pending_.pop_back();
  }
  p->state = Pending::State::kWaiting;
  p->ticket = t.id;
  p->server = s;
  p->id = next_request_id_++;
  p->stream = sv.stream;
  p->share = std::move(share);
  p->rows = static_cast<int64_t>(p->share.tokens.size());
  p->row_assignment.clear();
  if (options_.per_assignment_replies) {
    const place::ServerShare& sh = p->share;
    for (int64_t r = 0; r < p->rows; ++r) {
      int32_t shared = -1;
      for (int32_t a = sh.token_offsets[r]; a < sh.token_offsets[r + 1]; ++a) {
        if (sh.ffn_ids[a] == core::kSharedFfn) {
          shared = sh.assignment_index[a];
        } else {
          p->row_assignment.push_back(sh.assignment_index[a]);
        }
      }
      if (shared >= 0) p->row_assignment.push_back(shared);
    }
    p->reply_rows = static_cast<int64_t>(p->row_assignment.size());
  } else {
    p->reply_rows = p->rows;
  }
  p->rows_received = 0;
  p->next_chunk = 0;
  p->chunk_count = 0;
  p->reply_bytes = 0;
  p->partial.resize(static_cast<size_t>(p->reply_rows * t.batch.hidden));
  p->sent = absl::Now();
  p->deadline = p->sent + absl::FromChrono(options_.deadline);
  waiting_[p->id] = p.get();
  const size_t bytes = Pack(t.batch, *p, *p->stream);
  if (options_.observer != nullptr) options_.observer->OnSend(t.batch.layer, s, p->share, bytes);
  t.pending.push_back(std::move(p));
}

absl::Status RemoteExpertBackend::AwaitLocked(uint64_t ticket_id) {
  Ticket* t = FindTicket(ticket_id);
  if (t == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("remote experts: ticket ", ticket_id, " is not outstanding"));
  }
  while (t->error.ok()) {
    // This ticket's requests still out (FailOver may add more as we go).
    streams_.clear();
    absl::Time deadline = absl::InfiniteFuture();
    for (const auto& p : t->pending) {
      if (p->state != Pending::State::kWaiting) continue;
      if (std::find(streams_.begin(), streams_.end(), p->stream.get()) == streams_.end()) {
        streams_.push_back(p->stream.get());
      }
      deadline = std::min(deadline, p->deadline);
    }
    if (streams_.empty()) break;
    replies_.clear();
    std::vector<char> broken(streams_.size(), 0);
    {
      absl::MutexLock lock(&hub_->mu);
      auto news = [this]() {
        for (DispatchStream* st : streams_) {
          if (st->HasNewsLocked()) return true;
        }
        return false;
      };
      hub_->mu.AwaitWithDeadline(absl::Condition(&news), deadline);
      for (size_t i = 0; i < streams_.size(); ++i) {
        taken_.clear();
        streams_[i]->TakeRepliesLocked(&taken_);
        for (auto& r : taken_) replies_.emplace_back(streams_[i], std::move(r));
        broken[i] = streams_[i]->BrokenLocked();
      }
    }
    // Replies first (in arrival order per stream): an error reply explains a
    // broken stream better than the break itself.
    for (auto& [stream, reply] : replies_) {
      auto it = waiting_.find(reply->request_id());
      if (it == waiting_.end() || it->second->stream.get() != stream) {
        // A reply to a request never sent on this stream. Blame the stream's
        // oldest waiting request of this ticket, if any is still there.
        for (auto& p : t->pending) {
          if (p->state == Pending::State::kWaiting && p->stream.get() == stream) {
            ProtocolError(*p, absl::StrCat("reply to request ", reply->request_id(),
                                           ", expected request ", p->id));
            break;
          }
        }
        continue;
      }
      HandleReply(*it->second, *reply);
    }
    for (size_t i = 0; i < streams_.size() && t->error.ok(); ++i) {
      if (!broken[i]) continue;
      // Every request of this ticket still waiting on it is lost.
      for (size_t k = 0; k < t->pending.size() && t->error.ok(); ++k) {
        Pending& p = *t->pending[k];
        if (p.state != Pending::State::kWaiting || p.stream.get() != streams_[i]) continue;
        std::string why;
        const int s = p.server;
        if (servers_[s].stream == p.stream) {
          const absl::Duration grace =
              std::clamp(p.deadline - absl::Now(), absl::ZeroDuration(), kFinalStatusGrace);
          why = Abandon(s, grace);
        } else {
          why = p.stream->Close(absl::ZeroDuration());
        }
        FailOver(p,
                 absl::UnavailableError(absl::StrCat(servers_[s].label, ": stream failed (", why,
                                                     "); request ", p.id, " lost")),
                 /*abandon_stream=*/false);
      }
    }
    const absl::Time now = absl::Now();
    for (size_t k = 0; k < t->pending.size() && t->error.ok(); ++k) {
      Pending& p = *t->pending[k];
      if (p.state != Pending::State::kWaiting || now < p.deadline) continue;
      FailOver(p,
               absl::DeadlineExceededError(absl::StrCat(
                   servers_[p.server].label, ": no reply to request ", p.id, " (", p.rows,
                   " tokens) within ", absl::FormatDuration(p.deadline - p.sent))),
               /*abandon_stream=*/true);
    }
  }
  absl::Status result = t->error;
  if (result.ok() && !t->stranded.empty()) {
    std::sort(t->stranded.begin(), t->stranded.end());
    t->stranded.erase(std::unique(t->stranded.begin(), t->stranded.end()), t->stranded.end());
    result = core::WithFailedTokens(
        absl::Status(t->failure.code(),
                     absl::StrCat(t->failure.message(), "; layer ", t->batch.layer, ": ",
                                  t->stranded.size(), " of ", t->batch.num_tokens,
                                  " tokens have an expert with no replica on another server")),
        t->stranded);
  }
  if (result.ok()) result = Combine(*t);
  Retire(ticket_id);
  return result;
}

void RemoteExpertBackend::Forget(Pending& p) {
  waiting_.erase(p.id);
  p.stream->Forget(p.id);
}

size_t RemoteExpertBackend::BufferBytes(const Pending& p) {
  return CapacityBytes(p.partial) + CapacityBytes(p.row_assignment) +
         CapacityBytes(p.share.tokens) + CapacityBytes(p.share.token_offsets) +
         CapacityBytes(p.share.ffn_ids) + CapacityBytes(p.share.weights) +
         CapacityBytes(p.share.assignment_index);
}

size_t RemoteExpertBackend::BufferBytes(const Ticket& t) {
  return CapacityBytes(t.has_shared) + CapacityBytes(t.shared_out) + CapacityBytes(t.states) +
         CapacityBytes(t.stranded) + t.pending.capacity() * sizeof(t.pending[0]);
}

size_t RemoteExpertBackend::PooledBufferBytes() const {
  absl::MutexLock lock(&mu_);
  size_t bytes = 0;
  for (const auto& p : free_pending_) bytes += BufferBytes(*p);
  for (const auto& t : free_tickets_) bytes += BufferBytes(*t);
  for (const Server& sv : servers_) {
    if (sv.stream) bytes += sv.stream->PooledBytes();
  }
  return bytes;
}

void RemoteExpertBackend::Retire(uint64_t ticket) {
  auto it = std::find_if(tickets_.begin(), tickets_.end(),
                         [ticket](const auto& t) { return t->id == ticket; });
  if (it == tickets_.end()) return;
  std::unique_ptr<Ticket> t = std::move(*it);
  tickets_.erase(it);
  for (auto& p : t->pending) {
    if (p->state == Pending::State::kWaiting) Forget(*p);
    p->stream.reset();
    // Pooled for the next batch, but not with a prefill's buffers.
    if (free_pending_.size() < kMaxPooledPending &&
        BufferBytes(*p) <= internal::kPooledBufferMaxBytes) {
      free_pending_.push_back(std::move(p));
    }
  }
  t->pending.clear();
  if (BufferBytes(*t) <= internal::kPooledBufferMaxBytes) free_tickets_.push_back(std::move(t));
  ReapRetired();
}

void RemoteExpertBackend::ProtocolError(Pending& p, std::string message) {
  Ticket* t = FindTicket(p.ticket);
  Forget(p);
  p.state = Pending::State::kFailed;
  if (servers_[p.server].stream == p.stream) Abandon(p.server, absl::ZeroDuration());
  if (t != nullptr && t->error.ok()) {
    t->error = absl::InternalError(absl::StrCat(servers_[p.server].label, ": ", message));
  }
}

void RemoteExpertBackend::FailOver(Pending& p, const absl::Status& why, bool abandon_stream) {
  Ticket* t = FindTicket(p.ticket);
  const int s = p.server;
  Forget(p);
  p.state = Pending::State::kFailed;
  Server& sv = servers_[s];
  if (abandon_stream && sv.stream == p.stream) Abandon(s, absl::ZeroDuration());
  const absl::Time now = absl::Now();
  sv.avoid_for = std::clamp(sv.avoid_for * 2, kMinAvoid, kMaxAvoid);
  sv.avoid_until = now + sv.avoid_for;
  if (t == nullptr) return;
  if (t->failure.ok()) t->failure = why;
  t->states[s] = place::ServerState::kExcluded;

  // Re-split p's tokens (with their assignments on s) over the other servers.
  const int N = static_cast<int>(servers_.size());
  std::vector<place::ServerState> states = t->states;
  for (int k = 0; k < N; ++k) {
    if (states[k] == place::ServerState::kUp && servers_[k].avoid_until > now) {
      states[k] = place::ServerState::kAvoid;
    }
    queued_[k] = hub_->in_flight[k].load(std::memory_order_relaxed);
  }
  core::ExpertBatch sub;
  sub.layer = t->batch.layer;
  sub.num_tokens = p.rows;
  sub.hidden = t->batch.hidden;
  sub.token_offsets = p.share.token_offsets;
  sub.ffn_ids = p.share.ffn_ids;
  sub.weights = p.share.weights;
  stranded_.clear();
  absl::StatusOr<std::vector<place::ServerShare>> shares =
      place::SplitByServer(sub, placement_, queued_, options_.shared_duty, states, &stranded_);
  if (!shares.ok()) {
    if (t->error.ok()) t->error = shares.status();
    return;
  }
  for (int32_t k : stranded_) t->stranded.push_back(p.share.tokens[k]);
  int64_t resent = 0;
  for (place::ServerShare& share : *shares) {
    if (share.tokens.empty()) continue;
    for (int32_t& k : share.tokens) k = p.share.tokens[k];  // back to batch indices
    for (int32_t& a : share.assignment_index) a = p.share.assignment_index[a];
    resent += static_cast<int64_t>(share.tokens.size());
    Send(*t, std::move(share));
  }
  if (options_.observer != nullptr) {
    options_.observer->OnFailover(t->batch.layer, s, why.code(), resent,
                                  static_cast<int64_t>(stranded_.size()));
  }
  std::fprintf(stderr,
               "dmoe-router: %s; layer %d: %lld tokens re-sent to replicas, %zu without one\n",
               std::string(why.message()).c_str(), t->batch.layer, static_cast<long long>(resent),
               stranded_.size());
}

absl::Status RemoteExpertBackend::Combine(const Ticket& t) {
  const int64_t T = t.batch.num_tokens, H = t.batch.hidden;
  if (T == 0) return absl::OkStatus();
  float* out = t.out;
  bool any_legacy = false;
  for (const auto& p : t.pending) {
    any_legacy |= p->state == Pending::State::kDone && p->legacy_reply;
  }
  if (options_.per_assignment_replies && !any_legacy) {
    // Every assignment's row, added per token in the batch's assignment
    // order: the bits an in-process backend gives, whatever the split.
    const core::ExpertBatch& b = t.batch;
    assignment_rows_.assign(b.ffn_ids.size(), nullptr);
    for (const auto& p : t.pending) {
      if (p->state != Pending::State::kDone) continue;
      for (size_t i = 0; i < p->row_assignment.size(); ++i) {
        assignment_rows_[p->row_assignment[i]] = p->partial.data() + static_cast<int64_t>(i) * H;
      }
    }
    if (t.local_shared) {
      for (int64_t k = 0; k < T; ++k) {
        for (int32_t a = b.token_offsets[k]; a < b.token_offsets[k + 1]; ++a) {
          if (b.ffn_ids[a] == core::kSharedFfn) {
            assignment_rows_[a] = t.shared_out.data() + k * H;
          }
        }
      }
    }
    for (size_t a = 0; a < assignment_rows_.size(); ++a) {
      if (assignment_rows_[a] == nullptr) {
        return absl::InternalError(absl::StrCat("layer ", b.layer, ": assignment ", a,
                                                " has no reply row (dispatch bug)"));
      }
    }
    core::SumAssignmentRows(b.token_offsets, assignment_rows_, H, out);
    return absl::OkStatus();
  }
  // Fixed order (requests as sent, then the local shared FFN), fp32. With a
  // per-assignment reply among per-token ones (a server not yet upgraded),
  // that reply's rows of a token are added in turn.
  std::fill(out, out + T * H, 0.0f);
  for (const auto& p : t.pending) {
    if (p->state != Pending::State::kDone) continue;
    const bool per_token = !options_.per_assignment_replies || p->legacy_reply;
    const float* partial = p->partial.data();
    int64_t row = 0;
    for (size_t i = 0; i < p->share.tokens.size(); ++i) {
      float* o = out + static_cast<int64_t>(p->share.tokens[i]) * H;
      const int64_t rows =
          per_token ? 1 : p->share.token_offsets[i + 1] - p->share.token_offsets[i];
      for (int64_t r = 0; r < rows; ++r, ++row) {
        const float* y = partial + row * H;
        for (int64_t j = 0; j < H; ++j) o[j] += y[j];
      }
    }
  }
  if (t.local_shared) {
    for (int64_t k = 0; k < T; ++k) {
      if (!t.has_shared[k]) continue;
      float* o = out + k * H;
      const float* y = t.shared_out.data() + k * H;
      for (int64_t j = 0; j < H; ++j) o[j] += y[j];
    }
  }
  return absl::OkStatus();
}

void RemoteExpertBackend::OpenStream(int s) {
  Server& sv = servers_[s];
  // After a failure, a fresh channel: the old one may sit in reconnect backoff
  // and would fail a new call at once even though the server is back.
  if (sv.stream) Abandon(s, absl::ZeroDuration());
  ReapRetired();
  if (!sv.channel) {
    grpc::ChannelArguments args;
    args.SetMaxSendMessageSize(options_.max_message_bytes);
    args.SetMaxReceiveMessageSize(options_.max_message_bytes);
    args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, static_cast<int>(options_.keepalive_time.count()));
    args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS,
                static_cast<int>(options_.keepalive_timeout.count()));
    // Not shared with other channels to the same address: a new channel
    // really starts a new connection.
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    sv.channel = grpc::CreateCustomChannel(sv.address, grpc::InsecureChannelCredentials(), args);
    sv.stub = v1::ExpertService::NewStub(sv.channel);
  }
  sv.stream = DispatchStream::Start(sv.stub.get(), hub_, s);
}

std::string RemoteExpertBackend::Abandon(int s, absl::Duration grace) {
  Server& sv = servers_[s];
  std::string why = sv.stream->Close(grace);
  retired_.push_back({std::move(sv.stream), std::move(sv.channel)});
  sv.stream.reset();
  sv.channel.reset();
  sv.stub.reset();
  return why;
}

size_t RemoteExpertBackend::Pack(const core::ExpertBatch& b, const Pending& p,
                                 DispatchStream& stream) {
  size_t bytes = 0;
  const place::ServerShare& share = p.share;
  const uint64_t id = p.id;
  const common::WireDType wire = options_.wire_dtype;
  const int64_t H = b.hidden;
  const int64_t n = static_cast<int64_t>(share.tokens.size());
  const int64_t row_bytes = H * static_cast<int64_t>(common::WireElementSize(wire)) +
                            (wire == common::WireDType::kF8E4M3 ? 4 : 0);
  const int64_t rows_per_chunk =
      std::max<int64_t>(1, static_cast<int64_t>(options_.max_chunk_bytes) / row_bytes);
  const int64_t chunks = (n + rows_per_chunk - 1) / rows_per_chunk;

  stream.Expect(id, n);
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t r0 = c * rows_per_chunk, r1 = std::min(n, r0 + rows_per_chunk);
    const int64_t rows = r1 - r0;
    // Rows of consecutive tokens are packed in place, others gathered first.
    const float* src = b.x + static_cast<int64_t>(share.tokens[r0]) * H;
    if (share.tokens[r1 - 1] - share.tokens[r0] != rows - 1) {
      gather_.resize(static_cast<size_t>(rows * H));
      for (int64_t r = r0; r < r1; ++r) {
        std::memcpy(gather_.data() + (r - r0) * H, b.x + static_cast<int64_t>(share.tokens[r]) * H,
                    H * sizeof(float));
      }
      src = gather_.data();
    }

    std::unique_ptr<v1::ExpertRequest> req = stream.TakeRequest();
    req->set_request_id(id);
    req->set_layer(static_cast<uint32_t>(b.layer));
    req->set_placement_version(placement_.version());
    v1::Activations* x = req->mutable_x();
    x->set_dtype(ToProto(wire));
    x->set_rows(static_cast<uint32_t>(rows));
    x->set_cols(static_cast<uint32_t>(H));
    common::PackActivations(src, rows, H, 0, wire, x->mutable_data(), x->mutable_row_scales());
    req->clear_token_offsets();
    req->clear_expert_ids();
    req->clear_weights();
    req->clear_shared_duty();
    req->add_token_offsets(0);
    for (int64_t r = r0; r < r1; ++r) {
      bool shared = false;
      for (int32_t a = share.token_offsets[r]; a < share.token_offsets[r + 1]; ++a) {
        if (share.ffn_ids[a] == core::kSharedFfn) {
          shared = true;  // weight 1 (validated)
        } else {
          req->add_expert_ids(share.ffn_ids[a]);
          req->add_weights(share.weights[a]);
        }
      }
      req->add_token_offsets(static_cast<uint32_t>(req->expert_ids_size()));
      req->add_shared_duty(shared);
    }
    req->set_reply_dtype(ToProto(wire));
    req->set_per_assignment_reply(options_.per_assignment_replies);
    req->set_chunk_index(static_cast<uint32_t>(c));
    req->set_chunk_count(static_cast<uint32_t>(chunks));
    if (options_.observer != nullptr) bytes += req->ByteSizeLong();
    stream.Send(std::move(req));
  }
  return bytes;
}

absl::Status RemoteExpertBackend::ComputeLocalShared(Ticket& t) {
  const core::ExpertBatch& b = t.batch;
  const int64_t T = b.num_tokens;
  shared_offsets_.resize(T + 1);
  shared_ids_.clear();
  shared_weights_.clear();
  shared_offsets_[0] = 0;
  for (int64_t k = 0; k < T; ++k) {
    if (t.has_shared[k]) {
      shared_ids_.push_back(core::kSharedFfn);
      shared_weights_.push_back(1.0f);
    }
    shared_offsets_[k + 1] = static_cast<int32_t>(shared_ids_.size());
  }
  t.shared_out.resize(static_cast<size_t>(T * b.hidden));
  core::ExpertBatch local = b;
  local.token_offsets = shared_offsets_;
  local.ffn_ids = shared_ids_;
  local.weights = shared_weights_;
  return local_->Compute(local, t.shared_out.data());
}

void RemoteExpertBackend::HandleReply(Pending& p, const v1::ExpertResponse& r) {
  const std::string& label = servers_[p.server].label;
  Ticket* t = FindTicket(p.ticket);
  if (r.error_code() != 0) {
    const absl::Status st(common::StatusCodeFromWire(r.error_code()),
                          absl::StrCat(label, ": ", r.error_message()));
    if (st.code() == absl::StatusCode::kUnavailable ||
        st.code() == absl::StatusCode::kResourceExhausted ||
        st.code() == absl::StatusCode::kFailedPrecondition) {
      // Draining, overloaded, or without the slots this placement gives it
      // (a server restarted at the same address holds none until the
      // controller reloads it): the stream is fine, the work goes to replicas.
      FailOver(p, st, /*abandon_stream=*/false);
      return;
    }
    Forget(p);
    p.state = Pending::State::kFailed;
    if (t != nullptr && t->error.ok()) t->error = st;
    return;
  }
  const uint32_t count = std::max(r.chunk_count(), 1u);
  if (r.chunk_index() != p.next_chunk || r.chunk_index() >= count ||
      (p.next_chunk > 0 && count != p.chunk_count)) {
    ProtocolError(p,
                  absl::StrCat("request ", p.id, ": reply chunk ", r.chunk_index(), " of ", count,
                               ", expected chunk ", p.next_chunk, p.next_chunk > 0 ? " of " : "",
                               p.next_chunk > 0 ? absl::StrCat(p.chunk_count) : ""));
    return;
  }
  p.chunk_count = count;
  const int64_t hidden = t != nullptr ? t->batch.hidden : 0;
  const v1::Activations& y = r.y();
  if (y.dtype() != ToProto(options_.wire_dtype)) {
    ProtocolError(
        p, absl::StrCat("request ", p.id, ": reply dtype ", v1::ActivationDType_Name(y.dtype()),
                        ", expected ", v1::ActivationDType_Name(ToProto(options_.wire_dtype))));
    return;
  }
  if (y.cols() != hidden || p.rows_received + y.rows() > p.reply_rows) {
    ProtocolError(
        p, absl::StrCat("request ", p.id, ": reply chunk ", r.chunk_index(), " is [", y.rows(),
                        ", ", y.cols(), "] after ", p.rows_received, " rows; expected ",
                        p.reply_rows, " rows of hidden ", hidden, " for ", p.rows, " tokens"));
    return;
  }
  absl::Status st =
      common::UnpackActivations(options_.wire_dtype, y.data(), y.row_scales(), y.rows(), hidden,
                                p.partial.data() + p.rows_received * hidden);
  if (!st.ok()) {
    ProtocolError(p, absl::StrCat("request ", p.id, ": reply ", st.message()));
    return;
  }
  p.rows_received += y.rows();
  if (options_.observer != nullptr) p.reply_bytes += r.ByteSizeLong();
  ++p.next_chunk;
  if (p.next_chunk == count) {
    p.legacy_reply = p.rows_received == p.rows && p.rows != p.reply_rows;
    if (p.rows_received != p.reply_rows && !p.legacy_reply) {
      ProtocolError(
          p, absl::StrCat("request ", p.id, ": reply has ", p.rows_received, " rows, expected ",
                          p.reply_rows, " for ", p.rows, " tokens sent"));
      return;
    }
    if (p.legacy_reply && !servers_[p.server].warned_legacy) {
      servers_[p.server].warned_legacy = true;
      std::fprintf(stderr,
                   "dmoe-router: %s answers one partial sum per token (a server without "
                   "per-assignment replies, older than this router): its tokens' results "
                   "are correct but not bitwise batch-invariant until it is upgraded\n",
                   servers_[p.server].label.c_str());
    }
    Forget(p);
    p.state = Pending::State::kDone;
    if (options_.observer != nullptr && t != nullptr) {
      options_.observer->OnReply(t->batch.layer, p.server, p.rows, p.reply_bytes,
                                 absl::Now() - p.sent);
    }
    // A server that answers is not avoided any longer.
    Server& sv = servers_[p.server];
    sv.avoid_for = absl::ZeroDuration();
    sv.avoid_until = absl::InfinitePast();
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<core::ExpertBackend>> MakeRemoteExpertBackend(
    RemoteExpertOptions options) {
  DMOE_ASSIGN_OR_RETURN(RemoteExperts r, MakeRemoteExperts(std::move(options)));
  return std::move(r.backend);
}

absl::StatusOr<RemoteExperts> MakeRemoteExperts(RemoteExpertOptions options) {
  if (options.servers.empty()) {
    return absl::InvalidArgumentError("remote experts: no expert servers given");
  }
  if (static_cast<int>(options.servers.size()) != options.placement.num_servers()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "remote experts: ", options.servers.size(), " servers given but placement ", "version ",
        options.placement.version(), " has ", options.placement.num_servers()));
  }
  if (options.deadline <= std::chrono::milliseconds(0)) {
    return absl::InvalidArgumentError("remote experts: deadline must be positive");
  }
  if (options.max_chunk_bytes == 0 || options.max_message_bytes <= 0) {
    return absl::InvalidArgumentError("remote experts: chunk and message limits must be positive");
  }
  if (options.servers.size() > static_cast<size_t>(kMaxExpertServers)) {
    return absl::InvalidArgumentError(absl::StrCat("remote experts: ", options.servers.size(),
                                                   " servers, at most ", kMaxExpertServers));
  }
  auto* b = new RemoteExpertBackend(std::move(options));
  RemoteExperts r;
  r.backend.reset(b);
  r.control = b;
  return r;
}

}  // namespace dmoe::router
