// RemoteExpertBackend: SplitByServer -> pack and send each server its share ->
// (local shared FFN) -> await every reply under one deadline -> sum per token
// in ascending server order.
//
// Streams are internal::DispatchStream reactors (callback API; see that header
// for why). This file owns the per-Compute protocol: request ids, chunking,
// reply validation and reassembly, error mapping, reconnection.
#include "router_service/remote_expert_backend.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "core/status.h"
#include "dmoe/v1/expert.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "router_service/internal/dispatch_stream.h"

namespace dmoe::router {
namespace {

using internal::DispatchHub;
using internal::DispatchStream;

v1::ActivationDType ToProto(core::WireDType t) {
  switch (t) {
    case core::WireDType::kBF16: return v1::ACTIVATION_DTYPE_BF16;
    case core::WireDType::kF32: return v1::ACTIVATION_DTYPE_F32;
    case core::WireDType::kF8E4M3: return v1::ACTIVATION_DTYPE_F8_E4M3;
  }
  return v1::ACTIVATION_DTYPE_UNSPECIFIED;
}

absl::StatusCode CodeFromWire(int32_t code) {
  if (code <= 0 || code > static_cast<int32_t>(absl::StatusCode::kUnauthenticated)) {
    return absl::StatusCode::kUnknown;
  }
  return static_cast<absl::StatusCode>(code);
}

// How long a failed stream is given to report gRPC's final status (only on
// the error path; it makes "connection refused" visible in the message).
constexpr absl::Duration kFinalStatusGrace = absl::Milliseconds(100);

class RemoteExpertBackend final : public core::ExpertBackend {
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
  size_t WeightBytes() const override { return local_->WeightBytes(); }

 private:
  struct Server {
    std::string address;
    std::string label;  // "expert server 2 (host:port)", prefixes its errors
    std::shared_ptr<grpc::Channel> channel;
    std::unique_ptr<v1::ExpertService::Stub> stub;
    std::shared_ptr<DispatchStream> stream;  // null until needed / after a failure
  };
  // One server's part of the Compute in progress.
  struct Pending {
    int server = 0;
    uint64_t id = 0;
    int64_t rows = 0;           // tokens sent
    int64_t rows_received = 0;  // rows of reply unpacked so far
    uint32_t next_chunk = 0;
    uint32_t chunk_count = 0;  // of the reply, known from its first chunk
    bool done = false;
  };

  absl::Status Validate(const core::ExpertBatch& b, const float* out) const;
  void OpenStream(int s);
  // Closes server s's stream (reopened by the next Compute, on a new channel);
  // returns why it ended. The stream and its channel are retired.
  std::string Abandon(int s, absl::Duration grace);
  // Destroys the retired streams and channels that gRPC is done with.
  void ReapRetired();
  void SendShare(const core::ExpertBatch& b, const core::ServerShare& share, uint64_t id);
  absl::Status AwaitReplies(absl::Time start, absl::Time deadline, int64_t hidden);
  // `reconnect` is set for protocol errors (the stream is no longer trusted).
  absl::Status HandleReply(Pending& p, const v1::ExpertResponse& r, int64_t hidden,
                           bool* reconnect);
  absl::Status ComputeLocalShared(const core::ExpertBatch& b);

  // Const after construction.
  const RemoteExpertOptions options_;
  const std::shared_ptr<DispatchHub> hub_;
  const std::unique_ptr<core::ExpertBackend> local_;  // shared FFNs (SharedDuty::kRouter)

