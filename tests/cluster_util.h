// The disaggregated system as real processes on loopback for multi-process
// tests: a Cluster of dmoe-expert servers and a dmoe-router, and the one-process
// core::Model in f32 ("exact") mode to compare it against.
//
// Cluster owns its child processes (killed with SIGKILL on destruction if still
// running) and is not thread-safe, except Forward, Generate and HttpPost/HttpGet,
// which may be called concurrently once Start (and StartGateway) have returned.
// A dmoe-gateway in front of the router is optional (StartGateway); the tests
// speak HTTP to it with testing/http.h, so that they need no HTTP library.
#ifndef DMOE_TESTS_CLUSTER_UTIL_H_
#define DMOE_TESTS_CLUSTER_UTIL_H_

#include <grpcpp/grpcpp.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "common/grpc_status.h"
#include "core/kv_cache.h"
#include "core/model.h"
#include "core/sampler.h"
#include "dmoe/v1/router.grpc.pb.h"
#include "gtest/gtest.h"
#include "testing/http.h"
#include "testing/subprocess.h"

namespace dmoe::testing {

class Cluster {
 public:
  // Starts `num_servers` expert servers and a router over them.
  bool Start(const std::string& model, int num_servers, const std::string& dir,
             const std::vector<std::string>& router_extra = {},
             const std::string& placement_file = "") {
    model_ = model;
    dir_ = dir;
    placement_ = placement_file;
    experts_.resize(num_servers);
    std::string addrs;
    for (int i = 0; i < num_servers; ++i) {
      if (!StartExpert(i)) return false;
      if (i) addrs += ",";
      addrs += "127.0.0.1:" + std::to_string(ports_[i]);
    }
    std::vector<std::string> argv = {BinDir() + "/dmoe-router",
                                     "--model",
                                     model,
                                     "--experts",
                                     addrs,
                                     "--dtype",
                                     "f32",
                                     "--threads",
                                     "1",
                                     "--port",
                                     "0",
                                     "--port-file",
                                     dir + "/router.port"};
    if (!placement_.empty()) {
      argv.push_back("--placement");
      argv.push_back(placement_);
    }
    argv.insert(argv.end(), router_extra.begin(), router_extra.end());
    if (!router_.Start(argv, dir + "/router.log")) return false;
    router_port_ = WaitForPortFile(dir + "/router.port", router_);
    if (router_port_ == 0) {
      ADD_FAILURE() << "router did not start:\n" << router_.Log();
      return false;
    }
    stub_ = v1::RouterService::NewStub(grpc::CreateChannel(
        "127.0.0.1:" + std::to_string(router_port_), grpc::InsecureChannelCredentials()));
    return true;
  }

  bool StartExpert(int i) {
    const std::string port_file = dir_ + "/expert" + std::to_string(i) + ".port";
    std::remove(port_file.c_str());
    experts_[i] = std::make_unique<ChildProcess>();
    std::vector<std::string> argv = {
        BinDir() + "/dmoe-expert",
        "--model",
        model_,
        "--server-index",
        std::to_string(i),
        "--dtype",
        "f32",
        "--threads",
        "1",
        "--port",
        i < static_cast<int>(ports_.size()) ? std::to_string(ports_[i]) : "0",
        "--port-file",
        port_file};
    if (placement_.empty()) {
      argv.push_back("--num-servers");
      argv.push_back(std::to_string(experts_.size()));
    } else {
      argv.push_back("--placement");
      argv.push_back(placement_);
    }
    argv.insert(argv.end(), expert_extra_.begin(), expert_extra_.end());
    if (!experts_[i]->Start(argv, dir_ + "/expert" + std::to_string(i) + ".log")) return false;
    const int port = WaitForPortFile(port_file, *experts_[i]);
    if (port == 0) {
      ADD_FAILURE() << "expert " << i << " did not start:\n" << experts_[i]->Log();
      return false;
    }
    if (i >= static_cast<int>(ports_.size())) ports_.resize(i + 1);
    ports_[i] = port;
    return true;
  }

  absl::StatusOr<std::vector<float>> Forward(const std::vector<int32_t>& tokens) {
    v1::ForwardRequest req;
    for (int32_t t : tokens) req.add_tokens(t);
    req.set_all_positions(true);
    v1::ForwardResponse resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    grpc::Status st = stub_->Forward(&ctx, req, &resp);
    if (!st.ok()) return common::FromGrpc(st);
    std::vector<float> out(resp.logits().size() / 4);
    std::memcpy(out.data(), resp.logits().data(), out.size() * 4);
    return out;
  }

