// One generation on some router: picks the least-loaded router, streams the
// tokens, and fails over before the first token.
//
// When the stream ends with UNAVAILABLE (router down or draining) or
// RESOURCE_EXHAUSTED (router full) before any token arrived, the request is
// re-sent to the next least-loaded healthy router not tried yet; an UNAVAILABLE
// router is also taken out of rotation until its next successful poll. Once a
// token has been delivered the stream is never re-sent (the caller has seen it).
// When no router is left the first error is the one reported, so a lone full
// router still answers RESOURCE_EXHAUSTED.
//
// Thread safety: Next() from one thread at a time; Cancel() from any thread.
#ifndef DMOE_GATEWAY_GENERATION_H_
#define DMOE_GATEWAY_GENERATION_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "dmoe/v1/router.pb.h"
#include "gateway/internal/generate_call.h"
#include "gateway/router_pool.h"

namespace dmoe::gateway {

class Generation {
 public:
  // Starts `request` on the least-loaded healthy router; every attempt has
  // `deadline`. UNAVAILABLE when no router is healthy or the pool is closed.
  static absl::StatusOr<std::unique_ptr<Generation>> Start(RouterPool& pool,
                                                           v1::GenerateRequest request,
                                                           absl::Time deadline);
  ~Generation();  // cancels the upstream call if it is still running

  enum class Event { kToken, kEnd, kTimeout };
  // Waits up to `wait` for the next token (kToken, into *message) or the end
  // (kEnd: *end is OK after the last token, else the error, its message naming
  // the router). After kEnd, Next keeps returning kEnd.
  Event Next(absl::Duration wait, v1::GenerateResponse* message, absl::Status* end);

  // Cancels the upstream call (the router frees the sequence); Next then
  // returns kEnd with CANCELLED.
  void Cancel();

  // The router of the current attempt.
  std::string router() const;
  int attempts() const { return attempts_; }

 private:
  Generation(RouterPool& pool, v1::GenerateRequest request, absl::Time deadline)
      : pool_(pool), request_(std::move(request)), deadline_(deadline) {}
  void StartOn(RouterPool::Lease lease);

  RouterPool& pool_;
  const v1::GenerateRequest request_;
  const absl::Time deadline_;

  // Owned by the thread calling Next (Start, then Next).
  bool got_token_ = false;
  bool ended_ = false;
  absl::Status end_;
  absl::Status first_error_;
  std::vector<int> tried_;
  int attempts_ = 0;

  mutable absl::Mutex mu_;  // guards the swap of call_ against Cancel()/router()
  RouterPool::Lease lease_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<internal::GenerateCall> call_ ABSL_GUARDED_BY(mu_);
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace dmoe::gateway

#endif  // DMOE_GATEWAY_GENERATION_H_
