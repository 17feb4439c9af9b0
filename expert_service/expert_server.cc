#include "expert_service/expert_server.h"

#include <atomic>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "common/grpc_status.h"
#include "core/ffn_loader.h"
#include "core/kernels/backend_factory.h"
#include "core/layers.h"
#include "core/safetensors.h"
#include "core/status.h"
#include "dmoe/v1/expert.grpc.pb.h"
#include "expert_service/expert_metrics.h"
#include "expert_service/internal/compute_worker.h"
#include "expert_service/internal/dispatch_reactor.h"
#include "expert_service/internal/slot_table.h"
#include "expert_service/internal/task_thread.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"

#ifndef DMOE_VERSION
#define DMOE_VERSION "dev"
#endif

namespace dmoe::expert {
namespace {

using internal::LayerExpert;

std::vector<std::pair<int64_t, std::vector<int32_t>>> SlotList(
    const google::protobuf::RepeatedPtrField<v1::LayerSlots>& slots) {
  std::vector<std::pair<int64_t, std::vector<int32_t>>> out;
  for (const auto& ls : slots) {
    out.emplace_back(ls.layer(), std::vector<int32_t>(ls.experts().begin(), ls.experts().end()));
  }
  return out;
}

}  // namespace

class ExpertServer::Impl final : public v1::ExpertService::CallbackService {
 public:
  // Everything but the worker, which Init starts once the weights are loaded.
  ExpertServerOptions options;
  core::ModelConfig cfg;
  std::unique_ptr<core::Checkpoint> ckpt;
  std::unique_ptr<core::ExpertBackend> backend;
  // Serialises backend Compute (worker) with LoadFfn/UnloadFfn (control
  // thread): the ExpertBackend contract does not allow them to race.
  absl::Mutex backend_mu;
  std::unique_ptr<internal::SlotTable> slots;
  std::unique_ptr<internal::ComputeWorker> worker;
  internal::StreamRegistry registry;
  internal::TaskThread control;
  std::atomic<size_t> weight_bytes{0};
  std::atomic<bool> leaving{false};
  mutable absl::Mutex leave_mu;
  std::string leave_refused ABSL_GUARDED_BY(leave_mu);  // the controller's reason

  absl::Mutex server_mu;
  std::unique_ptr<grpc::Server> server ABSL_GUARDED_BY(server_mu);
  int port ABSL_GUARDED_BY(server_mu) = 0;
  bool shut_down ABSL_GUARDED_BY(server_mu) = false;

  absl::Status Init();
  // Loads one FFN of `layer` into the backend: under backend_mu, unless the
  // backend loads concurrently with Compute (then batches keep flowing while
  // a re-placement reads and packs new slots).
  absl::Status LoadFfn(int64_t layer, int32_t expert);
  // Also tells the metrics, with the placement version (both change together).
  void UpdateWeightBytes() {
    {
      absl::MutexLock lock(&backend_mu);
      weight_bytes = backend->WeightBytes();
    }
    if (options.metrics != nullptr) {
      options.metrics->SetResidentWeightBytes(weight_bytes);
      options.metrics->SetPlacementVersion(slots->newest_version());
    }
  }
  absl::Status DoLoadSlots(const v1::LoadSlotsRequest& req, v1::SlotsResponse* resp);
  absl::Status DoUnloadSlots(const v1::UnloadSlotsRequest& req, v1::SlotsResponse* resp);
  void FillStatus(v1::ServerStatusResponse* resp) const;

