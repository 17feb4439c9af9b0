#include "router_service/router_server.h"

#include <bit>
#include <cstring>
#include <deque>
#include <utility>

#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/grpc_status.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"

namespace dmoe::router {
namespace {

static_assert(std::endian::native == std::endian::little,
              "ForwardResponse.logits is little-endian f32; this build copies "
              "floats as is");

// Logits travel in one message; protobuf refuses fields of 2 GiB and more.
constexpr int64_t kMaxLogitBytes = (int64_t{1} << 31) - (int64_t{1} << 20);

// A seed for a request that brings none: unseeded sampling is random, as
// OpenAI's (and as the gateway does for HTTP requests).
uint64_t RandomSeed() {
  thread_local absl::BitGen gen;
  return absl::Uniform<uint64_t>(gen);
}

GenerateParams ToParams(const v1::GenerateRequest& req) {
  GenerateParams p;
  p.prompt.assign(req.prompt_tokens().begin(), req.prompt_tokens().end());
  p.max_tokens = req.max_tokens();
  const v1::SamplingOptions& s = req.sampling();
  p.sampling.temperature = s.temperature();
  p.sampling.top_k = s.top_k();
  // The proto's documented "0 or 1 = no nucleus restriction".
  p.sampling.top_p = s.top_p() == 0.0f ? 1.0 : static_cast<double>(s.top_p());
  p.sampling.seed = s.has_seed() ? s.seed() : RandomSeed();
  p.stop_token_ids.assign(req.stop_token_ids().begin(), req.stop_token_ids().end());
  p.ignore_eos = req.ignore_eos();
  p.request_id = req.request_id();
  return p;
}

// One Generate stream. Tokens arrive on the scheduler thread and queue in
// pending_; one write is in flight at a time. Finish is called once the
// scheduler has made its terminal callback (so no callback can reach a deleted
// reactor) and the last write has completed.
class GenerateReactor final : public grpc::ServerWriteReactor<v1::GenerateResponse> {
 public:
  GenerateReactor(Scheduler& scheduler, const v1::GenerateRequest& request)
      : scheduler_(scheduler), prompt_tokens_(request.prompt_tokens_size()) {
    GenerateCallbacks cb;
    cb.on_token = [this](const TokenEvent& ev) { OnToken(ev); };
    cb.on_done = [this](const absl::Status& st) { OnSchedulerDone(st); };
    absl::StatusOr<RequestId> id = scheduler_.SubmitGenerate(ToParams(request), std::move(cb));
    if (!id.ok()) {
      Finish(common::ToGrpc(id.status()));
      return;
    }
    absl::MutexLock l(&mu_);
    id_ = *id;
  }

  void OnWriteDone(bool ok) override {
    bool cancel = false, start = false, finish = false;
    grpc::Status final_status;
    {
      absl::MutexLock l(&mu_);
      writing_ = false;
      if (!ok && !broken_) {
        // The client is gone: stop generating for it.
        broken_ = true;
        cancel = true;
      }
      if (broken_) pending_.clear();
      if (!pending_.empty()) {
        start = true;
        StageNextLocked();
      } else if (scheduler_done_ && !finish_called_) {
        finish = true;
        finish_called_ = true;
        final_status = final_status_;
      }
    }
    if (cancel) scheduler_.Cancel(Id());
    if (start) StartWrite(&current_);
    if (finish) Finish(final_status);
  }

  void OnCancel() override {
    {
      absl::MutexLock l(&mu_);
      broken_ = true;
      pending_.clear();
    }
    scheduler_.Cancel(Id());
  }

  void OnDone() override { delete this; }

 private:
  RequestId Id() {
    absl::MutexLock l(&mu_);
    return id_;
  }

  // Scheduler thread.
  void OnToken(const TokenEvent& ev) {
    v1::GenerateResponse msg;
    msg.set_token(ev.token);
    msg.set_index(static_cast<uint32_t>(ev.index));
    if (!ev.finish_reason.empty()) {
      msg.set_finish_reason(std::string(ev.finish_reason.data(), ev.finish_reason.size()));
    }
    if (ev.index == 0) msg.set_prompt_tokens(static_cast<uint32_t>(prompt_tokens_));
    bool start = false;
    {
      absl::MutexLock l(&mu_);
      if (broken_) return;
      pending_.push_back(std::move(msg));
      if (!writing_) {
        start = true;
        StageNextLocked();
      }
    }
    if (start) StartWrite(&current_);
  }

  // Scheduler thread; the last callback for this request.
  void OnSchedulerDone(const absl::Status& st) {
    bool finish = false;
    grpc::Status final_status;
    {
      absl::MutexLock l(&mu_);
      scheduler_done_ = true;
      final_status_ = broken_ && st.ok() ? grpc::Status(grpc::StatusCode::CANCELLED, "cancelled")
                                         : common::ToGrpc(st);
      if (!writing_ && !finish_called_) {
        finish = true;
        finish_called_ = true;
        final_status = final_status_;
      }
    }
    if (finish) Finish(final_status);
  }

