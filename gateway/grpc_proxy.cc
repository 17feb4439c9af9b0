#include "gateway/grpc_proxy.h"

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"
#include "common/grpc_status.h"
#include "gateway/generation.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"

namespace dmoe::gateway {
namespace {

const char* CodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK:
      return "OK";
    case grpc::StatusCode::CANCELLED:
      return "CANCELLED";
    case grpc::StatusCode::INVALID_ARGUMENT:
      return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND:
      return "NOT_FOUND";
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION:
      return "FAILED_PRECONDITION";
    case grpc::StatusCode::UNIMPLEMENTED:
      return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL:
      return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE:
      return "UNAVAILABLE";
    default:
      return "OTHER";
  }
}

grpc::Status AtCapacity(const InflightLimiter& limiter) {
  return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                      absl::StrCat("gateway at capacity: ", limiter.max(),
                                   " requests in flight (--max-inflight); retry later"));
}

}  // namespace

absl::Time RouterProxyService::Deadline(const grpc::ServerContext& context) const {
  const absl::Time cap = absl::Now() + options_.request_timeout;
  const auto client = context.deadline();
  if (client == std::chrono::system_clock::time_point::max()) return cap;
  return std::min(cap, absl::FromChrono(client));
}

grpc::Status RouterProxyService::Generate(grpc::ServerContext* context,
                                          const v1::GenerateRequest* request,
                                          grpc::ServerWriter<v1::GenerateResponse>* writer) {
  const absl::Time start = absl::Now();
  const grpc::Status st = DoGenerate(context, *request, writer);
  metrics_.RecordGrpc("Generate", CodeName(st.error_code()), absl::Now() - start);
  return st;
}

grpc::Status RouterProxyService::DoGenerate(grpc::ServerContext* context,
                                            const v1::GenerateRequest& request,
                                            grpc::ServerWriter<v1::GenerateResponse>* writer) {
  InflightLimiter::Slot slot = limiter_.TryAcquire();
  if (!slot) return AtCapacity(limiter_);
  const absl::Time start = absl::Now();
  absl::StatusOr<std::unique_ptr<Generation>> gen =
      Generation::Start(pool_, request, Deadline(*context));
  if (!gen.ok()) return common::ToGrpc(gen.status());
  size_t sent = 0;
  for (;;) {
    v1::GenerateResponse m;
    absl::Status end;
    switch ((*gen)->Next(options_.cancel_poll, &m, &end)) {
      case Generation::Event::kTimeout:
        if (context->IsCancelled()) {
          (*gen)->Cancel();
          metrics_.RecordClientDisconnect();
          return grpc::Status(grpc::StatusCode::CANCELLED, "client cancelled");
        }
        continue;
      case Generation::Event::kToken:
        if (sent == 0) {
          metrics_.RecordTimeToFirstToken(absl::Now() - start);
          metrics_.AddPromptTokens(m.prompt_tokens());
        }
        if (!writer->Write(m)) {
          (*gen)->Cancel();
          metrics_.RecordClientDisconnect();
          return grpc::Status(grpc::StatusCode::CANCELLED, "client went away");
        }
        ++sent;
        metrics_.AddGeneratedTokens(1);
        continue;
      case Generation::Event::kEnd:
        return common::ToGrpc(end);
    }
  }
}

grpc::Status RouterProxyService::Forward(grpc::ServerContext* context,
                                         const v1::ForwardRequest* request,
                                         v1::ForwardResponse* response) {
  const absl::Time start = absl::Now();
  const grpc::Status st = DoForward(*context, *request, response);
  metrics_.RecordGrpc("Forward", CodeName(st.error_code()), absl::Now() - start);
  return st;
}

grpc::Status RouterProxyService::DoForward(const grpc::ServerContext& context,
                                           const v1::ForwardRequest& request,
                                           v1::ForwardResponse* response) {
  InflightLimiter::Slot slot = limiter_.TryAcquire();
  if (!slot) return AtCapacity(limiter_);
  absl::StatusOr<RouterPool::Lease> lease = pool_.Pick();
  if (!lease.ok()) return common::ToGrpc(lease.status());
  grpc::ClientContext upstream;
  upstream.set_deadline(absl::ToChronoTime(Deadline(context)));
  if (!pool_.Register(&upstream)) {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, "gateway is shutting down");
  }
  // A synchronous call cannot watch the client; the deadline bounds it.
  grpc::Status st = lease->stub()->Forward(&upstream, request, response);
  pool_.Unregister(&upstream);
  if (st.ok()) return st;
  return grpc::Status(st.error_code(),
                      absl::StrCat("router ", lease->address(), ": ", st.error_message()));
}

grpc::Status RouterProxyService::GetLoad(grpc::ServerContext* context,
                                         const v1::RouterLoadRequest* request,
                                         v1::RouterLoadResponse* response) {
  uint64_t active = 0, queued = 0, kv_free = 0;
  int healthy = 0;
  for (const RouterState& s : pool_.Snapshot()) {
    if (!s.healthy) continue;
    ++healthy;
    active += s.active_sequences;
    queued += s.queued_requests;
    kv_free += s.kv_cache_free_bytes;
  }
  if (healthy == 0) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "no healthy router");
  response->set_active_sequences(static_cast<uint32_t>(std::min<uint64_t>(active, UINT32_MAX)));
  response->set_queued_requests(static_cast<uint32_t>(std::min<uint64_t>(queued, UINT32_MAX)));
  response->set_kv_cache_free_bytes(kv_free);
  return grpc::Status::OK;
}

absl::StatusOr<StartedGrpcServer> StartGatewayGrpcServer(RouterProxyService* service,
                                                         const std::string& host, int port) {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  const bool v6 = host.find(':') != std::string::npos && host.front() != '[';
  const std::string address = absl::StrCat(v6 ? "[" : "", host, v6 ? "]" : "", ":", port);
  StartedGrpcServer out;
  grpc::ServerBuilder builder;
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &out.port);
  builder.RegisterService(service);
  builder.SetMaxReceiveMessageSize(64 << 20);
  builder.SetMaxSendMessageSize(-1);
  out.server = builder.BuildAndStart();
  if (out.server == nullptr || out.port == 0) {
    return absl::UnavailableError(absl::StrCat("gRPC: cannot listen on ", address));
  }
  if (auto* health = out.server->GetHealthCheckService()) {
    health->SetServingStatus(true);
    health->SetServingStatus(v1::RouterService::service_full_name(), true);
  }
  return out;
}

}  // namespace dmoe::gateway
