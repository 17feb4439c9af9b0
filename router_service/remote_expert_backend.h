// An ExpertBackend whose routed experts live on expert servers (dmoe-expert),
// reached over one long-lived gRPC bidirectional Dispatch stream per server.
//
// Submit(batch) splits the batch with place::SplitByServer (each token goes once
// to every server it visits; shared duty to a server it already visits, or kept
// local with SharedDuty::kRouter), packs activations (bf16 by default, f32 in
// exact mode) and sends every server its share; Await collects the replies
// and combines them per token (Compute = Submit + Await). Several submitted
// batches may be out at once (the model's micro-batches); their requests
// share the streams. Replicas are chosen by live load (tokens in flight per
// server, from requests still unanswered). By default servers reply with one
// row per assignment and the router adds a token's rows in the batch's
// assignment order (core::SumAssignmentRows), so a token's result does not
// depend on which servers or replicas computed it, nor on its batch
// (per_assignment_replies). Without that, each server returns one partial sum
// per token, summed in request order: the bits then depend on the replica
// choice (the order of the fp32 additions or, in bf16, which partials are
// rounded together). With
// SharedDuty::kRouter the shared FFN is computed locally (in Submit, while the
// requests are out) by a CPU backend that LoadFfn(layer, kSharedFfn, ...)
// fills; LoadFfn of routed experts is refused.
//
// Failover. Every request has its own deadline. When a server fails a
// request (its stream breaks, the deadline passes, or it answers UNAVAILABLE
// (draining) or RESOURCE_EXHAUSTED (queue full)), the request's tokens are
// re-sent, with their assignments on that server, to other replicas of those
// experts (fresh deadline), and the server is avoided by later batches for a
// back-off (250 ms doubling to 5 s; reset by its next answer) while replicas
// elsewhere exist. Tokens with an expert that has no replica on a server
// still standing are "stranded": Await fails with the server's error (code
// UNAVAILABLE / DEADLINE_EXCEEDED, message starting "expert server 2
// (10.0.0.7:5555): ...") and core::FailedTokens(status) lists them, so that
// the caller fails only their sequences.
//
// Other errors fail the whole batch: the server's own in-band status (e.g.
// FAILED_PRECONDITION for a stale placement version), INTERNAL for a reply
// that breaks the protocol (unknown request id, rows, dtype, chunk order; the
// stream is then reopened). Batch shape errors are INVALID_ARGUMENT; an
// expert with no replica in the placement or a shared FFN the router should
// compute but has not loaded, FAILED_PRECONDITION. On error `out` is not
// written. Replies that still arrive for an abandoned request are dropped by
// request id.
//
// Wire details: one request id per (batch, server, attempt), increasing; the
// shared FFN is never sent as an expert id but as the token's shared_duty flag
// (its gate weight must be 1); a request whose packed x exceeds
// max_chunk_bytes is split by rows; the server may chunk its reply
// independently, as long as the chunks arrive in order and add up to the
// request's rows.
//
// Thread safety: Submit / Await / Cancel / Compute from one thread at a time;
// LoadFfn / UnloadFfn must not race with them (as for the CPU backend);
// RemoteExpertControl's methods from any thread.
#ifndef DMOE_ROUTER_SERVICE_REMOTE_EXPERT_BACKEND_H_
#define DMOE_ROUTER_SERVICE_REMOTE_EXPERT_BACKEND_H_

#include <chrono>
#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/wire.h"
#include "core/expert_backend.h"
#include "placement/placement.h"

