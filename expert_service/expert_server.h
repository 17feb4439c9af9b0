// The expert server (docs/design.md, "Expert server"): hosts, for every MoE layer,
// the routed experts its placement gives it (replicas included) plus the
// shared expert(s), and answers dmoe.v1.ExpertService.
//
//   auto server = ExpertServer::Create(options);   // loads the weights
//   server->Start("127.0.0.1", 0);                 // serves; port() is bound
//   ...
//   server->Shutdown(absl::Seconds(30));          // drains, stops
//
// Dispatch: one long-lived bidi stream per router. Each request is validated
// (layer is a MoE layer, placement version held, shapes and offsets, experts
// held in that version, payload) and answered exactly once with the same
// request_id: y = per token, the sum over its (expert, weight) assignments of
// weight * FFN_expert(x), plus the shared FFN where shared_duty is set. Errors
// are in-band (error_code = grpc::StatusCode, error_message) and the stream
// stays open; nothing is ever answered with zeros for work not done. Chunked
// requests (chunk_count > 1) are computed once all chunks have arrived and
// answered with the same chunk split; an error is one unchunked reply.
// Requests of the same layer queued together (from any streams) share one
// backend Compute call. A full queue answers RESOURCE_EXHAUSTED at once.
//
// Placement versions: the server holds the newest version and at most the one
// before it. LoadSlots(V, S), V >= newest: loads the FFNs of S, then V holds
// newest's slots plus S (the previous newest stays served, older ones are
// dropped). UnloadSlots(V, S), V == newest: removes S from V, drops older
// versions, and unloads the FFNs no version holds any more once the requests
// already queued have been answered. Routers that still name a dropped version
// get FAILED_PRECONDITION "placement version 1 not held (holding 2)".
//
// Also served: grpc.health.v1.Health (SERVING while up, NOT_SERVING while
// draining) and server reflection.
//
// Thread safety: all public methods are thread-safe; Shutdown may be called
// once from any thread (later calls are no-ops) and is called by the
// destructor.
#ifndef DMOE_EXPERT_SERVICE_EXPERT_SERVER_H_
#define DMOE_EXPERT_SERVICE_EXPERT_SERVER_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "core/config.h"
#include "core/kernels/backend_factory.h"
#include "core/kernels/cpu/linear.h"
#include "placement/placement.h"

namespace grpc {
class Channel;
}  // namespace grpc

namespace dmoe::expert {

class ExpertMetrics;

struct ExpertServerOptions {
  std::string model_dir;       // Hugging Face layout: config.json + *.safetensors
  int server_index = 0;        // in [0, placement.num_servers())
  place::Placement placement;  // e.g. place::Placement::Contiguous(cfg, n)
  core::ComputeType compute = core::ComputeType::kBF16;
  // Compute threads (the process's one OpenMP pool); <= 0 = all cores.
  int threads = 0;
  size_t max_queue = 256;            // requests waiting for compute, all streams
  int64_t max_batch_tokens = 8192;   // tokens per backend Compute call
  int max_message_bytes = 64 << 20;  // gRPC receive/send limit per message
  // Told of batches, requests, queue depth, slots, weights and placement
  // version. Not owned; must outlive the server. Null = none.
  ExpertMetrics* metrics = nullptr;
  // Scale-out: start with no routed slots at placement version 0 (only the
  // shared FFNs), ignoring `placement` and `server_index`; a placement
  // controller then gives the server slots (LoadSlots).
  bool start_empty = false;
  // Expert compute backend. kCuda: every visible GPU (Create fails with
  // FailedPrecondition without one, or in a build without CUDA); kAuto: CUDA
  // when this build has it and a GPU is visible, else the CPU.
  // (core::MakeExpertBackend, core/kernels/backend_factory.h.)
  using Backend = core::BackendKind;
  Backend backend = Backend::kCpu;
};

class ExpertServer {
 public:
  // Reads config.json, opens the checkpoint and loads this server's routed
  // experts and every MoE layer's shared FFN (nothing else). Errors:
  // InvalidArgument for a server index outside the placement or a placement
  // that does not fit the model, FailedPrecondition for a model without MoE
  // layers, and the checkpoint's own errors (missing tensor, bad shape), with
  // the model directory named.
  static absl::StatusOr<std::unique_ptr<ExpertServer>> Create(ExpertServerOptions options);
  ~ExpertServer();
  ExpertServer(const ExpertServer&) = delete;
  ExpertServer& operator=(const ExpertServer&) = delete;

  // Listens on host:port (port 0 = any free port; see port()) and serves.
  // Unavailable when the address cannot be bound; FailedPrecondition when
  // already started.
  absl::Status Start(const std::string& host, int port);
  // The bound port after Start, else 0.
  int port() const;
  // A channel to this server that bypasses the network (after Start).
  std::shared_ptr<grpc::Channel> InProcessChannel();

  // Health NOT_SERVING, new streams refused (UNAVAILABLE), requests already
  // received are answered, then every stream ends with UNAVAILABLE "expert
  // server is shutting down"; RPCs still running after `grace` are cancelled.
  // Returns when the server, the compute worker and the control thread stopped.
  void Shutdown(absl::Duration grace);

  // Scale-in: from now on GetStatus reports `leaving`, which asks the
  // placement controller to move this server's slots elsewhere; the server
  // keeps serving meanwhile. Returns true once it holds no routed slot (the
  // controller unloaded them), false after `timeout`.
  bool Leave(absl::Duration timeout);
  // After Leave: why the placement controller refused the leave (the other
  // servers cannot take this server's experts: leaving would leave an expert
  // with no server), "" while it has not. Set by the controller's GetStatus
  // poll (ServerStatusRequest.leave_refused); it stays set. Thread-safe.
  std::string leave_refused() const;

  // Bytes of weights resident in the backend (routed + shared FFNs).
  size_t resident_weight_bytes() const;
  // Routed expert slots of the newest placement version, all layers.
  int64_t num_slots() const;
  uint64_t placement_version() const;
  int server_index() const;
  int num_servers() const;
  const core::ModelConfig& config() const;

  // "dmoe-expert <project version>".
  static std::string BuildVersion();

 private:
  class Impl;
  explicit ExpertServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace dmoe::expert

#endif  // DMOE_EXPERT_SERVICE_EXPERT_SERVER_H_
