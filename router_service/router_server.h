// dmoe.v1.RouterService over gRPC's callback API, in front of a Scheduler.
//
// Generate streams one GenerateResponse per token as the scheduler produces
// them (a ServerWriteReactor with one write in flight; tokens queue in the
// reactor meanwhile). A client that goes away (cancel, deadline, broken stream)
// cancels the sequence in the scheduler, which frees its KV cache at the next
// step. Forward answers when the scheduler has run the prompt; GetLoad answers
// at once. Requests are validated before they are queued: INVALID_ARGUMENT with
// the field named (empty prompt, token id outside the vocabulary, max_tokens
// out of bounds, bad sampling options); RESOURCE_EXHAUSTED when the router is
// overloaded or the request can never fit the KV cache; UNAVAILABLE while
// shutting down; a failed model step (e.g. an expert server down) ends the
// affected streams with the step's status.
//
// Thread safety: the service is thread-safe; the Scheduler must outlive it and
// every call it serves (shut the grpc::Server down before the Scheduler's
// thread stops, or Scheduler::Shutdown first: it ends every request).
#ifndef DMOE_ROUTER_SERVICE_ROUTER_SERVER_H_
#define DMOE_ROUTER_SERVICE_ROUTER_SERVER_H_

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "dmoe/v1/router.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "router_service/controller.h"
#include "router_service/scheduler.h"

namespace dmoe::router {

class RouterServer final : public dmoe::v1::RouterService::CallbackService {
 public:
  // `controller` may be null (its RPCs then answer FAILED_PRECONDITION); it
  // must outlive the service. Re-placements run on their own thread (they
  // load weights); the destructor waits for them.
  explicit RouterServer(Scheduler& scheduler, PlacementController* controller = nullptr)
      : scheduler_(scheduler), controller_(controller) {}
  // How SetPlacement (a controller's push) is applied on this router; unset =
  // FAILED_PRECONDITION. Called on a worker thread; blocks until switched.
  using PlacementSetter = std::function<absl::Status(const dmoe::v1::SetPlacementRequest&)>;
  void set_placement_setter(PlacementSetter f) { setter_ = std::move(f); }
  // Whether the router can serve a token now (ReadinessMonitor::Ready); while
  // it is not OK, GetLoad answers with it (UNAVAILABLE), so that gateways
  // count this router unhealthy. Unset = always ready. Set before serving.
  void set_readiness(std::function<absl::Status()> f) { readiness_ = std::move(f); }
  ~RouterServer() override;

  grpc::ServerWriteReactor<dmoe::v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* context, const dmoe::v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* Forward(grpc::CallbackServerContext* context,
                                    const dmoe::v1::ForwardRequest* request,
                                    dmoe::v1::ForwardResponse* response) override;
  grpc::ServerUnaryReactor* GetLoad(grpc::CallbackServerContext* context,
                                    const dmoe::v1::RouterLoadRequest* request,
                                    dmoe::v1::RouterLoadResponse* response) override;
  grpc::ServerUnaryReactor* GetPlacement(grpc::CallbackServerContext* context,
                                         const dmoe::v1::PlacementRequest* request,
                                         dmoe::v1::PlacementResponse* response) override;
  grpc::ServerUnaryReactor* GetExpertLoad(grpc::CallbackServerContext* context,
                                          const dmoe::v1::ExpertLoadRequest* request,
                                          dmoe::v1::ExpertLoadResponse* response) override;
  grpc::ServerUnaryReactor* Rebalance(grpc::CallbackServerContext* context,
                                      const dmoe::v1::RebalanceRequest* request,
                                      dmoe::v1::RebalanceResponse* response) override;
  grpc::ServerUnaryReactor* AddExpertServer(grpc::CallbackServerContext* context,
                                            const dmoe::v1::ExpertServerRequest* request,
                                            dmoe::v1::RebalanceResponse* response) override;
  grpc::ServerUnaryReactor* RemoveExpertServer(grpc::CallbackServerContext* context,
                                               const dmoe::v1::ExpertServerRequest* request,
                                               dmoe::v1::RebalanceResponse* response) override;
  grpc::ServerUnaryReactor* RegisterRouter(grpc::CallbackServerContext* context,
                                           const dmoe::v1::RegisterRouterRequest* request,
                                           dmoe::v1::PlacementResponse* response) override;
  grpc::ServerUnaryReactor* SetPlacement(grpc::CallbackServerContext* context,
                                         const dmoe::v1::SetPlacementRequest* request,
                                         dmoe::v1::PlacementResponse* response) override;

 private:
  // Runs `op` on a worker thread and finishes the call with its result.
  grpc::ServerUnaryReactor* RunControl(
      grpc::CallbackServerContext* context, dmoe::v1::RebalanceResponse* response,
      std::function<absl::StatusOr<dmoe::v1::RebalanceResponse>()> op);

  Scheduler& scheduler_;
  PlacementController* const controller_;
  PlacementSetter setter_;
  std::function<absl::Status()> readiness_;
  // Starts `fn` on a worker thread; joins the workers that finished.
  void RunOnWorker(std::function<void()> fn);
  struct Worker {
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> done;
  };
  absl::Mutex workers_mu_;
  std::vector<Worker> workers_ ABSL_GUARDED_BY(workers_mu_);
};

// A started gRPC server serving `service`, the standard health service
// (grpc.health.v1, "" and "dmoe.v1.RouterService" SERVING; dmoe-router then
// makes "dmoe.v1.RouterService" its readiness, see readiness.h) and server
// reflection, listening on host:port (port 0 = any free port; the bound port
// is returned). `service` must outlive the server. UNAVAILABLE when the address
// cannot be bound.
struct StartedServer {
  std::unique_ptr<grpc::Server> server;
  int port = 0;
};
absl::StatusOr<StartedServer> StartRouterGrpcServer(RouterServer* service, const std::string& host,
                                                    int port);

}  // namespace dmoe::router

#endif  // DMOE_ROUTER_SERVICE_ROUTER_SERVER_H_