namespace dmoe::router {

// Told of the traffic to each server, on the thread that submits and awaits
// batches (metrics, load windows). Must be quick and must not call back.
class RemoteExpertObserver {
 public:
  virtual ~RemoteExpertObserver() = default;
  // A request sent: its share of a layer's batch (tokens, per-token expert
  // assignments and shared duty as kSharedFfn) and its size on the wire.
  virtual void OnSend(int32_t layer, int server, const place::ServerShare& share,
                      size_t wire_bytes) = 0;
  // A request answered in full: its reply size and round trip.
  virtual void OnReply(int32_t layer, int server, int64_t tokens, size_t wire_bytes,
                       absl::Duration round_trip) = 0;
  // Server `server` failed a request (`code`: UNAVAILABLE, DEADLINE_EXCEEDED,
  // RESOURCE_EXHAUSTED): `resent` tokens went to replicas, `stranded` had none.
  virtual void OnFailover(int32_t layer, int server, absl::StatusCode code, int64_t resent,
                          int64_t stranded) = 0;
};

struct RemoteExpertOptions {
  std::vector<std::string> servers;  // "host:port", index = server index of the placement
  place::Placement placement;
  common::WireDType wire_dtype = common::WireDType::kBF16;
  place::SharedDuty shared_duty = place::SharedDuty::kExpertServers;
  // Servers reply with one row per assignment (weight * FFN(x)) and the
  // router adds each token's rows in the batch's assignment order: results
  // are bitwise independent of how a token's experts are split over servers
  // and replicas (and, with an f32 wire, equal to an in-process backend's).
  // False: one partial sum per token and server (fewer reply bytes: one row
  // per server a token visits instead of one per expert), whose bits depend
  // on the split.
  bool per_assignment_replies = true;
  core::ComputeType local_compute = core::ComputeType::kBF16;  // local shared FFN
  std::chrono::milliseconds deadline{10000};                   // per request round trip
  // Requests whose packed activations exceed this are split by rows (at least
  // one row per chunk). One chunk must fit in max_message_bytes.
  size_t max_chunk_bytes = size_t{3} << 20;
  int max_message_bytes = 64 << 20;  // gRPC max send/receive message size
  // HTTP/2 keepalive pings on an idle connection. A server only accepts pings
  // this frequent if its GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS
  // is at most this (gRPC's default is 5 min; the client sends at most 2 pings
  // without data in between, which stays under the default strike limit).
  std::chrono::milliseconds keepalive_time{60000};
  std::chrono::milliseconds keepalive_timeout{20000};
  // Not owned; must outlive the backend. Null = none.
  RemoteExpertObserver* observer = nullptr;
};

// Live changes to a remote backend, from any thread (the placement
// controller) while the backend's own thread keeps submitting batches.
class RemoteExpertControl {
 public:
  virtual ~RemoteExpertControl() = default;
  // Makes `placement` the one batches are planned with and `servers` the
  // servers' addresses (index = server index; placement.num_servers() ==
  // servers.size(); an index whose address changes gets a new stream). It
  // takes effect between two steps, when no batch is outstanding: at once
  // when idle, else at the next Submit with nothing outstanding. Blocks until
  // then; DEADLINE_EXCEEDED (and no switch) when that takes over `timeout`.
  // InvalidArgument for a size mismatch, an empty address, or more than
  // kMaxExpertServers servers.
  virtual absl::Status SwitchPlacement(place::Placement placement, std::vector<std::string> servers,
                                       absl::Duration timeout) = 0;
  virtual place::Placement placement() const = 0;
  virtual std::vector<std::string> servers() const = 0;
  // Bytes the backend keeps pooled between batches for reuse (request
  // messages, reply buffers): bounded by the decode working set, whatever
  // the largest batch so far (internal::kPooledBufferMaxBytes per object).
  virtual size_t PooledBufferBytes() const = 0;
};

inline constexpr int kMaxExpertServers = 1024;

struct RemoteExperts {
  std::unique_ptr<core::ExpertBackend> backend;
  RemoteExpertControl* control = nullptr;  // the same object; lives as long as `backend`
};

// Connects lazily (first Compute). InvalidArgument when the server count does
// not match the placement.
absl::StatusOr<RemoteExperts> MakeRemoteExperts(RemoteExpertOptions options);
absl::StatusOr<std::unique_ptr<core::ExpertBackend>> MakeRemoteExpertBackend(
    RemoteExpertOptions options);

}  // namespace dmoe::router

#endif  // DMOE_ROUTER_SERVICE_REMOTE_EXPERT_BACKEND_H_
