// Scale-out for a dmoe-expert started with --join: a background thread asks
// the router's placement controller (RouterService.AddExpertServer) to give
// this server slots, retrying (1 s, doubling to 10 s) while the router is
// unreachable or refuses for a reason that may pass (UNAVAILABLE, deadline,
// FAILED_PRECONDITION e.g. a re-placement in progress). It stops after
// success, ALREADY_EXISTS (the controller already counts this server), a
// final error (INVALID_ARGUMENT ...), or Stop().
//
// Thread safety: construct, then Stop() / destroy from one thread.
#ifndef DMOE_EXPERT_SERVICE_JOINER_H_
#define DMOE_EXPERT_SERVICE_JOINER_H_

#include <string>
#include <thread>

#include "absl/synchronization/notification.h"

namespace dmoe::expert {

class Joiner {
 public:
  // `router`: HOST:PORT of a router running --controller; `advertise`: this
  // server's HOST:PORT as routers reach it.
  Joiner(std::string router, std::string advertise);
  ~Joiner() { Stop(); }
  Joiner(const Joiner&) = delete;
  Joiner& operator=(const Joiner&) = delete;
  void Stop();

 private:
  void Run();
  const std::string router_, advertise_;
  absl::Notification stop_;
  std::thread thread_;
};

}  // namespace dmoe::expert

#endif  // DMOE_EXPERT_SERVICE_JOINER_H_