  // Compute thread only.
  std::vector<Server> servers_;
  // Closed streams that gRPC may still use, with their channels: destroyed
  // here once finished, never in a reaction (see dispatch_stream.h).
  struct Retired {
    std::shared_ptr<DispatchStream> stream;
    std::shared_ptr<grpc::Channel> channel;
  };
  std::vector<Retired> retired_;
  uint64_t next_request_id_ = 1;
  // Workspaces, grown only.
  std::vector<int64_t> queued_;              // [N] live load at split time
  std::vector<core::ServerShare> shares_;    // [N]
  std::vector<Pending> pending_;             // servers with tokens, ascending
  std::vector<float> gather_;                // [chunk rows, hidden] x rows of one chunk
  std::vector<std::vector<float>> partial_;  // [N][share tokens, hidden] unpacked replies
  std::vector<std::pair<size_t, std::unique_ptr<v1::ExpertResponse>>> replies_;
  std::vector<std::unique_ptr<v1::ExpertResponse>> taken_;
  std::vector<char> has_shared_;             // [T]
  std::vector<int32_t> shared_offsets_;      // [T + 1] local shared batch
  std::vector<int32_t> shared_ids_;          // [tokens with shared]
  std::vector<float> shared_weights_;        // [tokens with shared]
  std::vector<float> shared_out_;            // [T, hidden]
};

RemoteExpertBackend::RemoteExpertBackend(RemoteExpertOptions options)
    : options_(std::move(options)),
      hub_(std::make_shared<DispatchHub>(static_cast<int>(options_.servers.size()))),
      local_(core::MakeCpuExpertBackend(options_.local_compute)) {
  const int n = static_cast<int>(options_.servers.size());
  servers_.resize(n);
  for (int s = 0; s < n; ++s) {
    servers_[s].address = options_.servers[s];
    servers_[s].label = absl::StrCat("expert server ", s, " (", options_.servers[s], ")");
  }
  queued_.resize(n);
  partial_.resize(n);
}

RemoteExpertBackend::~RemoteExpertBackend() {
  for (int s = 0; s < static_cast<int>(servers_.size()); ++s) {
    if (servers_[s].stream) Abandon(s, absl::ZeroDuration());
  }
  // Cancelled calls end promptly; wait for gRPC to be done with every stream.
  bool all_finished;
  {
    absl::MutexLock lock(&hub_->mu);
    all_finished = hub_->mu.AwaitWithTimeout(
        absl::Condition(+[](DispatchHub* h) { return h->live_streams == 0; }, hub_.get()),
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
  if (ffn_id == core::kSharedFfn) {
    if (local_->HasFfn(layer, ffn_id)) return true;
    // Every expert server holds the shared FFN of every MoE layer.
    return options_.shared_duty == core::SharedDuty::kExpertServers &&
           !options_.placement.Replicas(layer, 0).empty();
  }
  return ffn_id >= 0 && !options_.placement.Replicas(layer, ffn_id).empty();
}

absl::Status RemoteExpertBackend::Validate(const core::ExpertBatch& b, const float* out) const {
  const int32_t layer = b.layer;
  if (layer < 0) return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " is negative"));
  if (b.num_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer, ": num_tokens ", b.num_tokens, " is negative"));
  }
  if (b.token_offsets.size() != static_cast<size_t>(b.num_tokens) + 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "layer ", layer, ": token_offsets has ", b.token_offsets.size(),
        " entries, expected num_tokens + 1 = ", b.num_tokens + 1));
  }
  const size_t num_assignments = b.ffn_ids.size();
  if (b.weights.size() != num_assignments) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, ": ", b.weights.size(),
                                                   " weights for ", num_assignments,
                                                   " assignments"));
  }
  if (b.token_offsets[0] != 0) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, ": token_offsets[0] is ",
                                                   b.token_offsets[0], ", expected 0"));
  }
  for (int64_t t = 0; t < b.num_tokens; ++t) {
    if (b.token_offsets[t + 1] < b.token_offsets[t]) {
      return absl::InvalidArgumentError(
          absl::StrCat("layer ", layer, ": token_offsets decrease at token ", t, " (",
                       b.token_offsets[t], " -> ", b.token_offsets[t + 1], ")"));
    }
  }
  if (static_cast<size_t>(b.token_offsets[b.num_tokens]) != num_assignments) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer, ": token_offsets end at ", b.token_offsets[b.num_tokens],
                     " but there are ", num_assignments, " assignments"));
  }
  if (b.num_tokens == 0) return absl::OkStatus();
  if (b.hidden <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer, ": hidden ", b.hidden, " must be positive"));
  }
  if (b.x == nullptr || out == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, ": null x or out"));
  }
  for (int64_t t = 0; t < b.num_tokens; ++t) {
    bool shared = false;
    for (int32_t a = b.token_offsets[t]; a < b.token_offsets[t + 1]; ++a) {
      const int32_t id = b.ffn_ids[a];
      if (id < core::kSharedFfn) {
        return absl::InvalidArgumentError(
            absl::StrCat("layer ", layer, ": invalid FFN id ", id, " at assignment ", a));
      }
      if (id != core::kSharedFfn) continue;
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
  DMOE_RETURN_IF_ERROR(Validate(b, out));
  const int64_t T = b.num_tokens, H = b.hidden;
  if (T == 0) return absl::OkStatus();
  const int N = static_cast<int>(servers_.size());

  bool any_local_shared = false;
  if (options_.shared_duty == core::SharedDuty::kRouter) {
    has_shared_.assign(T, 0);
    for (int64_t t = 0; t < T; ++t) {
      for (int32_t a = b.token_offsets[t]; a < b.token_offsets[t + 1]; ++a) {
        if (b.ffn_ids[a] == core::kSharedFfn) has_shared_[t] = any_local_shared = true;
      }
    }
    if (any_local_shared && !local_->HasFfn(b.layer, core::kSharedFfn)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "layer ", b.layer, ": shared FFN is not loaded on the router (shared duty: router)"));
    }
  }

  for (int s = 0; s < N; ++s) queued_[s] = hub_->in_flight[s].load(std::memory_order_relaxed);
  DMOE_ASSIGN_OR_RETURN(shares_, core::SplitByServer(b, options_.placement, queued_,
                                                     options_.shared_duty));

  const absl::Time start = absl::Now();
  const absl::Time deadline = start + absl::FromChrono(options_.deadline);
  pending_.clear();
  for (int s = 0; s < N; ++s) {
    const core::ServerShare& share = shares_[s];
    if (share.tokens.empty()) continue;
    // A stream that broke while idle (e.g. the server restarted between
    // steps) lost nothing: replace it before sending.
    if (!servers_[s].stream || servers_[s].stream->Broken()) OpenStream(s);
    Pending p;
    p.server = s;
    p.id = next_request_id_++;
    p.rows = static_cast<int64_t>(share.tokens.size());
    pending_.push_back(p);
    partial_[s].resize(static_cast<size_t>(p.rows * H));
    SendShare(b, share, p.id);
  }

  // Overlapped with the round trips.
  if (any_local_shared) DMOE_RETURN_IF_ERROR(ComputeLocalShared(b));

  DMOE_RETURN_IF_ERROR(AwaitReplies(start, deadline, H));

  // Combine: fixed order (servers ascending, then the local shared FFN), fp32.
  std::fill(out, out + T * H, 0.0f);
  for (const Pending& p : pending_) {
    const core::ServerShare& share = shares_[p.server];
    const float* partial = partial_[p.server].data();
    for (size_t i = 0; i < share.tokens.size(); ++i) {
      float* o = out + static_cast<int64_t>(share.tokens[i]) * H;
      const float* y = partial + static_cast<int64_t>(i) * H;
      for (int64_t j = 0; j < H; ++j) o[j] += y[j];
    }
  }
  if (any_local_shared) {
    for (int64_t t = 0; t < T; ++t) {
      if (!has_shared_[t]) continue;
      float* o = out + t * H;
      const float* y = shared_out_.data() + t * H;
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

void RemoteExpertBackend::SendShare(const core::ExpertBatch& b, const core::ServerShare& share,
                                    uint64_t id) {
  DispatchStream& stream = *servers_[share.server].stream;
  const core::WireDType wire = options_.wire_dtype;
  const int64_t H = b.hidden;
  const int64_t n = static_cast<int64_t>(share.tokens.size());
  const int64_t row_bytes = H * static_cast<int64_t>(core::WireElementSize(wire)) +
                            (wire == core::WireDType::kF8E4M3 ? 4 : 0);
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
        std::memcpy(gather_.data() + (r - r0) * H,
                    b.x + static_cast<int64_t>(share.tokens[r]) * H, H * sizeof(float));
      }
      src = gather_.data();
    }

    std::unique_ptr<v1::ExpertRequest> req = stream.TakeRequest();
    req->set_request_id(id);
    req->set_layer(static_cast<uint32_t>(b.layer));
    req->set_placement_version(options_.placement.version());
    v1::Activations* x = req->mutable_x();
    x->set_dtype(ToProto(wire));
    x->set_rows(static_cast<uint32_t>(rows));
    x->set_cols(static_cast<uint32_t>(H));
    core::PackActivations(src, rows, H, 0, wire, x->mutable_data(), x->mutable_row_scales());
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
    req->set_chunk_index(static_cast<uint32_t>(c));
    req->set_chunk_count(static_cast<uint32_t>(chunks));
    stream.Send(std::move(req));
  }
}