  // v1::ExpertService::CallbackService
  grpc::ServerBidiReactor<v1::ExpertRequest, v1::ExpertResponse>* Dispatch(
      grpc::CallbackServerContext* ctx) override {
    return new internal::DispatchReactor(*worker, registry);
  }
  grpc::ServerUnaryReactor* GetStatus(grpc::CallbackServerContext* ctx,
                                      const v1::ServerStatusRequest* req,
                                      v1::ServerStatusResponse* resp) override {
    if (!req->leave_refused().empty() && leaving.load()) {
      absl::MutexLock lock(&leave_mu);
      leave_refused = req->leave_refused();
    }
    FillStatus(resp);
    grpc::ServerUnaryReactor* r = ctx->DefaultReactor();
    r->Finish(grpc::Status::OK);
    return r;
  }
  grpc::ServerUnaryReactor* LoadSlots(grpc::CallbackServerContext* ctx,
                                      const v1::LoadSlotsRequest* req,
                                      v1::SlotsResponse* resp) override {
    grpc::ServerUnaryReactor* r = ctx->DefaultReactor();
    control.Post([this, req, resp, r] { r->Finish(common::ToGrpc(DoLoadSlots(*req, resp))); });
    return r;
  }
  grpc::ServerUnaryReactor* UnloadSlots(grpc::CallbackServerContext* ctx,
                                        const v1::UnloadSlotsRequest* req,
                                        v1::SlotsResponse* resp) override {
    grpc::ServerUnaryReactor* r = ctx->DefaultReactor();
    control.Post([this, req, resp, r] { r->Finish(common::ToGrpc(DoUnloadSlots(*req, resp))); });
    return r;
  }
};

absl::Status ExpertServer::Impl::LoadFfn(int64_t layer, int32_t expert) {
  const int64_t inter = expert == core::kSharedFfn
                            ? cfg.n_shared_experts * cfg.moe_intermediate_size
                            : cfg.moe_intermediate_size;
  if (backend->LoadsConcurrently()) {
    return core::LoadFfnInto(*ckpt, core::FfnPrefix(layer, expert), cfg.hidden_size, inter,
                             static_cast<int32_t>(layer), expert, *backend);
  }
  absl::MutexLock lock(&backend_mu);
  return core::LoadFfnInto(*ckpt, core::FfnPrefix(layer, expert), cfg.hidden_size, inter,
                           static_cast<int32_t>(layer), expert, *backend);
}

absl::Status ExpertServer::Impl::Init() {
  const std::string& dir = options.model_dir;
  auto annotate = [&](const absl::Status& s) {
    return absl::Status(s.code(), absl::StrCat("model ", dir, ": ", s.message()));
  };
  auto cfg_or = core::ModelConfig::FromFile(dir + "/config.json");
  if (!cfg_or.ok()) return annotate(cfg_or.status());
  cfg = *std::move(cfg_or);
  if (cfg.n_routed_experts == 0) {
    return annotate(absl::FailedPreconditionError("the model has no MoE layers"));
  }
  const int n = options.placement.num_servers();
  if (n < 1 && !options.start_empty)
    return absl::InvalidArgumentError("placement: no servers (placement not set?)");
  if (!options.start_empty && (options.server_index < 0 || options.server_index >= n)) {
    return absl::InvalidArgumentError(absl::StrCat("server index ", options.server_index,
                                                   " is outside the placement's ", n, " servers"));
  }
  auto ckpt_or = core::Checkpoint::Open(dir);
  if (!ckpt_or.ok()) return annotate(ckpt_or.status());
  ckpt = *std::move(ckpt_or);
  ckpt->set_fp8_block(cfg.fp8_block_rows, cfg.fp8_block_cols);
  if (options.threads > 0) core::SetComputeThreads(options.threads);
  auto made = core::MakeExpertBackend(options.backend, {.compute = options.compute});
  if (!made.ok()) return made.status();
  backend = *std::move(made);

  internal::LayerSlots layer_slots(cfg.num_hidden_layers);
  for (int64_t l = 0; l < cfg.num_hidden_layers && !options.start_empty; ++l) {
    if (cfg.IsMoeLayer(l)) layer_slots[l] = options.placement.Slots(l, options.server_index);
  }
  auto table = internal::SlotTable::Create(cfg, options.server_index,
                                           options.start_empty ? 0 : options.placement.version(),
                                           layer_slots);
  if (!table.ok()) return table.status();
  slots = *std::move(table);

  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    if (!cfg.IsMoeLayer(l)) continue;
    for (int32_t e : layer_slots[l]) {
      absl::Status st = LoadFfn(l, e);
      if (!st.ok()) return annotate(st);
    }
    if (cfg.n_shared_experts > 0) {
      absl::Status st = LoadFfn(l, core::kSharedFfn);
      if (!st.ok()) return annotate(st);
    }
  }
  core::ReleaseLoadBuffers();
  UpdateWeightBytes();
  if (options.metrics != nullptr) {
    for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
      options.metrics->DeclareSlots(static_cast<int32_t>(l), layer_slots[l]);
    }
  }
  internal::ComputeWorkerOptions wo;
  wo.max_queue = options.max_queue;
  wo.max_batch_tokens = options.max_batch_tokens;
  wo.observer = options.metrics;
  worker = std::make_unique<internal::ComputeWorker>(cfg, *backend, backend_mu, *slots, wo);
  return absl::OkStatus();
}

