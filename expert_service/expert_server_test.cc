// ExpertServer over real gRPC (loopback TCP, port 0) against a local CPU
// backend holding every expert, plus the real dmoe-expert binary.
#include "expert_service/expert_server.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "common/wire.h"
#include "core/config.h"
#include "core/expert_backend.h"
#include "core/ffn_loader.h"
#include "core/safetensors.h"
#include "dmoe/v1/expert.grpc.pb.h"
#include "gmock/gmock.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "placement/placement.h"
#include "testing/files.h"
#include "testing/subprocess.h"
#include "tests/test_util.h"

namespace dmoe::expert {
namespace {

using testing::BinDir;
using testing::ChildProcess;
using ::testing::HasSubstr;
using testing::ReadFile;

// One (layer, micro-batch) of work as a router would send it to one server.
struct Work {
  int32_t layer = 0;
  int64_t tokens = 0;
  std::vector<float> x;          // [tokens, hidden]
  std::vector<int32_t> offsets;  // [tokens + 1]
  std::vector<int32_t> experts;  // [assignments]
  std::vector<float> weights;    // [assignments]
  std::vector<bool> duty;        // [tokens] or empty
};

// Tokens with 1..3 distinct experts drawn from `held`, random weights and, with
// `with_duty`, random shared duty.
Work RandomWork(int32_t layer, int64_t tokens, int64_t hidden, const std::vector<int32_t>& held,
                uint32_t seed, bool with_duty) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> unit(0.05f, 1.0f);
  Work w;
  w.layer = layer;
  w.tokens = tokens;
  w.x.resize(tokens * hidden);
  for (float& v : w.x) v = normal(rng);
  w.offsets.push_back(0);
  for (int64_t t = 0; t < tokens; ++t) {
    std::vector<int32_t> pool = held;
    std::shuffle(pool.begin(), pool.end(), rng);
    const int k = 1 + static_cast<int>(rng() % 3);
    for (int i = 0; i < k && i < static_cast<int>(pool.size()); ++i) {
      w.experts.push_back(pool[i]);
      w.weights.push_back(unit(rng));
    }
    w.offsets.push_back(static_cast<int32_t>(w.experts.size()));
    if (with_duty) w.duty.push_back(rng() % 2 == 0);
  }
  return w;
}

// Rows [row0, row0 + rows) of `w` as one request (or chunk).
v1::ExpertRequest ToRequest(const Work& w, int64_t hidden, uint64_t id, uint64_t version,
                            common::WireDType dtype = common::WireDType::kF32, int64_t row0 = 0,
                            int64_t rows = -1) {
  if (rows < 0) rows = w.tokens;
  v1::ExpertRequest r;
  r.set_request_id(id);
  r.set_layer(w.layer);
  r.set_placement_version(version);
  auto* x = r.mutable_x();
  x->set_dtype(dtype == common::WireDType::kF32 ? v1::ACTIVATION_DTYPE_F32
                                                : v1::ACTIVATION_DTYPE_BF16);
  x->set_rows(rows);
  x->set_cols(hidden);
  common::PackActivations(w.x.data() + row0 * hidden, rows, hidden, 0, dtype, x->mutable_data(),
                          x->mutable_row_scales());
  const int32_t base = w.offsets[row0];
  for (int64_t t = row0; t <= row0 + rows; ++t) r.add_token_offsets(w.offsets[t] - base);
  for (int32_t a = base; a < w.offsets[row0 + rows]; ++a) {
    r.add_expert_ids(w.experts[a]);
    r.add_weights(w.weights[a]);
  }
  if (!w.duty.empty()) {
    for (int64_t t = row0; t < row0 + rows; ++t) r.add_shared_duty(w.duty[t]);
  }
  return r;
}

std::vector<float> FromReply(const v1::ExpertResponse& r) {
  EXPECT_EQ(r.error_code(), 0) << r.error_message();
  std::vector<float> y(static_cast<size_t>(r.y().rows()) * r.y().cols());
  const common::WireDType t = r.y().dtype() == v1::ACTIVATION_DTYPE_F32 ? common::WireDType::kF32
                                                                        : common::WireDType::kBF16;
  absl::Status st = common::UnpackActivations(t, r.y().data(), r.y().row_scales(), r.y().rows(),
                                              r.y().cols(), y.data());
  EXPECT_TRUE(st.ok()) << st;
  return y;
}

// max |a - b| / max(1, |b|)
double MaxRelError(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double m = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
    m = std::max(m, std::fabs(double(a[i]) - b[i]) / std::max(1.0, std::fabs(double(b[i]))));
  }
  return m;
}

class ExpertServerTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    dir_ = testing::MakeModel(GetParam(), 7, tools::WeightFormat::kF32);
    auto cfg = core::ModelConfig::FromFile(dir_ + "/config.json");
    ASSERT_TRUE(cfg.ok()) << cfg.status();
    cfg_ = *cfg;
    hidden_ = cfg_.hidden_size;
    // The reference: every expert and the shared FFN of every MoE layer,
    // in-process.
    ref_ = core::MakeCpuExpertBackend(core::ComputeType::kF32);
    auto ckpt = core::Checkpoint::Open(dir_);
    ASSERT_TRUE(ckpt.ok()) << ckpt.status();
    for (int64_t l = 0; l < cfg_.num_hidden_layers; ++l) {
      if (!cfg_.IsMoeLayer(l)) continue;
      moe_layers_.push_back(static_cast<int32_t>(l));
      for (int32_t e = 0; e < cfg_.n_routed_experts; ++e) {
        ASSERT_TRUE(core::LoadFfnInto(**ckpt, core::FfnPrefix(l, e), hidden_,
                                      cfg_.moe_intermediate_size, l, e, *ref_)
                        .ok());
      }
      ASSERT_TRUE(core::LoadFfnInto(**ckpt, core::FfnPrefix(l, core::kSharedFfn), hidden_,
                                    cfg_.n_shared_experts * cfg_.moe_intermediate_size, l,
                                    core::kSharedFfn, *ref_)
                      .ok());
    }
    ASSERT_GE(moe_layers_.size(), 2u);
    auto placement = place::Placement::Contiguous(cfg_, 2);
    ASSERT_TRUE(placement.ok()) << placement.status();
    placement_ = *placement;
    held_ = placement_.Slots(moe_layers_[0], 1);  // experts E/2..E-1
    ASSERT_FALSE(held_.empty());
  }

  void StartServer(size_t max_queue = 256) {
    ExpertServerOptions o;
    o.model_dir = dir_;
    o.server_index = 1;
    o.placement = placement_;
    o.compute = core::ComputeType::kF32;
    o.max_queue = max_queue;
    auto s = ExpertServer::Create(o);
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = *std::move(s);
    ASSERT_TRUE(server_->Start("127.0.0.1", 0).ok());
    ASSERT_GT(server_->port(), 0);
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(64 << 20);
    channel_ = grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", server_->port()),
                                         grpc::InsecureChannelCredentials(), args);
    stub_ = v1::ExpertService::NewStub(channel_);
  }

  std::vector<float> Reference(const Work& w) {
    std::vector<int32_t> offsets{0}, ids;
    std::vector<float> weights;
    for (int64_t t = 0; t < w.tokens; ++t) {
      for (int32_t a = w.offsets[t]; a < w.offsets[t + 1]; ++a) {
        ids.push_back(w.experts[a]);
        weights.push_back(w.weights[a]);
      }
      if (!w.duty.empty() && w.duty[t]) {
        ids.push_back(core::kSharedFfn);
        weights.push_back(1.0f);
      }
      offsets.push_back(static_cast<int32_t>(ids.size()));
    }
    core::ExpertBatch b;
    b.layer = w.layer;
    b.num_tokens = w.tokens;
    b.hidden = hidden_;
    b.x = w.x.data();
    b.token_offsets = offsets;
    b.ffn_ids = ids;
    b.weights = weights;
    std::vector<float> out(w.tokens * hidden_);
    absl::Status st = ref_->Compute(b, out.data());
    EXPECT_TRUE(st.ok()) << st;
    return out;
  }

  // Sends `reqs` on one stream and returns the replies by request id.
  std::map<uint64_t, std::vector<v1::ExpertResponse>> RoundTrip(
      const std::vector<v1::ExpertRequest>& reqs, size_t expected_replies = 0) {
    if (expected_replies == 0) expected_replies = reqs.size();
    grpc::ClientContext ctx;
    auto stream = stub_->Dispatch(&ctx);
    for (const auto& r : reqs) EXPECT_TRUE(stream->Write(r));
    std::map<uint64_t, std::vector<v1::ExpertResponse>> out;
    v1::ExpertResponse resp;
    for (size_t i = 0; i < expected_replies && stream->Read(&resp); ++i) {
      out[resp.request_id()].push_back(resp);
    }
    stream->WritesDone();
    grpc::Status st = stream->Finish();
    EXPECT_TRUE(st.ok()) << st.error_message();
    return out;
  }

  v1::ExpertResponse One(const v1::ExpertRequest& r) {
    auto replies = RoundTrip({r});
    EXPECT_EQ(replies[r.request_id()].size(), 1u);
    return replies[r.request_id()].empty() ? v1::ExpertResponse() : replies[r.request_id()][0];
  }

  std::string dir_;
  core::ModelConfig cfg_;
  int64_t hidden_ = 0;
  std::unique_ptr<core::ExpertBackend> ref_;
  std::vector<int32_t> moe_layers_;
  place::Placement placement_;
  std::vector<int32_t> held_;
  std::unique_ptr<ExpertServer> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::ExpertService::Stub> stub_;
};