absl::Status RemoteExpertBackend::ComputeLocalShared(const core::ExpertBatch& b) {
  const int64_t T = b.num_tokens;
  shared_offsets_.resize(T + 1);
  shared_ids_.clear();
  shared_weights_.clear();
  shared_offsets_[0] = 0;
  for (int64_t t = 0; t < T; ++t) {
    if (has_shared_[t]) {
      shared_ids_.push_back(core::kSharedFfn);
      shared_weights_.push_back(1.0f);
    }
    shared_offsets_[t + 1] = static_cast<int32_t>(shared_ids_.size());
  }
  shared_out_.resize(static_cast<size_t>(T * b.hidden));
  core::ExpertBatch local = b;
  local.token_offsets = shared_offsets_;
  local.ffn_ids = shared_ids_;
  local.weights = shared_weights_;
  return local_->Compute(local, shared_out_.data());
}

absl::Status RemoteExpertBackend::AwaitReplies(absl::Time start, absl::Time deadline,
                                               int64_t hidden) {
  size_t remaining = pending_.size();
  while (remaining > 0) {
    replies_.clear();
    int broken = -1;  // index into pending_ of a server whose stream broke
    {
      absl::MutexLock lock(&hub_->mu);
      auto news = [this]() {
        for (const Pending& p : pending_) {
          if (!p.done && servers_[p.server].stream->HasNewsLocked()) return true;
        }
        return false;
      };
      hub_->mu.AwaitWithDeadline(absl::Condition(&news), deadline);
      for (size_t i = 0; i < pending_.size(); ++i) {
        if (pending_[i].done) continue;
        DispatchStream& stream = *servers_[pending_[i].server].stream;
        taken_.clear();
        stream.TakeRepliesLocked(&taken_);
        for (auto& r : taken_) replies_.emplace_back(i, std::move(r));
        if (broken < 0 && stream.BrokenLocked()) broken = static_cast<int>(i);
      }
    }
    // Replies first (in server order): an error reply explains a broken
    // stream better than the break itself.
    for (auto& [i, reply] : replies_) {
      Pending& p = pending_[i];
      if (p.done) {  // more than the reply: the server broke the protocol
        Abandon(p.server, absl::ZeroDuration());
        return absl::InternalError(absl::StrCat(servers_[p.server].label, ": reply to request ",
                                                reply->request_id(), " after its last chunk"));
      }
      bool reconnect = false;
      absl::Status st = HandleReply(p, *reply, hidden, &reconnect);
      if (!st.ok()) {
        if (reconnect) Abandon(p.server, absl::ZeroDuration());
        return st;
      }
      if (p.done) --remaining;
    }
    if (broken >= 0 && !pending_[broken].done) {
      const int s = pending_[broken].server;
      const absl::Duration grace =
          std::clamp(deadline - absl::Now(), absl::ZeroDuration(), kFinalStatusGrace);
      const std::string why = Abandon(s, grace);
      return absl::UnavailableError(absl::StrCat(servers_[s].label, ": stream failed (", why,
                                                 "); request ", pending_[broken].id,
                                                 " lost"));
    }
    if (remaining > 0 && absl::Now() >= deadline) {
      std::string msg;
      int late = 0;
      for (const Pending& p : pending_) {
        if (p.done) continue;
        if (late++ == 0) {
          msg = absl::StrCat(servers_[p.server].label, ": no reply to request ", p.id, " (", p.rows,
                             " tokens) within ", absl::FormatDuration(deadline - start));
        } else {
          absl::StrAppend(&msg, late == 2 ? "; also late: " : ", ", servers_[p.server].label);
        }
        Abandon(p.server, absl::ZeroDuration());
      }
      return absl::DeadlineExceededError(msg);
    }
  }
  return absl::OkStatus();
}