  void StageNextLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    current_ = std::move(pending_.front());
    pending_.pop_front();
    writing_ = true;
  }

  Scheduler& scheduler_;
  const int prompt_tokens_;

  absl::Mutex mu_;
  RequestId id_ ABSL_GUARDED_BY(mu_) = 0;  // 0 = never submitted
  std::deque<v1::GenerateResponse> pending_ ABSL_GUARDED_BY(mu_);
  v1::GenerateResponse current_;  // the write in flight; touched only by its owner (writing_)
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool broken_ ABSL_GUARDED_BY(mu_) = false;  // cancelled or a write failed
  bool scheduler_done_ ABSL_GUARDED_BY(mu_) = false;
  bool finish_called_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status final_status_ ABSL_GUARDED_BY(mu_);
};

// One Forward call; finishes when the scheduler delivers the logits.
class ForwardReactor final : public grpc::ServerUnaryReactor {
 public:
  ForwardReactor(Scheduler& scheduler, const v1::ForwardRequest& request,
                 v1::ForwardResponse* response)
      : scheduler_(scheduler), response_(response) {
    const int64_t rows = request.all_positions() ? request.tokens_size() : 1;
    const int64_t bytes =
        rows * scheduler_.config().vocab_size * static_cast<int64_t>(sizeof(float));
    if (bytes > kMaxLogitBytes) {
      Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          absl::StrCat("all_positions logits of ", rows, " tokens x ",
                                       scheduler_.config().vocab_size, " vocab would be ", bytes,
                                       " bytes, over the ", kMaxLogitBytes,
                                       "-byte message limit; send fewer tokens")));
      return;
    }
    std::vector<int32_t> tokens(request.tokens().begin(), request.tokens().end());
    absl::StatusOr<RequestId> id = scheduler_.SubmitForward(
        std::move(tokens), request.all_positions(),
        [this](absl::StatusOr<ForwardResult> r) { OnResult(std::move(r)); });
    if (!id.ok()) {
      Finish(common::ToGrpc(id.status()));
      return;
    }
    absl::MutexLock l(&mu_);
    id_ = *id;
  }

  void OnCancel() override {
    RequestId id;
    {
      absl::MutexLock l(&mu_);
      id = id_;
    }
    scheduler_.Cancel(id);
  }
  void OnDone() override { delete this; }

 private:
  // Scheduler thread.
  void OnResult(absl::StatusOr<ForwardResult> r) {
    if (!r.ok()) {
      Finish(common::ToGrpc(r.status()));
      return;
    }
    response_->set_rows(static_cast<uint32_t>(r->rows));
    response_->set_vocab(static_cast<uint32_t>(r->vocab));
    std::string* bytes = response_->mutable_logits();
    bytes->resize(r->logits.size() * sizeof(float));
    std::memcpy(bytes->data(), r->logits.data(), bytes->size());
    Finish(grpc::Status::OK);
  }

  Scheduler& scheduler_;
  v1::ForwardResponse* const response_;
  absl::Mutex mu_;
  RequestId id_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace

grpc::ServerWriteReactor<v1::GenerateResponse>* RouterServer::Generate(
    grpc::CallbackServerContext* context, const v1::GenerateRequest* request) {
  return new GenerateReactor(scheduler_, *request);
}

grpc::ServerUnaryReactor* RouterServer::Forward(grpc::CallbackServerContext* context,
                                                const v1::ForwardRequest* request,
                                                v1::ForwardResponse* response) {
  return new ForwardReactor(scheduler_, *request, response);
}

grpc::ServerUnaryReactor* RouterServer::GetLoad(grpc::CallbackServerContext* context,
                                                const v1::RouterLoadRequest* request,
                                                v1::RouterLoadResponse* response) {
  if (readiness_) {
    if (absl::Status ready = readiness_(); !ready.ok()) {
      grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
      reactor->Finish(common::ToGrpc(ready));
      return reactor;
    }
  }
  const SchedulerLoad load = scheduler_.GetLoad();
  response->set_active_sequences(static_cast<uint32_t>(load.active_sequences));
  response->set_queued_requests(static_cast<uint32_t>(load.queued_requests));
  response->set_kv_cache_free_bytes(load.kv_cache_free_bytes);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

namespace {

grpc::Status NoController() {
  return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                      "this router runs no placement controller (start it with --controller)");
}

}  // namespace

RouterServer::~RouterServer() {
  absl::MutexLock lock(&workers_mu_);
  for (Worker& w : workers_) w.thread.join();
}