TEST_P(ExpertServerTest, Dispatch_F32MatchesLocalBackend) {
  StartServer();
  std::vector<Work> works;
  std::vector<v1::ExpertRequest> reqs;
  uint64_t id = 100;
  for (int32_t layer : moe_layers_) {
    for (int64_t tokens : {1, 7, 33}) {
      works.push_back(RandomWork(layer, tokens, hidden_, held_, 11 * tokens + layer,
                                 /*with_duty=*/tokens != 7));
      reqs.push_back(ToRequest(works.back(), hidden_, id++, 1));
    }
  }
  auto replies = RoundTrip(reqs);
  for (size_t i = 0; i < works.size(); ++i) {
    ASSERT_EQ(replies[reqs[i].request_id()].size(), 1u);
    const auto& r = replies[reqs[i].request_id()][0];
    EXPECT_EQ(r.y().dtype(), v1::ACTIVATION_DTYPE_F32);
    EXPECT_EQ(r.y().rows(), works[i].tokens);
    EXPECT_EQ(r.y().cols(), hidden_);
    EXPECT_LE(MaxRelError(FromReply(r), Reference(works[i])), 1e-6) << "request " << i;
  }
}

TEST_P(ExpertServerTest, Dispatch_SharedDutyOnlyTokensGetTheSharedFfn) {
  StartServer();
  Work w = RandomWork(moe_layers_[0], 4, hidden_, held_, 3, false);
  // Token 2: no routed expert here, shared duty only; token 3: nothing at all.
  w.experts.resize(w.offsets[2]);
  w.weights.resize(w.offsets[2]);
  w.offsets[3] = w.offsets[2];
  w.offsets[4] = w.offsets[2];
  w.duty = {false, true, true, false};
  const std::vector<float> y = FromReply(One(ToRequest(w, hidden_, 1, 1)));
  EXPECT_LE(MaxRelError(y, Reference(w)), 1e-6);
  for (int64_t c = 0; c < hidden_; ++c) EXPECT_EQ(y[3 * hidden_ + c], 0.0f);
  EXPECT_NE(y[2 * hidden_], 0.0f);
}

TEST_P(ExpertServerTest, Dispatch_TwoRoutersConcurrently) {
  StartServer();
  constexpr int kPerRouter = 24;
  std::vector<std::vector<Work>> works(2);
  std::vector<std::vector<v1::ExpertRequest>> reqs(2);
  for (int router = 0; router < 2; ++router) {
    for (int i = 0; i < kPerRouter; ++i) {
      const int32_t layer = moe_layers_[i % moe_layers_.size()];
      works[router].push_back(
          RandomWork(layer, 1 + (i * 5) % 17, hidden_, held_, 1000 * router + i, i % 3 == 0));
      reqs[router].push_back(ToRequest(works[router].back(), hidden_, 1000 * router + i, 1));
    }
  }
  std::vector<std::map<uint64_t, std::vector<v1::ExpertResponse>>> replies(2);
  std::vector<std::thread> threads;
  for (int router = 0; router < 2; ++router) {
    threads.emplace_back([&, router] { replies[router] = RoundTrip(reqs[router]); });
  }
  for (auto& t : threads) t.join();
  int64_t assignments = 0;
  for (int router = 0; router < 2; ++router) {
    ASSERT_EQ(replies[router].size(), static_cast<size_t>(kPerRouter));
    for (int i = 0; i < kPerRouter; ++i) {
      const auto& rs = replies[router][reqs[router][i].request_id()];
      ASSERT_EQ(rs.size(), 1u);
      EXPECT_LE(MaxRelError(FromReply(rs[0]), Reference(works[router][i])), 1e-6);
      assignments += works[router][i].experts.size();
    }
  }
  // Every routed assignment was counted once, whatever the batching.
  grpc::ClientContext ctx;
  v1::ServerStatusResponse status;
  ASSERT_TRUE(stub_->GetStatus(&ctx, v1::ServerStatusRequest(), &status).ok());
  int64_t counted = 0;
  for (uint64_t t : status.tokens_computed()) counted += t;
  EXPECT_EQ(counted, assignments);
}

TEST_P(ExpertServerTest, Dispatch_ChunkedRequestRepliedWithTheSameSplit) {
  StartServer();
  Work w = RandomWork(moe_layers_[1], 10, hidden_, held_, 5, true);
  std::vector<v1::ExpertRequest> chunks;
  const int64_t split[][2] = {{0, 4}, {4, 3}, {7, 3}};
  for (int i = 0; i < 3; ++i) {
    chunks.push_back(
        ToRequest(w, hidden_, 42, 1, common::WireDType::kF32, split[i][0], split[i][1]));
    chunks.back().set_chunk_index(i);
    chunks.back().set_chunk_count(3);
  }
  auto replies = RoundTrip(chunks);
  ASSERT_EQ(replies[42].size(), 3u);
  std::vector<float> y;
  for (int i = 0; i < 3; ++i) {
    const auto& r = replies[42][i];
    EXPECT_EQ(r.chunk_index(), static_cast<uint32_t>(i));
    EXPECT_EQ(r.chunk_count(), 3u);
    EXPECT_EQ(r.y().rows(), split[i][1]);
    const auto part = FromReply(r);
    y.insert(y.end(), part.begin(), part.end());
  }
  EXPECT_LE(MaxRelError(y, Reference(w)), 1e-6);
}