absl::Status RemoteExpertBackend::HandleReply(Pending& p, const v1::ExpertResponse& r,
                                              int64_t hidden, bool* reconnect) {
  const std::string& label = servers_[p.server].label;
  *reconnect = true;
  if (r.request_id() != p.id) {
    return absl::InternalError(absl::StrCat(label, ": reply to request ", r.request_id(),
                                            ", expected request ", p.id));
  }
  if (r.error_code() != 0) {
    *reconnect = false;  // an in-band error: the stream is fine
    return absl::Status(CodeFromWire(r.error_code()), absl::StrCat(label, ": ", r.error_message()));
  }
  const uint32_t count = std::max(r.chunk_count(), 1u);
  if (r.chunk_index() != p.next_chunk || r.chunk_index() >= count ||
      (p.next_chunk > 0 && count != p.chunk_count)) {
    return absl::InternalError(absl::StrCat(label, ": request ", p.id, ": reply chunk ",
                                            r.chunk_index(), " of ", count, ", expected chunk ",
                                            p.next_chunk, p.next_chunk > 0 ? " of " : "",
                                            p.next_chunk > 0 ? absl::StrCat(p.chunk_count) : ""));
  }
  p.chunk_count = count;
  const v1::Activations& y = r.y();
  if (y.dtype() != ToProto(options_.wire_dtype)) {
    return absl::InternalError(absl::StrCat(label, ": request ", p.id, ": reply dtype ",
                                            v1::ActivationDType_Name(y.dtype()), ", expected ",
                                            v1::ActivationDType_Name(ToProto(options_.wire_dtype))));
  }
  if (y.cols() != hidden || p.rows_received + y.rows() > p.rows) {
    return absl::InternalError(absl::StrCat(label, ": request ", p.id, ": reply chunk ",
                                            r.chunk_index(), " is [", y.rows(), ", ", y.cols(),
                                            "] after ", p.rows_received, " rows; sent ", p.rows,
                                            " tokens of hidden ", hidden));
  }
  absl::Status st = core::UnpackActivations(
      options_.wire_dtype, y.data(), y.row_scales(), y.rows(), hidden,
      partial_[p.server].data() + p.rows_received * hidden);
  if (!st.ok()) {
    return absl::InternalError(absl::StrCat(label, ": request ", p.id, ": reply ", st.message()));
  }
  p.rows_received += y.rows();
  ++p.next_chunk;
  if (p.next_chunk == count) {
    if (p.rows_received != p.rows) {
      return absl::InternalError(absl::StrCat(label, ": request ", p.id, ": reply has ",
                                              p.rows_received, " rows for ", p.rows,
                                              " tokens sent"));
    }
    p.done = true;
  }
  *reconnect = false;
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<core::ExpertBackend>> MakeRemoteExpertBackend(
    RemoteExpertOptions options) {
  if (options.servers.empty()) {
    return absl::InvalidArgumentError("remote experts: no expert servers given");
  }
  if (static_cast<int>(options.servers.size()) != options.placement.num_servers()) {
    return absl::InvalidArgumentError(
        absl::StrCat("remote experts: ", options.servers.size(), " servers given but placement ",
                     "version ", options.placement.version(), " has ",
                     options.placement.num_servers()));
  }
  if (options.deadline <= std::chrono::milliseconds(0)) {
    return absl::InvalidArgumentError("remote experts: deadline must be positive");
  }
  if (options.max_chunk_bytes == 0 || options.max_message_bytes <= 0) {
    return absl::InvalidArgumentError("remote experts: chunk and message limits must be positive");
  }
  return std::unique_ptr<core::ExpertBackend>(new RemoteExpertBackend(std::move(options)));
}

}  // namespace dmoe::router