  absl::StatusOr<std::vector<int32_t>> Generate(const std::vector<int32_t>& prompt,
                                                int max_tokens) {
    v1::GenerateRequest req;
    for (int32_t t : prompt) req.add_prompt_tokens(t);
    req.set_max_tokens(max_tokens);
    req.set_ignore_eos(true);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    auto reader = stub_->Generate(&ctx, req);
    v1::GenerateResponse resp;
    std::vector<int32_t> out;
    while (reader->Read(&resp)) out.push_back(resp.token());
    grpc::Status st = reader->Finish();
    if (!st.ok()) return common::FromGrpc(st);
    return out;
  }

  ChildProcess& expert(int i) { return *experts_[i]; }
  ChildProcess& router() { return router_; }

  // Starts dmoe-gateway in front of the router (after Start), with `extra`
  // flags, and waits until its /health answers 200 (the router was polled).
  bool StartGateway(const std::vector<std::string>& extra = {}) {
    const std::string port_file = dir_ + "/gateway.port";
    std::vector<std::string> argv = {BinDir() + "/dmoe-gateway",
                                     "--routers",
                                     "127.0.0.1:" + std::to_string(router_port_),
                                     "--http-port",
                                     "0",
                                     "--port-file",
                                     port_file,
                                     "--poll-interval-ms",
                                     "50",
                                     "--shutdown-grace-ms",
                                     "2000"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    if (!gateway_.Start(argv, dir_ + "/gateway.log")) return false;
    gateway_port_ = WaitForPortFile(port_file, gateway_);
    if (gateway_port_ == 0) {
      ADD_FAILURE() << "gateway did not start:\n" << gateway_.Log();
      return false;
    }
    const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    HttpResponse health;
    while (std::chrono::steady_clock::now() < end) {
      health = HttpGet("/health");
      if (health.status == 200) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    ADD_FAILURE() << "gateway /health: " << health.status << " " << health.body << "\n"
                  << gateway_.Log();
    return false;
  }

  // HTTP to the gateway (after StartGateway).
  HttpResponse HttpPost(const std::string& path, const std::string& body) {
    return HttpRequest(gateway_port_, "POST", path, body);
  }
  HttpResponse HttpGet(const std::string& path) { return HttpRequest(gateway_port_, "GET", path); }

  ChildProcess& gateway() { return gateway_; }
  int router_port() const { return router_port_; }
  int expert_port(int i) const { return ports_[i]; }
  // Extra flags for every expert server started from now on.
  void set_expert_extra(std::vector<std::string> extra) { expert_extra_ = std::move(extra); }
  int gateway_port() const { return gateway_port_; }

 private:
  std::string model_, dir_, placement_;
  std::vector<std::unique_ptr<ChildProcess>> experts_;
  std::vector<int> ports_;
  std::vector<std::string> expert_extra_;
  ChildProcess router_;
  int router_port_ = 0;
  ChildProcess gateway_;
  int gateway_port_ = 0;
  std::unique_ptr<v1::RouterService::Stub> stub_;
};

inline std::vector<float> LocalLogits(const std::string& model,
                                      const std::vector<int32_t>& tokens) {
  core::ModelOptions o;
  o.compute = core::ComputeType::kF32;
  auto m = core::Model::Load(model, std::move(o));
  EXPECT_TRUE(m.ok()) << m.status();
  core::KvCache cache((*m)->config(), 1 << 24);
  const int32_t s = *cache.Allocate(static_cast<int64_t>(tokens.size()));
  core::SeqInput in{s, tokens, true};
  std::vector<float> logits;
  EXPECT_TRUE((*m)->Forward({&in, 1}, cache, &logits).ok());
  return logits;
}

inline std::vector<int32_t> LocalGreedy(const std::string& model, std::vector<int32_t> seq, int n) {
  core::ModelOptions o;
  o.compute = core::ComputeType::kF32;
  auto m = core::Model::Load(model, std::move(o));
  core::KvCache cache((*m)->config(), 1 << 24);
  const int32_t s = *cache.Allocate(static_cast<int64_t>(seq.size()) + n);
  std::vector<int32_t> out, step = seq;
  std::vector<float> logits;
  for (int i = 0; i < n; ++i) {
    core::SeqInput in{s, step, false};
    EXPECT_TRUE((*m)->Forward({&in, 1}, cache, &logits).ok());
    out.push_back(core::ArgMax(logits));
    step = {out.back()};
  }
  return out;
}

inline double RelL2(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num / den);
}

}  // namespace dmoe::testing

#endif  // DMOE_TESTS_CLUSTER_UTIL_H_