TEST_P(ExpertServerTest, Dispatch_Bf16WireAndF32Reply) {
  StartServer();
  Work w = RandomWork(moe_layers_[0], 9, hidden_, held_, 8, true);
  v1::ExpertRequest bf16 = ToRequest(w, hidden_, 1, 1, common::WireDType::kBF16);
  v1::ExpertRequest f32_reply = bf16;
  f32_reply.set_request_id(2);
  f32_reply.set_reply_dtype(v1::ACTIVATION_DTYPE_F32);
  auto replies = RoundTrip({bf16, f32_reply});
  ASSERT_EQ(replies[1].size(), 1u);
  ASSERT_EQ(replies[2].size(), 1u);
  EXPECT_EQ(replies[1][0].y().dtype(), v1::ACTIVATION_DTYPE_BF16);
  EXPECT_EQ(replies[1][0].y().data().size(), w.tokens * hidden_ * 2u);
  EXPECT_EQ(replies[2][0].y().dtype(), v1::ACTIVATION_DTYPE_F32);
  // The server computed on bf16-rounded inputs: so does the reference.
  Work rounded = w;
  std::vector<float> tmp(w.x.size());
  std::string data, scales;
  common::PackActivations(w.x.data(), w.tokens, hidden_, 0, common::WireDType::kBF16, &data,
                          &scales);
  ASSERT_TRUE(common::UnpackActivations(common::WireDType::kBF16, data, scales, w.tokens, hidden_,
                                        rounded.x.data())
                  .ok());
  const std::vector<float> ref = Reference(rounded);
  EXPECT_LE(MaxRelError(FromReply(replies[2][0]), ref), 1e-6);
  EXPECT_LE(MaxRelError(FromReply(replies[1][0]), ref),
            1.0 / 128);  // one bf16 rounding
}

TEST_P(ExpertServerTest, Dispatch_BadRequestsGetSpecificInBandErrors) {
  StartServer();
  const int32_t layer = moe_layers_[0];
  const Work w = RandomWork(layer, 3, hidden_, held_, 9, true);
  const v1::ExpertRequest good = ToRequest(w, hidden_, 0, 1);
  struct Case {
    std::string name;
    std::function<void(v1::ExpertRequest&)> mutate;
    grpc::StatusCode code;
    std::string message;
  };
  const int32_t not_held = placement_.Slots(layer, 0)[0];
  std::vector<Case> cases = {
      {"unknown layer", [](auto& r) { r.set_layer(99); }, grpc::INVALID_ARGUMENT,
       "layer 99 is not a MoE layer"},
      {"dense layer", [](auto& r) { r.set_layer(0); }, grpc::INVALID_ARGUMENT,
       "layer 0 is not a MoE layer"},
      {"stale version", [](auto& r) { r.set_placement_version(3); }, grpc::FAILED_PRECONDITION,
       "placement version 3 not held (holding 1)"},
      {"wrong cols", [](auto& r) { r.mutable_x()->set_cols(32); }, grpc::INVALID_ARGUMENT,
       absl::StrCat("x has 32 columns, expected hidden size ", hidden_)},
      {"wrong rows", [](auto& r) { r.mutable_x()->set_rows(2); }, grpc::INVALID_ARGUMENT,
       "token_offsets has 4 entries, expected x rows + 1 = 3"},
      {"truncated payload",
       [](auto& r) { r.mutable_x()->mutable_data()->resize(r.x().data().size() - 5); },
       grpc::INVALID_ARGUMENT, "bytes, got"},
      {"expert not held", [&](auto& r) { r.set_expert_ids(0, not_held); },
       grpc::FAILED_PRECONDITION,
       absl::StrCat("layer ", layer, " expert ", not_held, " not held by server 1")},
      {"expert out of range", [](auto& r) { r.set_expert_ids(0, 1000); }, grpc::INVALID_ARGUMENT,
       "expert id 1000 out of range"},
      {"decreasing offsets", [](auto& r) { r.set_token_offsets(1, r.token_offsets(2) + 1); },
       grpc::INVALID_ARGUMENT, "token_offsets decrease at token 1"},
      {"offsets end", [](auto& r) { r.add_expert_ids(8); }, grpc::INVALID_ARGUMENT,
       "token_offsets end at"},
      {"offsets start", [](auto& r) { r.set_token_offsets(0, 1); }, grpc::INVALID_ARGUMENT,
       "token_offsets[0] is 1"},
      {"shared duty size", [](auto& r) { r.add_shared_duty(true); }, grpc::INVALID_ARGUMENT,
       "shared_duty has 4 entries"},
      {"dtype", [](auto& r) { r.mutable_x()->set_dtype(v1::ACTIVATION_DTYPE_UNSPECIFIED); },
       grpc::INVALID_ARGUMENT, "x dtype 0"},
      {"lonely chunk",
       [](auto& r) {
         r.set_chunk_index(1);
         r.set_chunk_count(2);
       },
       grpc::INVALID_ARGUMENT, "arrived without chunk 0"},
  };
  std::vector<v1::ExpertRequest> reqs;
  for (size_t i = 0; i < cases.size(); ++i) {
    v1::ExpertRequest r = good;
    r.set_request_id(i + 1);
    cases[i].mutate(r);
    reqs.push_back(r);
  }
  reqs.push_back(good);  // the stream stays usable
  auto replies = RoundTrip(reqs);
  for (size_t i = 0; i < cases.size(); ++i) {
    SCOPED_TRACE(cases[i].name);
    ASSERT_EQ(replies[i + 1].size(), 1u);
    const auto& r = replies[i + 1][0];
    EXPECT_EQ(r.error_code(), cases[i].code);
    EXPECT_THAT(r.error_message(), HasSubstr(cases[i].message));
    EXPECT_FALSE(r.has_y());
  }
  ASSERT_EQ(replies[0].size(), 1u);
  EXPECT_LE(MaxRelError(FromReply(replies[0][0]), Reference(w)), 1e-6);
}