absl::Status ExpertServer::Impl::DoLoadSlots(const v1::LoadSlotsRequest& req,
                                             v1::SlotsResponse* resp) {
  DMOE_ASSIGN_OR_RETURN(std::vector<LayerExpert> add, slots->CheckSlotList(SlotList(req.slots())));
  DMOE_RETURN_IF_ERROR(slots->CheckAddVersion(req.placement_version()));
  // Load what is not resident; on failure, unload what this call loaded (no
  // version refers to it yet, so no request can be using it).
  std::vector<LayerExpert> loaded;
  absl::Status st;
  for (const LayerExpert& le : add) {
    bool resident;
    {
      absl::MutexLock lock(&backend_mu);
      resident = backend->HasFfn(le.layer, le.expert);
    }
    if (resident) continue;
    st = LoadFfn(le.layer, le.expert);
    if (!st.ok()) break;
    loaded.push_back(le);
  }
  core::ReleaseLoadBuffers();
  if (st.ok()) st = slots->AddSlots(req.placement_version(), add);
  if (st.ok() && options.metrics != nullptr) {
    for (const LayerExpert& le : add) {
      options.metrics->DeclareSlots(le.layer, {&le.expert, 1});
    }
  }
  if (!st.ok()) {
    absl::MutexLock lock(&backend_mu);
    for (const LayerExpert& le : loaded) backend->UnloadFfn(le.layer, le.expert).IgnoreError();
  }
  UpdateWeightBytes();
  if (!st.ok()) return st;
  resp->set_placement_version(slots->newest_version());
  resp->set_resident_weight_bytes(weight_bytes);
  return absl::OkStatus();
}

absl::Status ExpertServer::Impl::DoUnloadSlots(const v1::UnloadSlotsRequest& req,
                                               v1::SlotsResponse* resp) {
  DMOE_ASSIGN_OR_RETURN(std::vector<LayerExpert> remove,
                        slots->CheckSlotList(SlotList(req.slots())));
  DMOE_ASSIGN_OR_RETURN(std::vector<LayerExpert> gone,
                        slots->RemoveSlots(req.placement_version(), remove));
  // Requests validated before the table changed may still be computing or
  // queued ahead of this barrier; the FFNs go once they are answered.
  absl::Notification drained;
  worker->RunAfterQueued([&drained] { drained.Notify(); });
  drained.WaitForNotification();
  {
    absl::MutexLock lock(&backend_mu);
    for (const LayerExpert& le : gone) {
      if (!slots->Referenced(le.layer, le.expert)) {
        backend->UnloadFfn(le.layer, le.expert).IgnoreError();
      }
    }
  }
  UpdateWeightBytes();
  resp->set_placement_version(slots->newest_version());
  resp->set_resident_weight_bytes(weight_bytes);
  return absl::OkStatus();
}

void ExpertServer::Impl::FillStatus(v1::ServerStatusResponse* resp) const {
  const internal::SlotTable::Snapshot snap = slots->Get();
  resp->set_placement_version(snap.version);
  resp->set_leaving(leaving.load());
  resp->set_build_version(BuildVersion());
  resp->set_resident_weight_bytes(weight_bytes);
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    if (!cfg.IsMoeLayer(l)) continue;
    v1::LayerSlots* ls = resp->add_slots();
    ls->set_layer(static_cast<uint32_t>(l));
    for (int32_t e : snap.slots[l]) ls->add_experts(e);
  }
  for (uint64_t t : snap.tokens_computed) resp->add_tokens_computed(t);
  resp->set_server_index(options.server_index);
  resp->set_num_servers(options.placement.num_servers());
  resp->set_model(options.model_dir);
}

// ---- ExpertServer
// ------------------------------------------------------------

ExpertServer::ExpertServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

ExpertServer::~ExpertServer() { Shutdown(absl::ZeroDuration()); }

