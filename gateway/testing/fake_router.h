// Test double of dmoe.v1.RouterService for the gateway's tests: deterministic
// tokens, programmable failures, slowness and reported load, and a record of
// what it saw (requests, cancellations).
//
// Generate answers max_tokens tokens, token i = (sum of the prompt + i) % 1000,
// ending early with "stop" on a token in stop_token_ids, else "length"; the
// first message carries prompt_tokens. Header-only; thread-safe.
#ifndef DMOE_GATEWAY_TESTING_FAKE_ROUTER_H_
#define DMOE_GATEWAY_TESTING_FAKE_ROUTER_H_

#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <numeric>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "dmoe/v1/router.grpc.pb.h"
#include "grpcpp/grpcpp.h"

namespace dmoe::gateway::testing {

class FakeRouter final : public v1::RouterService::Service {
 public:
  // The tokens Generate produces for `prompt`.
  static int32_t Token(const v1::GenerateRequest& r, int i) {
    const int64_t sum =
        std::accumulate(r.prompt_tokens().begin(), r.prompt_tokens().end(), int64_t{0});
    return static_cast<int32_t>((sum + i) % 1000);
  }

  grpc::Status Generate(grpc::ServerContext* context, const v1::GenerateRequest* request,
                        grpc::ServerWriter<v1::GenerateResponse>* writer) override {
    ++generate_calls_;
    {
      absl::MutexLock l(&mu_);
      last_ = *request;
    }
    const int code = fail_code_.load();
    if (code != 0) {
      return grpc::Status(static_cast<grpc::StatusCode>(code),
                          absl::StrCat("fake router failure ", code));
    }
    if (request->prompt_tokens_size() == 0) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "prompt_tokens is empty");
    }
    ++active_;
    const grpc::Status st = Stream(context, *request, writer);
    --active_;
    return st;
  }

  grpc::Status Forward(grpc::ServerContext*, const v1::ForwardRequest* request,
                       v1::ForwardResponse* response) override {
    response->set_rows(1);
    response->set_vocab(static_cast<uint32_t>(request->tokens_size()));
    return grpc::Status::OK;
  }

  grpc::Status GetLoad(grpc::ServerContext*, const v1::RouterLoadRequest*,
                       v1::RouterLoadResponse* response) override {
    ++load_calls_;
    if (load_fails_) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "fake load failure");
    response->set_active_sequences(static_cast<uint32_t>(reported_load_.load()));
    response->set_queued_requests(0);
    response->set_kv_cache_free_bytes(1 << 20);
    return grpc::Status::OK;
  }

  // Knobs.
  void set_fail_code(grpc::StatusCode code) { fail_code_ = static_cast<int>(code); }
  void set_token_delay(absl::Duration d) { token_delay_ms_ = absl::ToInt64Milliseconds(d); }
  void set_reported_load(int load) { reported_load_ = load; }
  void set_load_fails(bool fails) { load_fails_ = fails; }

  // Observations.
  int generate_calls() const { return generate_calls_; }
  int cancellations() const { return cancellations_; }
  int active() const { return active_; }
  absl::Time last_cancel_time() const {
    absl::MutexLock l(&mu_);
    return last_cancel_;
  }
  v1::GenerateRequest last_request() const {
    absl::MutexLock l(&mu_);
    return last_;
  }

 private:
  grpc::Status Stream(grpc::ServerContext* context, const v1::GenerateRequest& r,
                      grpc::ServerWriter<v1::GenerateResponse>* writer) {
    const int n = static_cast<int>(r.max_tokens());
    for (int i = 0; i < n; ++i) {
      // Sleep in small steps so that a cancellation is seen quickly.
      for (int64_t slept = 0; slept < token_delay_ms_; slept += 5) {
        if (context->IsCancelled()) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
      }
      if (context->IsCancelled()) return Cancelled();
      v1::GenerateResponse m;
      m.set_token(Token(r, i));
      m.set_index(static_cast<uint32_t>(i));
      if (i == 0) m.set_prompt_tokens(static_cast<uint32_t>(r.prompt_tokens_size()));
      const bool stop = std::find(r.stop_token_ids().begin(), r.stop_token_ids().end(),
                                  m.token()) != r.stop_token_ids().end();
      if (stop) {
        m.set_finish_reason("stop");
      } else if (i + 1 == n) {
        m.set_finish_reason("length");
      }
      if (!writer->Write(m)) return Cancelled();
      if (stop) break;
    }
    return grpc::Status::OK;
  }

  grpc::Status Cancelled() {
    {
      absl::MutexLock l(&mu_);
      last_cancel_ = absl::Now();
    }
    ++cancellations_;
    return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled");
  }

  std::atomic<int> fail_code_{0};
  std::atomic<int64_t> token_delay_ms_{0};
  std::atomic<int> reported_load_{0};
  std::atomic<bool> load_fails_{false};
  std::atomic<int> generate_calls_{0}, load_calls_{0}, cancellations_{0}, active_{0};
  mutable absl::Mutex mu_;
  v1::GenerateRequest last_ ABSL_GUARDED_BY(mu_);
  absl::Time last_cancel_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
};

// A FakeRouter served on 127.0.0.1:<any port>.
struct FakeRouterServer {
  FakeRouter service;
  std::unique_ptr<grpc::Server> server;
  int port = 0;

  FakeRouterServer() {
    grpc::ServerBuilder b;
    b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    b.RegisterService(&service);
    server = b.BuildAndStart();
  }
  ~FakeRouterServer() { Stop(); }
  void Stop() {
    if (server != nullptr) {
      server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
      server->Wait();
      server.reset();
    }
  }
  std::string address() const { return absl::StrCat("127.0.0.1:", port); }
};

}  // namespace dmoe::gateway::testing

#endif  // DMOE_GATEWAY_TESTING_FAKE_ROUTER_H_