TEST_P(ExpertServerTest, Dispatch_BrokenChunkSequenceFailsThatRequestOnly) {
  StartServer();
  Work w = RandomWork(moe_layers_[0], 4, hidden_, held_, 2, false);
  v1::ExpertRequest c0 = ToRequest(w, hidden_, 7, 1, common::WireDType::kF32, 0, 2);
  c0.set_chunk_index(0);
  c0.set_chunk_count(2);
  v1::ExpertRequest other = ToRequest(w, hidden_, 8, 1);
  auto replies = RoundTrip({c0, other});
  ASSERT_EQ(replies[7].size(), 1u);
  EXPECT_EQ(replies[7][0].error_code(), grpc::INVALID_ARGUMENT);
  EXPECT_THAT(replies[7][0].error_message(), HasSubstr("expected chunk 1 of 2, got request 8"));
  ASSERT_EQ(replies[8].size(), 1u);
  EXPECT_LE(MaxRelError(FromReply(replies[8][0]), Reference(w)), 1e-6);
}

TEST_P(ExpertServerTest, Dispatch_FullQueueAnswersResourceExhausted) {
  StartServer(/*max_queue=*/1);
  std::vector<Work> works;
  std::vector<v1::ExpertRequest> reqs;
  for (int i = 0; i < 40; ++i) {
    works.push_back(RandomWork(moe_layers_[i % 2], 64, hidden_, held_, i, true));
    reqs.push_back(ToRequest(works.back(), hidden_, i, 1));
  }
  auto replies = RoundTrip(reqs);
  int exhausted = 0;
  for (int i = 0; i < 40; ++i) {
    ASSERT_EQ(replies[i].size(), 1u) << "request " << i;
    const auto& r = replies[i][0];
    if (r.error_code() != 0) {
      EXPECT_EQ(r.error_code(), grpc::RESOURCE_EXHAUSTED);
      EXPECT_THAT(r.error_message(), HasSubstr("queue is full"));
      ++exhausted;
    } else {
      EXPECT_LE(MaxRelError(FromReply(r), Reference(works[i])), 1e-6);
    }
  }
  std::printf("%d of 40 requests refused with a queue of 1\n", exhausted);
}