absl::StatusOr<std::unique_ptr<ExpertServer>> ExpertServer::Create(ExpertServerOptions options) {
  auto impl = std::make_unique<Impl>();
  impl->options = std::move(options);
  DMOE_RETURN_IF_ERROR(impl->Init());
  return std::unique_ptr<ExpertServer>(new ExpertServer(std::move(impl)));
}

absl::Status ExpertServer::Start(const std::string& host, int port) {
  absl::MutexLock lock(&impl_->server_mu);
  if (impl_->server != nullptr || impl_->shut_down) {
    return absl::FailedPreconditionError("expert server already started");
  }
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  const std::string addr = host.find(':') != std::string::npos && host.front() != '['
                               ? absl::StrCat("[", host, "]:", port)
                               : absl::StrCat(host, ":", port);
  int bound = 0;
  builder.AddListeningPort(addr, grpc::InsecureServerCredentials(), &bound);
  builder.RegisterService(impl_.get());
  builder.SetMaxReceiveMessageSize(impl_->options.max_message_bytes);
  builder.SetMaxSendMessageSize(impl_->options.max_message_bytes);
  // gRPC sets SO_REUSEPORT by default: a second server on a busy port would
  // silently share it (and its routers' streams) instead of failing.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || bound == 0) {
    if (server != nullptr) server->Shutdown();
    return absl::UnavailableError(absl::StrCat("cannot listen on ", addr));
  }
  if (auto* health = server->GetHealthCheckService(); health != nullptr) {
    health->SetServingStatus(true);
    health->SetServingStatus(v1::ExpertService::service_full_name(), true);
  }
  impl_->server = std::move(server);
  impl_->port = bound;
  return absl::OkStatus();
}

int ExpertServer::port() const {
  absl::MutexLock lock(&impl_->server_mu);
  return impl_->port;
}

std::shared_ptr<grpc::Channel> ExpertServer::InProcessChannel() {
  absl::MutexLock lock(&impl_->server_mu);
  if (impl_->server == nullptr) return nullptr;
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(impl_->options.max_message_bytes);
  args.SetMaxSendMessageSize(impl_->options.max_message_bytes);
  return impl_->server->InProcessChannel(args);
}

void ExpertServer::Shutdown(absl::Duration grace) {
  grpc::Server* server;
  {
    absl::MutexLock lock(&impl_->server_mu);
    if (impl_->shut_down) return;
    impl_->shut_down = true;
    server = impl_->server.get();
  }
  if (server != nullptr) {
    if (auto* health = server->GetHealthCheckService(); health != nullptr) {
      health->SetServingStatus(false);
    }
    // Streams stop taking requests and end once what they hold is answered;
    // that lets Server::Shutdown return without waiting for the deadline.
    impl_->registry.DrainAll();
    server->Shutdown(absl::ToChronoTime(absl::Now() + grace));
    server->Wait();
  }
  impl_->control.Stop();
  impl_->worker->Stop();
  // Reactors refer to the worker and the registry; gRPC may run their OnDone
  // after Server::Wait returns.
  impl_->registry.WaitAllDeleted();
}

bool ExpertServer::Leave(absl::Duration timeout) {
  impl_->leaving = true;
  const absl::Time deadline = absl::Now() + timeout;
  while (impl_->slots->Get().num_slots > 0) {
    if (absl::Now() >= deadline) return false;
    absl::SleepFor(absl::Milliseconds(50));
  }
  return true;
}

std::string ExpertServer::leave_refused() const {
  absl::MutexLock lock(&impl_->leave_mu);
  return impl_->leave_refused;
}

size_t ExpertServer::resident_weight_bytes() const { return impl_->weight_bytes; }
int64_t ExpertServer::num_slots() const { return impl_->slots->Get().num_slots; }
uint64_t ExpertServer::placement_version() const { return impl_->slots->newest_version(); }
int ExpertServer::server_index() const { return impl_->options.server_index; }
int ExpertServer::num_servers() const { return impl_->options.placement.num_servers(); }
const core::ModelConfig& ExpertServer::config() const { return impl_->cfg; }

std::string ExpertServer::BuildVersion() { return absl::StrCat("dmoe-expert ", DMOE_VERSION); }

}  // namespace dmoe::expert
