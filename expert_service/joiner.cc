#include "expert_service/joiner.h"

#include <algorithm>
#include <cstdio>

#include "absl/time/time.h"
#include "dmoe/v1/router.grpc.pb.h"
#include "grpcpp/grpcpp.h"

namespace dmoe::expert {

Joiner::Joiner(std::string router, std::string advertise)
    : router_(std::move(router)), advertise_(std::move(advertise)) {
  thread_ = std::thread([this] { Run(); });
}

void Joiner::Stop() {
  if (!stop_.HasBeenNotified()) stop_.Notify();
  if (thread_.joinable()) thread_.join();
}

void Joiner::Run() {
  auto stub =
      v1::RouterService::NewStub(grpc::CreateChannel(router_, grpc::InsecureChannelCredentials()));
  absl::Duration backoff = absl::Seconds(1);
  for (int attempt = 1; !stop_.HasBeenNotified(); ++attempt) {
    grpc::ClientContext ctx;
    // Loading slots reads weights: allow minutes.
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Minutes(10)));
    v1::ExpertServerRequest req;
    req.set_address(advertise_);
    v1::RebalanceResponse resp;
    const grpc::Status st = stub->AddExpertServer(&ctx, req, &resp);
    if (st.ok()) {
      std::fprintf(stderr,
                   "dmoe-expert: joined via %s as %s: placement version %llu, %llu slots moved "
                   "in the deployment\n",
                   router_.c_str(), advertise_.c_str(),
                   static_cast<unsigned long long>(resp.version()),
                   static_cast<unsigned long long>(resp.slots_moved()));
      return;
    }
    if (st.error_code() == grpc::StatusCode::ALREADY_EXISTS) {
      std::fprintf(stderr, "dmoe-expert: %s already counts this server: %s\n", router_.c_str(),
                   st.error_message().c_str());
      return;
    }
    const bool retry = st.error_code() == grpc::StatusCode::UNAVAILABLE ||
                       st.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED ||
                       st.error_code() == grpc::StatusCode::FAILED_PRECONDITION ||
                       st.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED ||
                       st.error_code() == grpc::StatusCode::UNKNOWN;
    std::fprintf(stderr, "dmoe-expert: joining via %s (attempt %d): %s%s\n", router_.c_str(),
                 attempt, st.error_message().c_str(), retry ? "; retrying" : "; giving up");
    if (!retry) return;
    if (stop_.WaitForNotificationWithTimeout(backoff)) return;
    backoff = std::min(backoff * 2, absl::Seconds(10));
  }
}

}  // namespace dmoe::expert