TEST_P(ExpertServerTest, GetStatus_DescribesSlotsWeightsAndCounters) {
  StartServer();
  Work w = RandomWork(moe_layers_[1], 5, hidden_, held_, 4, true);
  One(ToRequest(w, hidden_, 1, 1));
  grpc::ClientContext ctx;
  v1::ServerStatusResponse s;
  ASSERT_TRUE(stub_->GetStatus(&ctx, v1::ServerStatusRequest(), &s).ok());
  EXPECT_EQ(s.placement_version(), 1u);
  EXPECT_EQ(s.server_index(), 1u);
  EXPECT_EQ(s.num_servers(), 2u);
  EXPECT_EQ(s.model(), dir_);
  EXPECT_THAT(s.build_version(), HasSubstr("dmoe-expert"));
  ASSERT_EQ(s.slots_size(), static_cast<int>(moe_layers_.size()));
  // Expected weights: this server's experts plus every shared FFN, as a backend
  // packs them.
  auto ckpt = core::Checkpoint::Open(dir_);
  auto mine = core::MakeCpuExpertBackend(core::ComputeType::kF32);
  std::map<int32_t, uint64_t> expected_counts;
  for (int32_t a = 0; a < w.offsets.back(); ++a) ++expected_counts[w.experts[a]];
  std::vector<uint64_t> expected_tokens;
  for (size_t i = 0; i < moe_layers_.size(); ++i) {
    const int32_t l = moe_layers_[i];
    EXPECT_EQ(s.slots(i).layer(), static_cast<uint32_t>(l));
    const auto& want = placement_.Slots(l, 1);
    EXPECT_EQ(std::vector<int32_t>(s.slots(i).experts().begin(), s.slots(i).experts().end()), want);
    for (int32_t e : want) {
      ASSERT_TRUE(core::LoadFfnInto(**ckpt, core::FfnPrefix(l, e), hidden_,
                                    cfg_.moe_intermediate_size, l, e, *mine)
                      .ok());
      expected_tokens.push_back(l == w.layer ? expected_counts[e] : 0);
    }
    ASSERT_TRUE(core::LoadFfnInto(**ckpt, core::FfnPrefix(l, core::kSharedFfn), hidden_,
                                  cfg_.n_shared_experts * cfg_.moe_intermediate_size, l,
                                  core::kSharedFfn, *mine)
                    .ok());
  }
  EXPECT_EQ(s.resident_weight_bytes(), mine->WeightBytes());
  EXPECT_EQ(server_->resident_weight_bytes(), mine->WeightBytes());
  EXPECT_EQ(std::vector<uint64_t>(s.tokens_computed().begin(), s.tokens_computed().end()),
            expected_tokens);
  EXPECT_EQ(server_->num_slots(), static_cast<int64_t>(expected_tokens.size()));
}

TEST_P(ExpertServerTest, LoadAndUnloadSlots_SwitchVersionsWithoutSilentZeros) {
  StartServer();
  const int32_t layer = moe_layers_[0];
  const int32_t newcomer = placement_.Slots(layer, 0)[0];  // held by server 0 only
  const int32_t leaver = held_[0];
  const size_t bytes_before = server_->resident_weight_bytes();

  v1::LoadSlotsRequest load;
  load.set_placement_version(2);
  auto* ls = load.add_slots();
  ls->set_layer(layer);
  ls->add_experts(newcomer);
  {
    grpc::ClientContext ctx;
    v1::SlotsResponse resp;
    grpc::Status st = stub_->LoadSlots(&ctx, load, &resp);
    ASSERT_TRUE(st.ok()) << st.error_message();
    EXPECT_EQ(resp.placement_version(), 2u);
    EXPECT_GT(resp.resident_weight_bytes(), bytes_before);
  }
  Work uses_new = RandomWork(layer, 3, hidden_, {newcomer, leaver}, 1, true);
  Work uses_leaver = RandomWork(layer, 3, hidden_, {leaver}, 2, false);
  {
    auto r = RoundTrip({ToRequest(uses_new, hidden_, 1, 2), ToRequest(uses_new, hidden_, 2, 1),
                        ToRequest(uses_leaver, hidden_, 3, 1)});
    EXPECT_LE(MaxRelError(FromReply(r[1][0]), Reference(uses_new)), 1e-6);
    EXPECT_EQ(r[2][0].error_code(),
              grpc::FAILED_PRECONDITION);  // v1 never held the newcomer
    EXPECT_THAT(r[2][0].error_message(),
                HasSubstr(absl::StrCat("layer ", layer, " expert ", newcomer, " not held")));
    EXPECT_LE(MaxRelError(FromReply(r[3][0]), Reference(uses_leaver)),
              1e-6);  // v1 still served
  }

  v1::UnloadSlotsRequest unload;
  unload.set_placement_version(2);
  auto* us = unload.add_slots();
  us->set_layer(layer);
  us->add_experts(leaver);
  {
    grpc::ClientContext ctx;
    v1::SlotsResponse resp;
    grpc::Status st = stub_->UnloadSlots(&ctx, unload, &resp);
    ASSERT_TRUE(st.ok()) << st.error_message();
    EXPECT_EQ(resp.resident_weight_bytes(),
              bytes_before);  // one expert in, one out
  }
  {
    auto r = RoundTrip({ToRequest(uses_leaver, hidden_, 1, 1),
                        ToRequest(uses_leaver, hidden_, 2, 2), ToRequest(uses_new, hidden_, 3, 2)});
    EXPECT_EQ(r[1][0].error_code(), grpc::FAILED_PRECONDITION);
    EXPECT_THAT(r[1][0].error_message(), HasSubstr("placement version 1 not held (holding 2)"));
    EXPECT_EQ(r[2][0].error_code(), grpc::FAILED_PRECONDITION);
    EXPECT_THAT(r[2][0].error_message(),
                HasSubstr(absl::StrCat("layer ", layer, " expert ", leaver, " not held")));
    EXPECT_EQ(r[3][0].error_code(),
              grpc::FAILED_PRECONDITION);  // uses_new also routes to leaver
  }
  Work only_new = RandomWork(layer, 2, hidden_, {newcomer}, 3, true);
  EXPECT_LE(MaxRelError(FromReply(One(ToRequest(only_new, hidden_, 9, 2))), Reference(only_new)),
            1e-6);

  // Going back in versions, or unloading from a version that is not the newest,
  // is refused.
  {
    grpc::ClientContext ctx;
    v1::SlotsResponse resp;
    load.set_placement_version(1);
    grpc::Status st = stub_->LoadSlots(&ctx, load, &resp);
    EXPECT_EQ(st.error_code(), grpc::FAILED_PRECONDITION);
    EXPECT_THAT(st.error_message(), HasSubstr("older than the newest held version 2"));
  }
  {
    grpc::ClientContext ctx;
    v1::SlotsResponse resp;
    unload.set_placement_version(2);
    grpc::Status st = stub_->UnloadSlots(&ctx, unload, &resp);  // leaver is gone already
    EXPECT_EQ(st.error_code(), grpc::NOT_FOUND);
  }
  {
    grpc::ClientContext ctx;
    v1::SlotsResponse resp;
    v1::LoadSlotsRequest bad;
    bad.set_placement_version(3);
    bad.add_slots()->set_layer(0);
    grpc::Status st = stub_->LoadSlots(&ctx, bad, &resp);
    EXPECT_EQ(st.error_code(), grpc::INVALID_ARGUMENT);
    EXPECT_THAT(st.error_message(), HasSubstr("layer 0 is not a MoE layer"));
  }
}