void RouterServer::RunOnWorker(std::function<void()> fn) {
  absl::MutexLock lock(&workers_mu_);
  std::erase_if(workers_, [](Worker& w) {
    if (!w.done->load()) return false;
    w.thread.join();
    return true;
  });
  auto done = std::make_shared<std::atomic<bool>>(false);
  workers_.push_back({std::thread([fn = std::move(fn), done] {
                        fn();
                        done->store(true);
                      }),
                      done});
}

grpc::ServerUnaryReactor* RouterServer::GetPlacement(grpc::CallbackServerContext* context,
                                                     const v1::PlacementRequest* /*request*/,
                                                     v1::PlacementResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (controller_ == nullptr) {
    reactor->Finish(NoController());
    return reactor;
  }
  *response = controller_->GetPlacement();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* RouterServer::GetExpertLoad(grpc::CallbackServerContext* context,
                                                      const v1::ExpertLoadRequest* /*request*/,
                                                      v1::ExpertLoadResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (controller_ == nullptr) {
    reactor->Finish(NoController());
    return reactor;
  }
  *response = controller_->GetExpertLoad();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* RouterServer::RunControl(
    grpc::CallbackServerContext* context, v1::RebalanceResponse* response,
    std::function<absl::StatusOr<v1::RebalanceResponse>()> op) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (controller_ == nullptr) {
    reactor->Finish(NoController());
    return reactor;
  }
  RunOnWorker([reactor, response, op = std::move(op)] {
    absl::StatusOr<v1::RebalanceResponse> r = op();
    if (r.ok()) {
      *response = *std::move(r);
      reactor->Finish(grpc::Status::OK);
    } else {
      reactor->Finish(common::ToGrpc(r.status()));
    }
  });
  return reactor;
}

grpc::ServerUnaryReactor* RouterServer::Rebalance(grpc::CallbackServerContext* context,
                                                  const v1::RebalanceRequest* request,
                                                  v1::RebalanceResponse* response) {
  const bool dry_run = request->dry_run();
  return RunControl(context, response,
                    [this, dry_run] { return controller_->Rebalance(dry_run, "operator"); });
}

grpc::ServerUnaryReactor* RouterServer::AddExpertServer(grpc::CallbackServerContext* context,
                                                        const v1::ExpertServerRequest* request,
                                                        v1::RebalanceResponse* response) {
  const std::string address = request->address();
  return RunControl(context, response, [this, address] { return controller_->AddServer(address); });
}

grpc::ServerUnaryReactor* RouterServer::RemoveExpertServer(grpc::CallbackServerContext* context,
                                                           const v1::ExpertServerRequest* request,
                                                           v1::RebalanceResponse* response) {
  const std::string address = request->address();
  return RunControl(context, response,
                    [this, address] { return controller_->RemoveServer(address, "operator"); });
}

grpc::ServerUnaryReactor* RouterServer::RegisterRouter(grpc::CallbackServerContext* context,
                                                       const v1::RegisterRouterRequest* request,
                                                       v1::PlacementResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (controller_ == nullptr) {
    reactor->Finish(NoController());
    return reactor;
  }
  if (request->address().find(':') == std::string::npos) {
    reactor->Finish(
        grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                     "register router: address '" + request->address() + "' is not HOST:PORT"));
    return reactor;
  }
  *response = controller_->RegisterRouter(request->address());
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* RouterServer::SetPlacement(grpc::CallbackServerContext* context,
                                                     const v1::SetPlacementRequest* request,
                                                     v1::PlacementResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (!setter_) {
    reactor->Finish(grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                                 "this router does not follow a controller "
                                 "(start it with --controller-router)"));
    return reactor;
  }
  RunOnWorker([this, reactor, request, response] {
    absl::Status st = setter_(*request);
    response->set_version(request->version());
    reactor->Finish(common::ToGrpc(st));
  });
  return reactor;
}

absl::StatusOr<StartedServer> StartRouterGrpcServer(RouterServer* service, const std::string& host,
                                                    int port) {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  const bool v6 = host.find(':') != std::string::npos && host.front() != '[';
  const std::string address = absl::StrCat(v6 ? "[" : "", host, v6 ? "]" : "", ":", port);
  StartedServer out;
  grpc::ServerBuilder builder;
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &out.port);
  builder.RegisterService(service);
  // Long prompts are small; Forward replies with all logits can be large.
  builder.SetMaxReceiveMessageSize(64 << 20);
  builder.SetMaxSendMessageSize(-1);
  out.server = builder.BuildAndStart();
  if (out.server == nullptr || out.port == 0) {
    return absl::UnavailableError(absl::StrCat("could not listen on ", address));
  }
  if (auto* health = out.server->GetHealthCheckService()) {
    health->SetServingStatus(true);
    health->SetServingStatus(v1::RouterService::service_full_name(), true);
  }
  return out;
}

}  // namespace dmoe::router