TEST_P(ExpertServerTest, Shutdown_AnswersInFlightThenEndsStreamsUnavailable) {
  StartServer();
  Work w = RandomWork(moe_layers_[0], 16, hidden_, held_, 6, true);
  grpc::ClientContext ctx;
  auto stream = stub_->Dispatch(&ctx);
  for (int i = 0; i < 8; ++i) ASSERT_TRUE(stream->Write(ToRequest(w, hidden_, i, 1)));
  // Every request written before the shutdown is answered...
  std::thread stopper([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    server_->Shutdown(absl::Seconds(10));
  });
  v1::ExpertResponse r;
  int answered = 0;
  while (stream->Read(&r)) {
    EXPECT_LE(MaxRelError(FromReply(r), Reference(w)), 1e-6);
    ++answered;
  }
  stopper.join();
  EXPECT_EQ(answered, 8);
  // ...then the stream ends with UNAVAILABLE.
  grpc::Status st = stream->Finish();
  EXPECT_EQ(st.error_code(), grpc::UNAVAILABLE) << st.error_message();
}

INSTANTIATE_TEST_SUITE_P(Presets, ExpertServerTest, ::testing::Values("tiny-v2lite", "tiny-v3"),
                         [](const auto& info) {
                           std::string s = info.param;
                           std::replace(s.begin(), s.end(), '-', '_');
                           return s;
                         });

TEST(ExpertServerCreateTest, RejectsServerIndexOutsideThePlacement) {
  const std::string dir = testing::MakeModel("tiny-v2lite", 1);
  auto cfg = core::ModelConfig::FromFile(dir + "/config.json");
  ASSERT_TRUE(cfg.ok());
  ExpertServerOptions o;
  o.model_dir = dir;
  o.server_index = 2;
  o.placement = *place::Placement::Contiguous(*cfg, 2);
  auto s = ExpertServer::Create(o);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.status().message()), HasSubstr("server index 2 is outside"));
}

TEST(ExpertServerCreateTest, StartFailsOnABusyPort) {
  const std::string dir = testing::MakeModel("tiny-v2lite", 1);
  auto cfg = core::ModelConfig::FromFile(dir + "/config.json");
  ASSERT_TRUE(cfg.ok());
  ExpertServerOptions o;
  o.model_dir = dir;
  o.placement = *place::Placement::Contiguous(*cfg, 1);
  auto first = ExpertServer::Create(o);
  auto second = ExpertServer::Create(o);
  ASSERT_TRUE(first.ok() && second.ok());
  ASSERT_TRUE((*first)->Start("127.0.0.1", 0).ok());
  EXPECT_EQ((*first)->num_slots(),
            2 * cfg->n_routed_experts);  // both MoE layers, all experts
  const absl::Status st = (*second)->Start("127.0.0.1", (*first)->port());
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(st.message()), HasSubstr("cannot listen on 127.0.0.1:"));
}

// ---- the real binary
// -----------------------------------------------------------

// grpc.health.v1.Health/Check for the whole server, through the generic stub
// (no health proto is installed): the reply is HealthCheckResponse{status}.
bool IsServing(const std::shared_ptr<grpc::Channel>& channel) {
  grpc::GenericStub stub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
  grpc::Slice empty;
  grpc::ByteBuffer request(&empty, 1),
      response;  // HealthCheckRequest{service: ""}
  absl::Notification done;
  grpc::Status status;
  stub.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request, &response,
                 [&](grpc::Status s) {
                   status = std::move(s);
                   done.Notify();
                 });
  done.WaitForNotification();
  if (!status.ok()) return false;
  grpc::Slice slice;
  if (!response.DumpToSingleSlice(&slice).ok()) return false;
  const std::string bytes(reinterpret_cast<const char*>(slice.begin()), slice.size());
  return bytes == std::string("\x08\x01", 2);  // status: SERVING
}

TEST(ExpertBinaryTest, ServesHealthAndRequestsThenExitsCleanlyOnSigterm) {
  const std::string dir = testing::MakeModel("tiny-v2lite", 3, tools::WeightFormat::kF32);
  const std::string tmp = testing::FreshDir("run");
  const std::string port_file = tmp + "/port", log = tmp + "/stderr";
  ChildProcess server;
  ASSERT_TRUE(server.Start(
      {BinDir() + "/dmoe-expert", "--model", dir, "--server-index", "1", "--num-servers", "2",
       "--port", "0", "--port-file", port_file, "--dtype", "f32", "--threads", "1"},
      log));
  const int port = testing::WaitForPortFile(port_file, server);
  if (port == 0) FAIL() << "no port file; stderr:\n" << ReadFile(log);
  auto channel =
      grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials());
  bool serving = false;
  for (int i = 0; i < 100 && !serving; ++i) {
    serving = IsServing(channel);
    if (!serving) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_TRUE(serving);
  EXPECT_THAT(ReadFile(log), HasSubstr(absl::StrCat("dmoe-expert: serving 16 slots (")));
  EXPECT_THAT(ReadFile(log), HasSubstr(absl::StrCat("for server 1/2 on 127.0.0.1:", port)));

  // One request, checked against the local backend.
  auto cfg = *core::ModelConfig::FromFile(dir + "/config.json");
  auto ckpt = *core::Checkpoint::Open(dir);
  auto ref = core::MakeCpuExpertBackend(core::ComputeType::kF32);
  const int32_t layer = 1;
  const std::vector<int32_t> held = place::Placement::Contiguous(cfg, 2)->Slots(layer, 1);
  for (int32_t e : held) {
    ASSERT_TRUE(core::LoadFfnInto(*ckpt, core::FfnPrefix(1, e), cfg.hidden_size,
                                  cfg.moe_intermediate_size, layer, e, *ref)
                    .ok());
  }
  Work w = RandomWork(layer, 5, cfg.hidden_size, held, 1, false);
  auto stub = v1::ExpertService::NewStub(channel);
  {
    grpc::ClientContext ctx;
    auto stream = stub->Dispatch(&ctx);
    ASSERT_TRUE(stream->Write(ToRequest(w, cfg.hidden_size, 77, 1)));
    v1::ExpertResponse r;
    ASSERT_TRUE(stream->Read(&r));
    EXPECT_EQ(r.request_id(), 77u);
    std::vector<float> want(w.tokens * cfg.hidden_size);
    core::ExpertBatch b;
    b.layer = layer;
    b.num_tokens = w.tokens;
    b.hidden = cfg.hidden_size;
    b.x = w.x.data();
    b.token_offsets = w.offsets;
    b.ffn_ids = w.experts;
    b.weights = w.weights;
    ASSERT_TRUE(ref->Compute(b, want.data()).ok());
    EXPECT_LE(MaxRelError(FromReply(r), want), 1e-6);
    stream->WritesDone();
    EXPECT_TRUE(stream->Finish().ok());
  }
  EXPECT_EQ(server.Kill(SIGTERM, std::chrono::seconds(60)), 0) << ReadFile(log);
}

// Runs the binary with `args` to its exit; returns the exit status.
int RunToExit(const std::vector<std::string>& args, const std::string& log) {
  ChildProcess p;
  EXPECT_TRUE(p.Start(args, log)) << "cannot fork for " << args[0];
  return p.Wait(std::chrono::seconds(60));
}

TEST(ExpertBinaryTest, BadFlagsExit2BadModelExit1) {
  const std::string tmp = testing::FreshDir("bad");
  const std::string log = tmp + "/stderr";
  EXPECT_EQ(RunToExit({BinDir() + "/dmoe-expert", "--model", tmp, "--server-index", "0",
                       "--num-servers", "2", "--bogus", "1"},
                      log),
            2);
  EXPECT_THAT(ReadFile(log), HasSubstr("unknown flag --bogus"));
  EXPECT_EQ(RunToExit({BinDir() + "/dmoe-expert", "--model", tmp, "--server-index", "0"}, log), 2);
  EXPECT_THAT(ReadFile(log), HasSubstr("exactly one of --num-servers and --placement"));
  EXPECT_EQ(RunToExit({BinDir() + "/dmoe-expert", "--model", tmp + "/missing", "--server-index",
                       "0", "--num-servers", "2"},
                      log),
            1);
  EXPECT_THAT(ReadFile(log), HasSubstr("model " + tmp + "/missing"));
  EXPECT_EQ(RunToExit({BinDir() + "/dmoe-expert", "--help"}, log), 0);
}

}  // namespace
}  // namespace dmoe::expert
