// RemoteExpertBackend against test-double expert servers on 127.0.0.1 (real
// gRPC, in-process): results against one local CPU backend holding every
// expert, what each server receives, in-band errors, deadlines, a server going
// away and coming back on the same port, chunking, and the local interface.
//
// The double implements dmoe::v1::ExpertService::Service and computes with a
// real core::MakeCpuExpertBackend(kF32) loaded with the experts its placement
// gives it (+ the shared FFN of every MoE layer); it can also answer with an
// in-band error, never answer, delay replies, chunk replies on its own, or
// send malformed replies.
#include "router_service/remote_expert_backend.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/wire.h"
#include "core/config.h"
#include "core/dtype.h"
#include "core/expert_backend.h"
#include "dmoe/v1/expert.grpc.pb.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "placement/placement.h"
#include "testing/expert_backend_conformance.h"
#include "testing/expert_batch.h"

namespace dmoe::router {
namespace {

using core::kSharedFfn;
using testing::ExpertBackendConformance;
using ::testing::HasSubstr;
using testing::HostBatch;
using testing::HostFfn;
using ::testing::StartsWith;
using testing::Uniform;

constexpr int64_t kHidden = 16;
constexpr int64_t kInter = 8;
constexpr int32_t kExperts = 8;
constexpr int kTopK = 3;
constexpr int32_t kMoeLayers[] = {1, 2};

core::ModelConfig Cfg() {
  core::ModelConfig c;
  c.model_type = core::ModelType::kDeepseekV2;
  c.hidden_size = kHidden;
  c.moe_intermediate_size = kInter;
  c.num_hidden_layers = 3;
  c.first_k_dense_replace = 1;  // layers 1 and 2 are MoE
  c.n_routed_experts = kExperts;
  c.num_experts_per_tok = kTopK;
  c.n_shared_experts = 1;
  return c;
}

// ---- weights and batches -----------------------------------------------------

// Every FFN of every MoE layer, scaled so outputs are O(1).
class Weights {
 public:
  explicit Weights(uint32_t seed) {
    std::mt19937 rng(seed);
    for (int32_t l : kMoeLayers) {
      for (int32_t f = kSharedFfn; f < kExperts; ++f) {
        HostFfn h{.hidden = kHidden, .inter = kInter};
        h.gate = Uniform(kInter * kHidden, 2.0f / std::sqrt(float(kHidden)), &rng);
        h.up = Uniform(kInter * kHidden, 2.0f / std::sqrt(float(kHidden)), &rng);
        h.down = Uniform(kHidden * kInter, 2.0f / std::sqrt(float(kInter)), &rng);
        ffns_[{l, f}] = std::move(h);
      }
    }
  }
  absl::Status LoadInto(core::ExpertBackend& b, int32_t layer, int32_t ffn) const {
    return b.LoadFfn(layer, ffn, ffns_.at({layer, ffn}).View());
  }

 private:
  std::map<std::pair<int32_t, int32_t>, HostFfn> ffns_;
};

// Top-k distinct experts per token with random weights, + the shared FFN.
HostBatch RandomBatch(int32_t layer, int64_t tokens, bool with_shared, uint32_t seed) {
  return testing::RandomBatch(
      {.layer = layer,
       .hidden = kHidden,
       .num_experts = kExperts,
       .top_k = kTopK,
       .shared = with_shared ? testing::SharedFfn::kAlways : testing::SharedFfn::kNone,
       .min_weight = 0.05f,
       .max_weight = 1.0f},
      tokens, seed);
}

// Every element within `rel` times the largest magnitude of its row of `want`.
void ExpectRowsNear(const std::vector<float>& got, const std::vector<float>& want, double rel) {
  ASSERT_EQ(got.size(), want.size());
  int failures = 0;
  double worst = 0;
  for (size_t r = 0; r < want.size() / kHidden; ++r) {
    double row_max = 0;
    for (int64_t j = 0; j < kHidden; ++j)
      row_max = std::max(row_max, double(std::fabs(want[r * kHidden + j])));
    for (int64_t j = 0; j < kHidden; ++j) {
      const double d = std::fabs(double(got[r * kHidden + j]) - want[r * kHidden + j]);
      worst = std::max(worst, d / std::max(row_max, 1e-30));
      if (d > rel * row_max && failures++ < 5) {
        ADD_FAILURE() << "token " << r << " [" << j << "]: " << got[r * kHidden + j] << " vs "
                      << want[r * kHidden + j] << " (row max " << row_max << ")";
      }
    }
  }
  EXPECT_EQ(failures, 0) << "worst relative error " << worst;
}

// ---- the test-double expert server ---------------------------------------------

// One message as the double received it (x unpacked).
struct Received {
  v1::ExpertRequest msg;
  std::vector<float> x;  // [rows, hidden]
};

// kLegacy: computes, but as a server from before per_assignment_reply would
// (one partial sum per token, the field ignored).
enum class Behavior { kCompute, kError, kSilent, kWrongRows, kWrongId, kLegacy };

common::WireDType FromProto(v1::ActivationDType t) {
  switch (t) {
    case v1::ACTIVATION_DTYPE_F32:
      return common::WireDType::kF32;
    case v1::ACTIVATION_DTYPE_F8_E4M3:
      return common::WireDType::kF8E4M3;
    default:
      return common::WireDType::kBF16;
  }
}

class FakeExpertServer {
 public:
  // Loads (layer, ffn) into the server's backend.
  using FfnLoader = std::function<absl::Status(core::ExpertBackend&, int32_t, int32_t)>;

  FakeExpertServer(int index, const place::Placement& placement, const Weights& w)
      : FakeExpertServer(index, placement, [&w](core::ExpertBackend& b, int32_t l, int32_t f) {
          return w.LoadInto(b, l, f);
        }) {}
  FakeExpertServer(int index, const place::Placement& placement, const FfnLoader& load)
      : backend_(core::MakeCpuExpertBackend(core::ComputeType::kF32)) {
    for (int32_t l : kMoeLayers) {
      for (int32_t e : placement.Slots(l, index)) EXPECT_TRUE(load(*backend_, l, e).ok());
      EXPECT_TRUE(load(*backend_, l, kSharedFfn).ok());
    }
  }
  ~FakeExpertServer() { Stop(); }

  // Listens on 127.0.0.1:port (0: any free port).
  void Start(int port = 0) {
    grpc::ServerBuilder builder;
    int selected = 0;
    builder.AddListeningPort(absl::StrCat("127.0.0.1:", port), grpc::InsecureServerCredentials(),
                             &selected);
    builder.SetMaxReceiveMessageSize(64 << 20);
    builder.SetMaxSendMessageSize(64 << 20);
    service_ = std::make_unique<Service>(this);
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    ASSERT_NE(selected, 0);
    port_ = selected;
  }
  void Stop() {
    if (!server_) return;
    server_->Shutdown(std::chrono::system_clock::now());  // cancels open streams
    server_->Wait();
    server_.reset();
    service_.reset();
  }
  int port() const { return port_; }
  std::string address() const { return absl::StrCat("127.0.0.1:", port_); }

  void SetBehavior(Behavior b, int code = 0, std::string message = "") {
    absl::MutexLock l(&mu_);
    behavior_ = b;
    error_code_ = code;
    error_message_ = std::move(message);
  }
  void SetReplyDelay(absl::Duration d) {
    absl::MutexLock l(&mu_);
    delay_ = d;
  }
  void SetReplyChunkRows(int64_t rows) {
    absl::MutexLock l(&mu_);
    reply_chunk_rows_ = rows;
  }
  std::vector<Received> TakeReceived() {
    absl::MutexLock l(&mu_);
    return std::exchange(received_, {});
  }

 private:
  class Service final : public v1::ExpertService::Service {
   public:
    explicit Service(FakeExpertServer* owner) : owner_(owner) {}
    grpc::Status Dispatch(
        grpc::ServerContext* context,
        grpc::ServerReaderWriter<v1::ExpertResponse, v1::ExpertRequest>* stream) override {
      v1::ExpertRequest req;
      std::vector<Received> chunks;
      while (stream->Read(&req)) {
        Received rec{req, std::vector<float>(size_t{req.x().rows()} * req.x().cols())};
        EXPECT_TRUE(common::UnpackActivations(FromProto(req.x().dtype()), req.x().data(),
                                              req.x().row_scales(), req.x().rows(), req.x().cols(),
                                              rec.x.data())
                        .ok());
        Behavior behavior;
        int code;
        std::string message;
        absl::Duration delay;
        int64_t chunk_rows;
        {
          absl::MutexLock l(&owner_->mu_);
          owner_->received_.push_back(rec);
          behavior = owner_->behavior_;
          code = owner_->error_code_;
          message = owner_->error_message_;
          delay = owner_->delay_;
          chunk_rows = owner_->reply_chunk_rows_;
        }
        if (behavior == Behavior::kSilent) continue;
        if (behavior == Behavior::kError) {
          if (req.chunk_index() == 0) {
            v1::ExpertResponse resp;
            resp.set_request_id(req.request_id());
            resp.set_error_code(code);
            resp.set_error_message(message);
            stream->Write(resp);
          }
          continue;
        }
        chunks.push_back(std::move(rec));
        if (req.chunk_index() + 1 < std::max(req.chunk_count(), 1u)) continue;
        std::vector<float> y = owner_->ComputeChunks(chunks, behavior == Behavior::kLegacy);
        const int64_t hidden = req.x().cols();
        const int64_t rows = static_cast<int64_t>(y.size()) / hidden;
        const v1::ActivationDType dtype = req.reply_dtype() == v1::ACTIVATION_DTYPE_UNSPECIFIED
                                              ? req.x().dtype()
                                              : req.reply_dtype();
        chunks.clear();
        if (delay > absl::ZeroDuration()) absl::SleepFor(delay);
        const int64_t sent_rows = behavior == Behavior::kWrongRows ? rows - 1 : rows;
        const int64_t per = chunk_rows > 0 ? chunk_rows : std::max<int64_t>(sent_rows, 1);
        const int64_t count = std::max<int64_t>(1, (sent_rows + per - 1) / per);
        for (int64_t c = 0; c < count; ++c) {
          const int64_t r0 = c * per, r1 = std::min(sent_rows, r0 + per);
          v1::ExpertResponse resp;
          resp.set_request_id(req.request_id() + (behavior == Behavior::kWrongId ? 1000 : 0));
          resp.set_chunk_index(static_cast<uint32_t>(c));
          resp.set_chunk_count(static_cast<uint32_t>(count));
          v1::Activations* a = resp.mutable_y();
          a->set_dtype(dtype);
          a->set_rows(static_cast<uint32_t>(r1 - r0));
          a->set_cols(static_cast<uint32_t>(hidden));
          common::PackActivations(y.data() + r0 * hidden, r1 - r0, hidden, 0, FromProto(dtype),
                                  a->mutable_data(), a->mutable_row_scales());
          if (!stream->Write(resp)) return grpc::Status::OK;
        }
      }
      return grpc::Status::OK;
    }

   private:
    FakeExpertServer* const owner_;
  };

  // Reassembles the chunks of one request and computes one vector per token.
  std::vector<float> ComputeChunks(const std::vector<Received>& chunks, bool legacy) {
    std::vector<float> x;
    std::vector<int32_t> offsets{0}, ids;
    std::vector<float> weights;
    for (const Received& c : chunks) {
      x.insert(x.end(), c.x.begin(), c.x.end());
      const v1::ExpertRequest& m = c.msg;
      EXPECT_EQ(m.token_offsets_size(), static_cast<int>(m.x().rows()) + 1);
      EXPECT_EQ(m.shared_duty_size(), static_cast<int>(m.x().rows()));
      EXPECT_EQ(m.token_offsets(0), 0u) << "chunk offsets are rebased";
      for (uint32_t r = 0; r < m.x().rows(); ++r) {
        for (uint32_t a = m.token_offsets(r); a < m.token_offsets(r + 1); ++a) {
          ids.push_back(m.expert_ids(a));
          weights.push_back(m.weights(a));
        }
        if (m.shared_duty(r)) {
          ids.push_back(kSharedFfn);
          weights.push_back(1.0f);
        }
        offsets.push_back(static_cast<int32_t>(ids.size()));
      }
    }
    const int64_t tokens = static_cast<int64_t>(offsets.size()) - 1;
    // One row per token, or per assignment (experts, then shared duty).
    const bool per_assignment = chunks[0].msg.per_assignment_reply() && !legacy;
    const int64_t hidden = chunks[0].msg.x().cols();
    std::vector<float> y((per_assignment ? static_cast<int64_t>(ids.size()) : tokens) * hidden);
    core::ExpertBatch b{static_cast<int32_t>(chunks[0].msg.layer()),
                        tokens,
                        hidden,
                        x.data(),
                        offsets,
                        ids,
                        weights};
    b.per_assignment_out = per_assignment;
    absl::MutexLock l(&compute_mu_);  // a replaced stream's handler may still run
    absl::Status st = backend_->Compute(b, y.data());
    EXPECT_TRUE(st.ok()) << st;
    return y;
  }

  std::unique_ptr<core::ExpertBackend> backend_;
  absl::Mutex compute_mu_;
  std::unique_ptr<Service> service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;

  absl::Mutex mu_;
  Behavior behavior_ ABSL_GUARDED_BY(mu_) = Behavior::kCompute;
  int error_code_ ABSL_GUARDED_BY(mu_) = 0;
  std::string error_message_ ABSL_GUARDED_BY(mu_);
  absl::Duration delay_ ABSL_GUARDED_BY(mu_) = absl::ZeroDuration();
  int64_t reply_chunk_rows_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<Received> received_ ABSL_GUARDED_BY(mu_);
};

// ---- fixture -------------------------------------------------------------------

class RemoteExpertBackendTest : public ::testing::Test {
 protected:
  RemoteExpertBackendTest() : weights_(1234) {
    reference_ = core::MakeCpuExpertBackend(core::ComputeType::kF32);
    for (int32_t l : kMoeLayers) {
      for (int32_t f = kSharedFfn; f < kExperts; ++f) {
        EXPECT_TRUE(weights_.LoadInto(*reference_, l, f).ok());
      }
    }
  }

  void StartServers(const place::Placement& p) {
    placement_ = p;
    for (int s = 0; s < p.num_servers(); ++s) {
      servers_.push_back(std::make_unique<FakeExpertServer>(s, p, weights_));
      servers_.back()->Start();
    }
  }

  RemoteExpertOptions Options(common::WireDType wire = common::WireDType::kF32,
                              place::SharedDuty duty = place::SharedDuty::kExpertServers) {
    RemoteExpertOptions o;
    for (const auto& s : servers_) o.servers.push_back(s->address());
    o.placement = placement_;
    o.wire_dtype = wire;
    o.shared_duty = duty;
    o.local_compute = core::ComputeType::kF32;
    o.deadline = std::chrono::milliseconds(5000);
    return o;
  }

  std::unique_ptr<core::ExpertBackend> Make(const RemoteExpertOptions& o) {
    auto b = MakeRemoteExpertBackend(o);
    EXPECT_TRUE(b.ok()) << b.status();
    if (!b.ok()) return nullptr;
    if (o.shared_duty == place::SharedDuty::kRouter) {
      for (int32_t l : kMoeLayers) EXPECT_TRUE(weights_.LoadInto(**b, l, kSharedFfn).ok());
    }
    return std::move(b).value();
  }

  std::vector<float> Reference(const HostBatch& b) {
    std::vector<float> out(b.tokens() * kHidden);
    absl::Status st = reference_->Compute(b.View(), out.data());
    EXPECT_TRUE(st.ok()) << st;
    return out;
  }

  std::string Label(int s) const {
    return absl::StrCat("expert server ", s, " (", servers_[s]->address(), ")");
  }

  // What every server received for one Compute of `b` (f32 wire: rows are the
  // batch's rows bit for bit): each request names the layer and placement
  // version; a token appears at most once per request and only where it has
  // work; a server gets only experts it holds; over all servers every routed
  // assignment arrives exactly once and the shared duty once (or never, when
  // the router keeps it).
  void ExpectRequestsFollowPlacement(const HostBatch& b, place::SharedDuty duty) {
    std::map<std::vector<float>, int64_t> token_of_row;
    for (int64_t t = 0; t < b.tokens(); ++t) {
      token_of_row[std::vector<float>(b.x.begin() + t * kHidden, b.x.begin() + (t + 1) * kHidden)] =
          t;
    }
    ASSERT_EQ(token_of_row.size(), static_cast<size_t>(b.tokens()));
    std::vector<std::vector<std::pair<int32_t, float>>> routed(b.tokens());
    std::vector<int> shared(b.tokens(), 0);
    for (int s = 0; s < static_cast<int>(servers_.size()); ++s) {
      std::vector<Received> got = servers_[s]->TakeReceived();
      std::map<uint64_t, std::vector<bool>> seen;  // request id -> token sent
      for (const Received& r : got) {
        const v1::ExpertRequest& m = r.msg;
        EXPECT_EQ(m.layer(), static_cast<uint32_t>(b.layer));
        EXPECT_EQ(m.placement_version(), placement_.version());
        EXPECT_EQ(m.reply_dtype(), v1::ACTIVATION_DTYPE_F32);
        auto& sent = seen[m.request_id()];
        sent.resize(b.tokens());
        for (uint32_t row = 0; row < m.x().rows(); ++row) {
          auto it = token_of_row.find(
              std::vector<float>(r.x.begin() + row * kHidden, r.x.begin() + (row + 1) * kHidden));
          ASSERT_NE(it, token_of_row.end()) << "server " << s << " got a row that is no token";
          const int64_t t = it->second;
          EXPECT_FALSE(sent[t]) << "server " << s << " got token " << t << " twice";
          sent[t] = true;
          EXPECT_TRUE(m.token_offsets(row + 1) > m.token_offsets(row) || m.shared_duty(row))
              << "server " << s << " got token " << t << " without work";
          for (uint32_t a = m.token_offsets(row); a < m.token_offsets(row + 1); ++a) {
            EXPECT_NE(m.expert_ids(a), kSharedFfn);
            EXPECT_TRUE(placement_.Holds(b.layer, s, m.expert_ids(a)))
                << "server " << s << " got expert " << m.expert_ids(a);
            routed[t].emplace_back(m.expert_ids(a), m.weights(a));
          }
          shared[t] += m.shared_duty(row);
        }
      }
      EXPECT_LE(seen.size(), 1u) << "one request per server per Compute";
    }
    for (int64_t t = 0; t < b.tokens(); ++t) {
      std::vector<std::pair<int32_t, float>> want;
      int want_shared = 0;
      for (int32_t a = b.offsets[t]; a < b.offsets[t + 1]; ++a) {
        if (b.ids[a] == kSharedFfn) {
          want_shared += duty == place::SharedDuty::kExpertServers;
        } else {
          want.emplace_back(b.ids[a], b.weights[a]);
        }
      }
      std::sort(want.begin(), want.end());
      std::sort(routed[t].begin(), routed[t].end());
      EXPECT_EQ(routed[t], want) << "token " << t;
      EXPECT_EQ(shared[t], want_shared) << "token " << t;
    }
  }

  Weights weights_;
  std::unique_ptr<core::ExpertBackend> reference_;
  place::Placement placement_;
  std::vector<std::unique_ptr<FakeExpertServer>> servers_;
};

place::Placement Contiguous(int n) {
  auto p = place::Placement::Contiguous(Cfg(), n, 3);
  EXPECT_TRUE(p.ok()) << p.status();
  return *p;
}

// Three servers, experts 0, 1, 3, 4 and 6 replicated (layer 2 differs).
place::Placement WithReplicas() {
  nlohmann::json j = {{"version", 9},
                      {"num_servers", 3},
                      {"layers",
                       {{{"layer", 1}, {"servers", {{0, 1, 2, 3, 4}, {3, 4, 5, 6}, {0, 1, 6, 7}}}},
                        {{"layer", 2}, {"servers", {{0, 1, 2}, {3, 4, 5}, {6, 7, 0}}}}}}};
  auto p = place::Placement::FromJson(j, Cfg());
  EXPECT_TRUE(p.ok()) << p.status();
  return *p;
}

// Three servers, every expert of both layers on at least two of them.
place::Placement FullyReplicated() {
  const std::vector<std::vector<int32_t>> servers = {
      {0, 1, 2, 3, 4, 5}, {3, 4, 5, 6, 7, 0}, {6, 7, 0, 1, 2, 3}};
  nlohmann::json j = {
      {"version", 11},
      {"num_servers", 3},
      {"layers", {{{"layer", 1}, {"servers", servers}}, {{"layer", 2}, {"servers", servers}}}}};
  auto p = place::Placement::FromJson(j, Cfg());
  EXPECT_TRUE(p.ok()) << p.status();
  return *p;
}

// ---- results -------------------------------------------------------------------

// f32 on the wire and f32 compute on both sides: the only difference is the
// order of the fp32 additions (per server, then across servers), a few ulps of
// the row's largest term.
constexpr double kF32Rel = 1e-6;

TEST_F(RemoteExpertBackendTest, TwoServersContiguousMatchLocalBackend_F32) {
  StartServers(Contiguous(2));
  for (place::SharedDuty duty : {place::SharedDuty::kExpertServers, place::SharedDuty::kRouter}) {
    SCOPED_TRACE(duty == place::SharedDuty::kRouter ? "shared on router" : "shared on servers");
    auto backend = Make(Options(common::WireDType::kF32, duty));
    ASSERT_NE(backend, nullptr);
    uint32_t seed = 1;
    for (int32_t layer : kMoeLayers) {
      for (int64_t tokens : {1, 7, 64}) {
        HostBatch b = RandomBatch(layer, tokens, /*with_shared=*/true, seed++);
        std::vector<float> out(tokens * kHidden, -7.0f);
        {
          auto st = backend->Compute(b.View(), out.data());
          ASSERT_TRUE(st.ok()) << st;
        }
        ExpectRowsNear(out, Reference(b), kF32Rel);
        ExpectRequestsFollowPlacement(b, duty);
        // Deterministic: the same batch again gives the same bits.
        std::vector<float> again(out.size());
        ASSERT_TRUE(backend->Compute(b.View(), again.data()).ok());
        EXPECT_EQ(std::memcmp(out.data(), again.data(), out.size() * 4), 0);
        for (auto& s : servers_) s->TakeReceived();
      }
    }
  }
}

// Per-assignment replies (the default): with f32 on the wire every token's
// result is bit for bit the in-process backend's, however its experts were
// split over servers and replicas. The replica choice follows live load, so
// the same batch is computed alone and again while other batches are in
// flight (which shifts the load and with it the split): all the same bits.
TEST_F(RemoteExpertBackendTest, PerAssignmentRepliesGiveTheLocalBackendsBitsWhateverTheSplit) {
  StartServers(WithReplicas());
  for (place::SharedDuty duty : {place::SharedDuty::kExpertServers, place::SharedDuty::kRouter}) {
    SCOPED_TRACE(duty == place::SharedDuty::kRouter ? "shared on router" : "shared on servers");
    auto backend = Make(Options(common::WireDType::kF32, duty));
    ASSERT_NE(backend, nullptr);
    uint32_t seed = 300;
    for (int32_t layer : kMoeLayers) {
      HostBatch b = RandomBatch(layer, 24, /*with_shared=*/true, seed++);
      const std::vector<float> want = Reference(b);
      std::vector<float> alone(b.tokens() * kHidden);
      ASSERT_TRUE(backend->Compute(b.View(), alone.data()).ok());
      EXPECT_EQ(std::memcmp(alone.data(), want.data(), want.size() * 4), 0) << "alone";
      // Other batches out first: b's replicas are chosen under their load.
      std::vector<HostBatch> others;
      std::vector<std::vector<float>> outs;
      for (int i = 0; i < 3; ++i) {
        others.push_back(RandomBatch(layer, 9 + 13 * i, true, seed++));
        outs.emplace_back(others.back().tokens() * kHidden);
      }
      std::vector<uint64_t> tickets;
      for (int i = 0; i < 3; ++i) {
        auto t = backend->Submit(others[i].View(), outs[i].data());
        ASSERT_TRUE(t.ok()) << t.status();
        tickets.push_back(*t);
      }
      std::vector<float> among(b.tokens() * kHidden);
      auto tb = backend->Submit(b.View(), among.data());
      ASSERT_TRUE(tb.ok()) << tb.status();
      ASSERT_TRUE(backend->Await(*tb).ok());
      for (int i = 0; i < 3; ++i) {
        ASSERT_TRUE(backend->Await(tickets[i]).ok());
        const std::vector<float> want_i = Reference(others[i]);
        EXPECT_EQ(std::memcmp(outs[i].data(), want_i.data(), want_i.size() * 4), 0)
            << "other batch " << i;
      }
      EXPECT_EQ(std::memcmp(among.data(), want.data(), want.size() * 4), 0) << "among others";
      for (auto& s : servers_) s->TakeReceived();
    }
  }
}

// A server from before per-assignment replies (a rolling upgrade) answers one
// partial sum per token: the router detects it by the row count and still
// combines correctly (not bitwise: additions grouped by server), no error.
TEST_F(RemoteExpertBackendTest, ServerWithoutPerAssignmentRepliesStillServes) {
  StartServers(WithReplicas());
  servers_[1]->SetBehavior(Behavior::kLegacy);
  auto backend = Make(Options(common::WireDType::kF32));
  ASSERT_NE(backend, nullptr);
  for (uint32_t seed = 0; seed < 4; ++seed) {
    HostBatch b = RandomBatch(1 + seed % 2, 20, true, 900 + seed);
    std::vector<float> out(b.tokens() * kHidden);
    absl::Status st = backend->Compute(b.View(), out.data());
    ASSERT_TRUE(st.ok()) << st;
    ExpectRowsNear(out, Reference(b), kF32Rel);
  }
  servers_[1]->SetBehavior(Behavior::kCompute);
  HostBatch b = RandomBatch(2, 20, true, 950);
  std::vector<float> out(b.tokens() * kHidden);
  ASSERT_TRUE(backend->Compute(b.View(), out.data()).ok());
  const std::vector<float> want = Reference(b);
  EXPECT_EQ(std::memcmp(out.data(), want.data(), want.size() * 4), 0) << "upgraded: bitwise again";
}

// The legacy reply (one partial sum per token and server) still works: close
// to the local backend, not bitwise (the additions are grouped by server).
TEST_F(RemoteExpertBackendTest, PerServerPartialSumsMatchLocalBackendWithinRounding) {
  StartServers(WithReplicas());
  RemoteExpertOptions o = Options(common::WireDType::kF32);
  o.per_assignment_replies = false;
  auto backend = Make(o);
  ASSERT_NE(backend, nullptr);
  HostBatch b = RandomBatch(1, 30, true, 41);
  std::vector<float> out(b.tokens() * kHidden);
  ASSERT_TRUE(backend->Compute(b.View(), out.data()).ok());
  ExpectRowsNear(out, Reference(b), kF32Rel);
  for (auto& s : servers_) {
    for (const auto& r : s->TakeReceived()) EXPECT_FALSE(r.msg.per_assignment_reply());
  }
}

TEST_F(RemoteExpertBackendTest, ThreeServersWithReplicasMatchLocalBackend_F32) {
  StartServers(WithReplicas());
  for (place::SharedDuty duty : {place::SharedDuty::kExpertServers, place::SharedDuty::kRouter}) {
    SCOPED_TRACE(duty == place::SharedDuty::kRouter ? "shared on router" : "shared on servers");
    auto backend = Make(Options(common::WireDType::kF32, duty));
    ASSERT_NE(backend, nullptr);
    uint32_t seed = 100;
    for (int32_t layer : kMoeLayers) {
      for (int64_t tokens : {1, 5, 40}) {
        for (bool with_shared : {true, false}) {
          HostBatch b = RandomBatch(layer, tokens, with_shared, seed++);
          std::vector<float> out(tokens * kHidden);
          absl::Status st = backend->Compute(b.View(), out.data());
          ASSERT_TRUE(st.ok()) << st;
          ExpectRowsNear(out, Reference(b), kF32Rel);
          ExpectRequestsFollowPlacement(b, duty);
        }
      }
    }
  }
}

TEST_F(RemoteExpertBackendTest, ThreeServersContiguousMatchLocalBackend_F32) {
  StartServers(Contiguous(3));
  auto backend = Make(Options(common::WireDType::kF32));
  ASSERT_NE(backend, nullptr);
  HostBatch b = RandomBatch(2, 33, true, 7);
  std::vector<float> out(b.tokens() * kHidden);
  ASSERT_TRUE(backend->Compute(b.View(), out.data()).ok());
  ExpectRowsNear(out, Reference(b), kF32Rel);
  ExpectRequestsFollowPlacement(b, place::SharedDuty::kExpertServers);
}

// Reduced-precision wire. The reference computes each assignment alone on
// exactly what the server sees (the token's x packed and unpacked), so the only
// error left is the rounding of each server's partial sum on the way back:
// |error| <= u * sum_s |partial_s| <= u * sum_a |w_a FFN_a(x~)| per element,
// u = 2^-9 for bf16 (8 significant bits, round to nearest even) and 2^-4 for
// fp8 e4m3 (4 significant bits; per-row scale, subnormals below 2^-6 of the
// row max round to steps of 2^-9 of it, covered by the 1e-5 row term).
// Checked against twice that, plus 1e-6 of the same sum for fp32 additions in
// another order. With SharedDuty::kRouter the shared FFN runs locally on the
// unrounded x and is not rounded at all.
void ExpectOnlyReplyRounding(common::WireDType wire, place::SharedDuty duty, const HostBatch& b,
                             const std::vector<float>& got,
                             const std::function<std::vector<float>(const HostBatch&)>& reference) {
  const double u = wire == common::WireDType::kBF16 ? std::ldexp(1.0, -9) : std::ldexp(1.0, -4);
  std::vector<float> wire_x(kHidden);
  std::string data, scales;
  int failures = 0;
  for (int64_t t = 0; t < b.tokens(); ++t) {
    common::PackActivations(b.x.data() + t * kHidden, 1, kHidden, 0, wire, &data, &scales);
    ASSERT_TRUE(common::UnpackActivations(wire, data, scales, 1, kHidden, wire_x.data()).ok());
    std::vector<double> want(kHidden, 0.0), wire_mag(kHidden, 0.0), mag(kHidden, 0.0);
    for (int32_t a = b.offsets[t]; a < b.offsets[t + 1]; ++a) {
      const bool local = b.ids[a] == kSharedFfn && duty == place::SharedDuty::kRouter;
      HostBatch one{.hidden = kHidden};
      one.layer = b.layer;
      one.x = local ? std::vector<float>(b.x.begin() + t * kHidden, b.x.begin() + (t + 1) * kHidden)
                    : wire_x;
      one.offsets = {0, 1};
      one.ids = {b.ids[a]};
      one.weights = {b.weights[a]};
      std::vector<float> y = reference(one);
      for (int64_t j = 0; j < kHidden; ++j) {
        want[j] += y[j];
        mag[j] += std::fabs(y[j]);
        if (!local) wire_mag[j] += std::fabs(y[j]);
      }
    }
    const double row_mag = *std::max_element(wire_mag.begin(), wire_mag.end());
    for (int64_t j = 0; j < kHidden; ++j) {
      const double bound = 2 * u * wire_mag[j] + 1e-5 * row_mag + 1e-6 * mag[j];
      const double err = std::fabs(got[t * kHidden + j] - want[j]);
      if (err > bound && failures++ < 5) {
        ADD_FAILURE() << "token " << t << " [" << j << "]: " << got[t * kHidden + j] << " vs "
                      << want[j] << ", bound " << bound;
      }
    }
  }
  EXPECT_EQ(failures, 0);
}

class ReducedPrecisionWireTest : public RemoteExpertBackendTest,
                                 public ::testing::WithParamInterface<common::WireDType> {};

TEST_P(ReducedPrecisionWireTest, ErrorIsOnlyTheReplyRounding) {
  const common::WireDType wire = GetParam();
  const v1::ActivationDType proto =
      wire == common::WireDType::kBF16 ? v1::ACTIVATION_DTYPE_BF16 : v1::ACTIVATION_DTYPE_F8_E4M3;
  StartServers(WithReplicas());
  for (place::SharedDuty duty : {place::SharedDuty::kExpertServers, place::SharedDuty::kRouter}) {
    SCOPED_TRACE(duty == place::SharedDuty::kRouter ? "shared on router" : "shared on servers");
    auto backend = Make(Options(wire, duty));
    ASSERT_NE(backend, nullptr);
    for (uint32_t seed = 0; seed < 20; ++seed) {
      SCOPED_TRACE(seed);
      HostBatch b = RandomBatch(1 + seed % 2, 25, true, 700 + seed);
      std::vector<float> out(b.tokens() * kHidden);
      ASSERT_TRUE(backend->Compute(b.View(), out.data()).ok());
      ExpectOnlyReplyRounding(wire, duty, b, out,
                              [this](const HostBatch& one) { return Reference(one); });
    }
    for (const Received& r : servers_[0]->TakeReceived()) {
      EXPECT_EQ(r.msg.x().dtype(), proto);
      EXPECT_EQ(r.msg.x().data().size(),
                size_t{r.msg.x().rows()} * kHidden * common::WireElementSize(wire));
      EXPECT_EQ(r.msg.reply_dtype(), proto);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Wire, ReducedPrecisionWireTest,
                         ::testing::Values(common::WireDType::kBF16, common::WireDType::kF8E4M3),
                         [](const auto& info) {
                           return info.param == common::WireDType::kBF16 ? "Bf16" : "Fp8E4M3";
                         });

TEST_F(RemoteExpertBackendTest, TokensWithNoWorkGetZerosAndEmptyBatchIsOk) {
  StartServers(Contiguous(2));
  auto backend = Make(Options(common::WireDType::kF32, place::SharedDuty::kRouter));
  ASSERT_NE(backend, nullptr);
  HostBatch b{.layer = 1, .hidden = kHidden};
  b.x.assign(2 * kHidden, 0.5f);
  b.offsets = {0, 0, 1};  // token 0: nothing; token 1: expert 6 only
  b.ids = {6};
  b.weights = {0.5f};
  std::vector<float> out(2 * kHidden, -1.0f);
  ASSERT_TRUE(backend->Compute(b.View(), out.data()).ok());
  ExpectRowsNear(out, Reference(b), kF32Rel);
  EXPECT_TRUE(servers_[0]->TakeReceived().empty()) << "server 0 has no work in this batch";
  EXPECT_EQ(servers_[1]->TakeReceived().size(), 1u);

  HostBatch empty{.layer = 1, .hidden = kHidden};
  EXPECT_TRUE(backend->Compute(empty.View(), nullptr).ok());
}

// ---- chunking ------------------------------------------------------------------

TEST_F(RemoteExpertBackendTest, LargeBatchIsChunkedBothWays) {
  StartServers(Contiguous(2));
  servers_[0]->SetReplyChunkRows(5);  // the server chunks its reply its own way
  RemoteExpertOptions o = Options(common::WireDType::kF32);
  o.max_chunk_bytes = 3 * kHidden * 4;  // 3 rows per request chunk
  auto backend = Make(o);
  ASSERT_NE(backend, nullptr);
  HostBatch b = RandomBatch(1, 50, true, 5);
  std::vector<float> out(b.tokens() * kHidden);
  ASSERT_TRUE(backend->Compute(b.View(), out.data()).ok());
  ExpectRowsNear(out, Reference(b), kF32Rel);

  std::vector<Received> got = servers_[0]->TakeReceived();
  ASSERT_GT(got.size(), 1u);
  for (size_t i = 0; i < got.size(); ++i) {
    const v1::ExpertRequest& m = got[i].msg;
    EXPECT_EQ(m.request_id(), got[0].msg.request_id());
    EXPECT_EQ(m.chunk_index(), i);
    EXPECT_EQ(m.chunk_count(), got.size());
    if (i + 1 < got.size()) {
      EXPECT_EQ(m.x().rows(), 3u);
    }
    EXPECT_GE(m.x().rows(), 1u);
    EXPECT_LE(m.x().data().size(), o.max_chunk_bytes);
    EXPECT_EQ(m.token_offsets(0), 0u);
    EXPECT_EQ(m.token_offsets(m.token_offsets_size() - 1),
              static_cast<uint32_t>(m.expert_ids_size()));
  }

  // And a following unchunked-size batch on the same streams.
  HostBatch small = RandomBatch(2, 2, true, 6);
  std::vector<float> out2(small.tokens() * kHidden);
  ASSERT_TRUE(backend->Compute(small.View(), out2.data()).ok());
  ExpectRowsNear(out2, Reference(small), kF32Rel);
}

// ---- errors --------------------------------------------------------------------

TEST_F(RemoteExpertBackendTest, InBandErrorCarriesServerCodeAndName) {
  StartServers(Contiguous(3));
  servers_[2]->SetBehavior(Behavior::kError,
                           static_cast<int>(grpc::StatusCode::FAILED_PRECONDITION),
                           "placement version 3 is not held (holding 4)");
  auto backend = Make(Options());
  ASSERT_NE(backend, nullptr);
  HostBatch b = RandomBatch(1, 20, true, 11);
  std::vector<float> out(b.tokens() * kHidden, -7.0f);
  absl::Status st = backend->Compute(b.View(), out.data());
  // No replica to fail over to: the tokens of server 2 fail, with its code
  // and message.
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
  EXPECT_THAT(std::string(st.message()),
              StartsWith(Label(2) + ": placement version 3 is not held (holding 4); layer "));
  EXPECT_THAT(std::string(st.message()), HasSubstr("no replica on another server"));
  EXPECT_TRUE(std::all_of(out.begin(), out.end(), [](float v) { return v == -7.0f; }))
      << "out is not written on error";

  servers_[2]->SetBehavior(Behavior::kCompute);
  st = backend->Compute(b.View(), out.data());
  ASSERT_TRUE(st.ok()) << st;
  ExpectRowsNear(out, Reference(b), kF32Rel);
}

// Server 0 answers late; server 1 fails at once, so Compute returns while
// server 0's reply is still coming. That reply (same shape as the next
// request's) must not be taken as the answer to the next Compute.
TEST_F(RemoteExpertBackendTest, LateReplyOfAbandonedRequestIsIgnored) {
  StartServers(Contiguous(2));
  servers_[0]->SetReplyDelay(absl::Milliseconds(300));
  servers_[1]->SetBehavior(Behavior::kError, static_cast<int>(grpc::StatusCode::INTERNAL), "boom");
  auto backend = Make(Options());
  ASSERT_NE(backend, nullptr);
  HostBatch first = RandomBatch(1, 16, true, 21);
  HostBatch second = first;  // same routing, different activations
  for (float& v : second.x) v = -v * 0.5f;
  std::vector<float> out(first.tokens() * kHidden);
  const absl::Time t0 = absl::Now();
  absl::Status st = backend->Compute(first.View(), out.data());
  EXPECT_EQ(st.code(), absl::StatusCode::kInternal) << st;
  EXPECT_THAT(std::string(st.message()), StartsWith(Label(1) + ": boom"));
  EXPECT_LT(absl::Now() - t0, absl::Milliseconds(250)) << "did not wait for the slow server";
  for (int i = 0; i < 200 && servers_[0]->TakeReceived().empty(); ++i) {
    absl::SleepFor(absl::Milliseconds(5));  // until server 0 is working on it
  }

  servers_[0]->SetReplyDelay(absl::ZeroDuration());
  servers_[1]->SetBehavior(Behavior::kCompute);
  st = backend->Compute(second.View(), out.data());
  ASSERT_TRUE(st.ok()) << st;
  ExpectRowsNear(out, Reference(second), kF32Rel);
  EXPECT_GE(absl::Now() - t0, absl::Milliseconds(300)) << "the late reply came first";
}

TEST_F(RemoteExpertBackendTest, SilentServerGivesDeadlineExceededThenRecovers) {
  StartServers(Contiguous(2));
  servers_[1]->SetBehavior(Behavior::kSilent);
  RemoteExpertOptions o = Options();
  o.deadline = std::chrono::milliseconds(200);
  auto backend = Make(o);
  ASSERT_NE(backend, nullptr);
  HostBatch b = RandomBatch(1, 12, true, 31);
  std::vector<float> out(b.tokens() * kHidden, -7.0f);
  const absl::Time t0 = absl::Now();
  absl::Status st = backend->Compute(b.View(), out.data());
  const absl::Duration took = absl::Now() - t0;
  EXPECT_EQ(st.code(), absl::StatusCode::kDeadlineExceeded) << st;
  EXPECT_THAT(std::string(st.message()), StartsWith(Label(1) + ": no reply to request"));
  EXPECT_GE(took, absl::Milliseconds(195));
  EXPECT_LT(took, absl::Milliseconds(1500));
  EXPECT_TRUE(std::all_of(out.begin(), out.end(), [](float v) { return v == -7.0f; }));

  servers_[1]->SetBehavior(Behavior::kCompute);
  st = backend->Compute(b.View(), out.data());
  ASSERT_TRUE(st.ok()) << st;
  ExpectRowsNear(out, Reference(b), kF32Rel);
}

TEST_F(RemoteExpertBackendTest, ShutDownServerGivesUnavailableAndReconnectsAfterRestart) {
  StartServers(Contiguous(2));
  auto backend = Make(Options());
  ASSERT_NE(backend, nullptr);
  HostBatch b = RandomBatch(1, 12, true, 41);
  std::vector<float> out(b.tokens() * kHidden);
  ASSERT_TRUE(backend->Compute(b.View(), out.data()).ok());

  const int port = servers_[1]->port();
  servers_[1]->Stop();
  std::fill(out.begin(), out.end(), -7.0f);
  const absl::Time t0 = absl::Now();
  absl::Status st = backend->Compute(b.View(), out.data());
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
  EXPECT_THAT(std::string(st.message()), StartsWith(Label(1) + ": stream failed"));
  EXPECT_LT(absl::Now() - t0, absl::Seconds(2)) << "fails fast, not at the deadline";
  EXPECT_TRUE(std::all_of(out.begin(), out.end(), [](float v) { return v == -7.0f; }));
  // Still down: still UNAVAILABLE (a new connection is refused).
  st = backend->Compute(b.View(), out.data());
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;

  servers_[1]->Start(port);
  st = backend->Compute(b.View(), out.data());
  ASSERT_TRUE(st.ok()) << st;
  ExpectRowsNear(out, Reference(b), kF32Rel);
}

// A server that goes away while a request is out: UNAVAILABLE as soon as the
// stream breaks, not at the deadline.
TEST_F(RemoteExpertBackendTest, ServerDyingMidRequestGivesUnavailableBeforeTheDeadline) {
  StartServers(Contiguous(2));
  servers_[1]->SetBehavior(Behavior::kSilent);
  auto backend = Make(Options());  // 5 s deadline
  ASSERT_NE(backend, nullptr);
  HostBatch b = RandomBatch(1, 12, true, 43);
  std::vector<float> out(b.tokens() * kHidden);
  const int port = servers_[1]->port();
  std::thread killer([&] {
    absl::SleepFor(absl::Milliseconds(100));
    servers_[1]->Stop();
  });
  const absl::Time t0 = absl::Now();
  absl::Status st = backend->Compute(b.View(), out.data());
  killer.join();
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
  EXPECT_THAT(std::string(st.message()), StartsWith(Label(1) + ": stream failed"));
  EXPECT_LT(absl::Now() - t0, absl::Seconds(2));

  servers_[1]->SetBehavior(Behavior::kCompute);
  servers_[1]->Start(port);
  st = backend->Compute(b.View(), out.data());
  ASSERT_TRUE(st.ok()) << st;
  ExpectRowsNear(out, Reference(b), kF32Rel);
}

// Tokens still in flight on a server (here: the unanswered request of a
// Compute that failed elsewhere) count as its load when replicas are chosen,
// until its reply comes back.
TEST_F(RemoteExpertBackendTest, ReplicasAreChosenByLiveLoad) {
  StartServers(WithReplicas());  // layer 2: {0, 1, 2}, {3, 4, 5}, {6, 7, 0}
  auto backend = Make(Options());
  ASSERT_NE(backend, nullptr);
  // Every token: the given experts, nothing else.
  auto batch = [](std::vector<int32_t> experts, int64_t tokens, uint32_t seed) {
    HostBatch b = RandomBatch(2, tokens, false, seed);
    b.ids.clear();
    b.weights.clear();
    b.offsets = {0};
    for (int64_t t = 0; t < tokens; ++t) {
      for (int32_t e : experts) {
        b.ids.push_back(e);
        b.weights.push_back(0.5f);
      }
      b.offsets.push_back(static_cast<int32_t>(b.ids.size()));
    }
    return b;
  };
  auto tokens_received = [](FakeExpertServer& s) {
    int64_t n = 0;
    for (const Received& r : s.TakeReceived()) n += r.msg.x().rows();
    return n;
  };
  auto compute_ok = [&](const HostBatch& b) {
    std::vector<float> out(b.tokens() * kHidden);
    absl::Status st = backend->Compute(b.View(), out.data());
    ASSERT_TRUE(st.ok()) << st;
    ExpectRowsNear(out, Reference(b), kF32Rel);
  };

  // Idle: expert 0's tokens alternate between its replicas on servers 0 and 2.
  compute_ok(batch({0}, 4, 1));
  EXPECT_EQ(tokens_received(*servers_[0]), 2);
  EXPECT_EQ(tokens_received(*servers_[2]), 2);

  // 20 tokens left in flight on server 0 (slow) when server 1 fails the Compute.
  constexpr absl::Duration kDelay = absl::Milliseconds(300);
  servers_[0]->SetReplyDelay(kDelay);
  servers_[1]->SetBehavior(Behavior::kError, static_cast<int>(grpc::StatusCode::INTERNAL), "x");
  HostBatch stuck = batch({1, 3}, 20, 2);
  std::vector<float> out(stuck.tokens() * kHidden);
  EXPECT_EQ(backend->Compute(stuck.View(), out.data()).code(), absl::StatusCode::kInternal);
  for (int i = 0; i < 200 && tokens_received(*servers_[0]) == 0; ++i) {
    absl::SleepFor(absl::Milliseconds(5));  // until server 0 has read it
  }
  servers_[0]->SetReplyDelay(absl::ZeroDuration());  // for what comes next

  // Now expert 0's tokens all go to server 2.
  compute_ok(batch({0}, 4, 3));
  EXPECT_EQ(tokens_received(*servers_[0]), 0);
  EXPECT_EQ(tokens_received(*servers_[2]), 4);

  // Once the late reply is in (and dropped), server 0 is idle again.
  absl::SleepFor(kDelay + absl::Milliseconds(300));
  compute_ok(batch({0}, 4, 4));
  EXPECT_EQ(tokens_received(*servers_[0]), 2);
  EXPECT_EQ(tokens_received(*servers_[2]), 2);
}

TEST_F(RemoteExpertBackendTest, MalformedRepliesAreInternal) {
  StartServers(Contiguous(2));
  auto backend = Make(Options());
  ASSERT_NE(backend, nullptr);
  HostBatch b = RandomBatch(1, 12, true, 51);
  std::vector<float> out(b.tokens() * kHidden);

  servers_[1]->SetBehavior(Behavior::kWrongRows);
  absl::Status st = backend->Compute(b.View(), out.data());
  EXPECT_EQ(st.code(), absl::StatusCode::kInternal) << st;
  EXPECT_THAT(std::string(st.message()), StartsWith(Label(1) + ": request "));
  EXPECT_THAT(std::string(st.message()), HasSubstr("rows"));

  servers_[1]->SetBehavior(Behavior::kWrongId);
  st = backend->Compute(b.View(), out.data());
  EXPECT_EQ(st.code(), absl::StatusCode::kInternal) << st;
  EXPECT_THAT(std::string(st.message()), HasSubstr("expected request"));

  servers_[1]->SetBehavior(Behavior::kCompute);
  st = backend->Compute(b.View(), out.data());
  ASSERT_TRUE(st.ok()) << st;
  ExpectRowsNear(out, Reference(b), kF32Rel);
}

TEST_F(RemoteExpertBackendTest, InvalidBatchesAreRejectedBeforeSending) {
  StartServers(Contiguous(2));
  auto backend = Make(Options());
  ASSERT_NE(backend, nullptr);
  HostBatch b = RandomBatch(1, 4, true, 61);
  std::vector<float> out(b.tokens() * kHidden);

  HostBatch bad = b;
  bad.offsets[2] = 1;
  absl::Status st = backend->Compute(bad.View(), out.data());
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(st.message()), HasSubstr("token_offsets decrease at token 1"));

  bad = b;
  bad.weights.pop_back();
  st = backend->Compute(bad.View(), out.data());
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(st.message()), HasSubstr("weights for"));

  bad = b;
  bad.ids[0] = -5;
  st = backend->Compute(bad.View(), out.data());
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(st.message()), HasSubstr("invalid FFN id -5"));

  bad = b;
  bad.weights[kTopK] = 0.5f;  // token 0's shared FFN
  st = backend->Compute(bad.View(), out.data());
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(st.message()), HasSubstr("shared FFN weight"));

  bad = b;
  bad.ids[1] = 99;
  st = backend->Compute(bad.View(), out.data());
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(st.message()), HasSubstr("expert 99 has no replica"));

  bad = b;
  bad.layer = 0;  // dense layer: no routed experts anywhere
  st = backend->Compute(bad.View(), out.data());
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition);

  EXPECT_TRUE(servers_[0]->TakeReceived().empty());
  EXPECT_TRUE(servers_[1]->TakeReceived().empty());
}

TEST_F(RemoteExpertBackendTest, RouterSharedDutyNeedsTheLocalSharedFfn) {
  StartServers(Contiguous(2));
  auto made = MakeRemoteExpertBackend(Options(common::WireDType::kF32, place::SharedDuty::kRouter));
  ASSERT_TRUE(made.ok());
  core::ExpertBackend& backend = **made;
  HostBatch b = RandomBatch(1, 3, true, 71);
  std::vector<float> out(b.tokens() * kHidden);
  absl::Status st = backend.Compute(b.View(), out.data());
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(st.message()),
              HasSubstr("layer 1: shared FFN is not loaded on the router"));
  EXPECT_TRUE(servers_[0]->TakeReceived().empty());
}

// ---- the local interface ---------------------------------------------------------

TEST_F(RemoteExpertBackendTest, LocalInterface) {
  placement_ = Contiguous(2);
  RemoteExpertOptions o;
  o.servers = {"127.0.0.1:1", "127.0.0.1:2"};
  o.placement = placement_;
  o.shared_duty = place::SharedDuty::kRouter;
  auto made = MakeRemoteExpertBackend(o);
  ASSERT_TRUE(made.ok()) << made.status();
  core::ExpertBackend& b = **made;
  EXPECT_EQ(b.Name(), "remote(2 servers)");
  EXPECT_EQ(b.WeightBytes(), 0u);
  EXPECT_TRUE(b.HasFfn(1, 5));
  EXPECT_FALSE(b.HasFfn(1, 8));
  EXPECT_FALSE(b.HasFfn(0, 0)) << "dense layer";
  EXPECT_FALSE(b.HasFfn(1, kSharedFfn)) << "router duty, not loaded yet";

  absl::Status st = weights_.LoadInto(b, 1, 3);
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(st.message()), HasSubstr("routed experts live on the expert servers"));
  ASSERT_TRUE(weights_.LoadInto(b, 1, kSharedFfn).ok());
  EXPECT_TRUE(b.HasFfn(1, kSharedFfn));
  EXPECT_GT(b.WeightBytes(), 0u);
  EXPECT_EQ(b.UnloadFfn(1, 3).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(b.UnloadFfn(1, kSharedFfn).ok());
  EXPECT_EQ(b.WeightBytes(), 0u);

  o.shared_duty = place::SharedDuty::kExpertServers;
  auto servers_duty = MakeRemoteExpertBackend(o);
  ASSERT_TRUE(servers_duty.ok());
  EXPECT_TRUE((*servers_duty)->HasFfn(1, kSharedFfn)) << "every server holds the shared FFN";

  o.servers.push_back("127.0.0.1:3");
  auto wrong = MakeRemoteExpertBackend(o);
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(wrong.status().message()), HasSubstr("3 servers given"));
}

// ---- failover ------------------------------------------------------------------

TEST_F(RemoteExpertBackendTest, ServerGoneWithReplicas_ItsTokensGoToReplicasAndNothingFails) {
  StartServers(FullyReplicated());
  auto backend = Make(Options());
  ASSERT_NE(backend, nullptr);
  HostBatch b = RandomBatch(1, 24, true, 81);
  std::vector<float> out(b.tokens() * kHidden);
  ASSERT_TRUE(backend->Compute(b.View(), out.data()).ok());
  for (auto& s : servers_) s->TakeReceived();

  servers_[1]->Stop();  // between batches: its stream breaks while idle
  absl::Status st = backend->Compute(b.View(), out.data());
  ASSERT_TRUE(st.ok()) << st;
  ExpectRowsNear(out, Reference(b), kF32Rel);
  // A server dying with a request out: the same.
  servers_[1]->Start(servers_[1]->port());
  for (int i = 0; i < 5 && backend->Compute(b.View(), out.data()).ok(); ++i) {
    absl::SleepFor(absl::Milliseconds(100));  // until server 1 is used again
  }
  servers_[1]->SetBehavior(Behavior::kSilent);
  HostBatch c = RandomBatch(2, 24, true, 82);
  std::vector<float> out_c(c.tokens() * kHidden);
  std::thread killer([&] {
    for (int i = 0; i < 400 && servers_[1]->TakeReceived().empty(); ++i) {
      absl::SleepFor(absl::Milliseconds(5));
    }
    servers_[1]->Stop();
  });
  st = backend->Compute(c.View(), out_c.data());
  killer.join();
  ASSERT_TRUE(st.ok()) << st;
  ExpectRowsNear(out_c, Reference(c), kF32Rel);

  // The failed server is avoided while its experts have replicas elsewhere.
  servers_[0]->TakeReceived();
  servers_[2]->TakeReceived();
  const absl::Time t0 = absl::Now();
  st = backend->Compute(c.View(), out_c.data());
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_LT(absl::Now() - t0, absl::Milliseconds(200)) << "no connection attempt to wait for";
  ExpectRowsNear(out_c, Reference(c), kF32Rel);
}

TEST_F(RemoteExpertBackendTest, SilentServerWithReplicas_TokensAreResentAtTheDeadline) {
  StartServers(FullyReplicated());
  servers_[2]->SetBehavior(Behavior::kSilent);
  RemoteExpertOptions o = Options();
  o.deadline = std::chrono::milliseconds(200);
  auto backend = Make(o);
  ASSERT_NE(backend, nullptr);
  HostBatch b = RandomBatch(1, 16, true, 83);
  std::vector<float> out(b.tokens() * kHidden);
  const absl::Time t0 = absl::Now();
  absl::Status st = backend->Compute(b.View(), out.data());
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_GE(absl::Now() - t0, absl::Milliseconds(195)) << "server 2 had work to miss";
  ExpectRowsNear(out, Reference(b), kF32Rel);
}

TEST_F(RemoteExpertBackendTest, DrainingOrOverloadedServerFailsOverInBand) {
  StartServers(FullyReplicated());
  auto backend = Make(Options());
  ASSERT_NE(backend, nullptr);
  HostBatch b = RandomBatch(2, 16, true, 84);
  std::vector<float> out(b.tokens() * kHidden);
  // FAILED_PRECONDITION: a server restarted at its address holds no slots
  // ("placement version 1 not held (holding 0)") until the controller reloads it.
  for (grpc::StatusCode code : {grpc::StatusCode::UNAVAILABLE, grpc::StatusCode::RESOURCE_EXHAUSTED,
                                grpc::StatusCode::FAILED_PRECONDITION}) {
    servers_[0]->SetBehavior(Behavior::kError, static_cast<int>(code), "not now");
    absl::Status st = backend->Compute(b.View(), out.data());
    ASSERT_TRUE(st.ok()) << st;
    ExpectRowsNear(out, Reference(b), kF32Rel);
  }
}

// Layer 1 of WithReplicas: expert 7 lives only on server 2, experts 0 and 1
// also elsewhere. With server 2 gone, exactly the tokens routed to expert 7
// fail (and are named); the others are served by replicas.
TEST_F(RemoteExpertBackendTest, ServerGone_OnlyTokensWithoutAReplicaFailAndAreNamed) {
  StartServers(WithReplicas());
  auto backend = Make(Options());
  ASSERT_NE(backend, nullptr);
  HostBatch b = RandomBatch(1, 40, true, 85);
  std::vector<int32_t> want_failed;
  for (int64_t t = 0; t < b.tokens(); ++t) {
    for (int32_t a = b.offsets[t]; a < b.offsets[t + 1]; ++a) {
      if (b.ids[a] == 7) want_failed.push_back(static_cast<int32_t>(t));
    }
  }
  ASSERT_FALSE(want_failed.empty());
  ASSERT_LT(want_failed.size(), 40u);
  servers_[2]->Stop();
  std::vector<float> out(b.tokens() * kHidden, -7.0f);
  absl::Status st = backend->Compute(b.View(), out.data());
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
  EXPECT_THAT(std::string(st.message()), StartsWith(Label(2) + ": stream failed"));
  EXPECT_THAT(std::string(st.message()), HasSubstr("no replica on another server"));
  EXPECT_EQ(core::FailedTokens(st), want_failed);
  EXPECT_TRUE(std::all_of(out.begin(), out.end(), [](float v) { return v == -7.0f; }));

  // Without those tokens the batch goes through.
  HostBatch rest{.layer = 1, .hidden = kHidden};
  for (int64_t t = 0; t < b.tokens(); ++t) {
    if (std::binary_search(want_failed.begin(), want_failed.end(), t)) continue;
    rest.x.insert(rest.x.end(), b.x.begin() + t * kHidden, b.x.begin() + (t + 1) * kHidden);
    for (int32_t a = b.offsets[t]; a < b.offsets[t + 1]; ++a) {
      rest.ids.push_back(b.ids[a]);
      rest.weights.push_back(b.weights[a]);
    }
    rest.offsets.push_back(static_cast<int32_t>(rest.ids.size()));
  }
  std::vector<float> rest_out(rest.tokens() * kHidden);
  st = backend->Compute(rest.View(), rest_out.data());
  ASSERT_TRUE(st.ok()) << st;
  ExpectRowsNear(rest_out, Reference(rest), kF32Rel);
}

TEST_F(RemoteExpertBackendTest, SeveralBatchesInFlightAreAwaitedInAnyOrder) {
  StartServers(WithReplicas());
  servers_[1]->SetReplyDelay(absl::Milliseconds(50));
  auto backend = Make(Options(common::WireDType::kF32, place::SharedDuty::kRouter));
  ASSERT_NE(backend, nullptr);
  HostBatch b1 = RandomBatch(1, 10, true, 86), b2 = RandomBatch(2, 7, true, 87),
            b3 = RandomBatch(1, 5, false, 88);
  std::vector<float> o1(b1.tokens() * kHidden), o2(b2.tokens() * kHidden),
      o3(b3.tokens() * kHidden);
  auto t1 = backend->Submit(b1.View(), o1.data());
  auto t2 = backend->Submit(b2.View(), o2.data());
  auto t3 = backend->Submit(b3.View(), o3.data());
  ASSERT_TRUE(t1.ok() && t2.ok() && t3.ok());
  ASSERT_TRUE(backend->Await(*t2).ok());
  ASSERT_TRUE(backend->Await(*t1).ok());
  backend->Cancel(*t3);
  ExpectRowsNear(o1, Reference(b1), kF32Rel);
  ExpectRowsNear(o2, Reference(b2), kF32Rel);
  EXPECT_EQ(backend->Await(*t3).code(), absl::StatusCode::kInvalidArgument) << "cancelled";
  // The cancelled batch's late replies are not taken for the next one's.
  std::vector<float> o4(b3.tokens() * kHidden);
  ASSERT_TRUE(backend->Compute(b3.View(), o4.data()).ok());
  ExpectRowsNear(o4, Reference(b3), kF32Rel);
}

// ---- live placement switch --------------------------------------------------------

TEST_F(RemoteExpertBackendTest, SwitchPlacementTakesEffectBetweenBatches) {
  StartServers(FullyReplicated());  // what the servers hold; routing starts narrower
  RemoteExpertOptions o = Options();
  o.placement = Contiguous(2);  // version 3 over servers 0 and 1
  o.servers.pop_back();
  auto made = MakeRemoteExperts(o);
  ASSERT_TRUE(made.ok()) << made.status();
  core::ExpertBackend& backend = *made->backend;
  RemoteExpertControl& control = *made->control;
  EXPECT_EQ(control.placement().version(), 3u);
  EXPECT_EQ(control.servers().size(), 2u);
  HostBatch b = RandomBatch(1, 12, true, 91);
  std::vector<float> out(b.tokens() * kHidden);
  ASSERT_TRUE(backend.Compute(b.View(), out.data()).ok());
  EXPECT_TRUE(servers_[2]->TakeReceived().empty());
  for (auto& s : servers_) s->TakeReceived();

  // Outstanding batch: the switch waits for it to be awaited.
  auto ticket = backend.Submit(b.View(), out.data());
  ASSERT_TRUE(ticket.ok());
  std::atomic<bool> switched{false};
  std::vector<std::string> addresses;
  for (auto& s : servers_) addresses.push_back(s->address());
  std::thread controller([&] {
    absl::Status st = control.SwitchPlacement(FullyReplicated(), addresses, absl::Seconds(10));
    EXPECT_TRUE(st.ok()) << st;
    switched = true;
  });
  absl::SleepFor(absl::Milliseconds(100));
  EXPECT_FALSE(switched) << "switched with a batch outstanding";
  ASSERT_TRUE(backend.Await(*ticket).ok());
  controller.join();
  EXPECT_EQ(control.placement().version(), 11u);
  for (int s = 0; s < 2; ++s) {
    for (const Received& r : servers_[s]->TakeReceived()) EXPECT_EQ(r.msg.placement_version(), 3u);
  }

  // From now on: the new version, and server 2 is used.
  placement_ = FullyReplicated();
  HostBatch c = RandomBatch(2, 30, true, 92);
  std::vector<float> out_c(c.tokens() * kHidden);
  ASSERT_TRUE(backend.Compute(c.View(), out_c.data()).ok());
  ExpectRowsNear(out_c, Reference(c), kF32Rel);
  ExpectRequestsFollowPlacement(c, place::SharedDuty::kExpertServers);

  // Errors: sizes, and a switch that finds no step boundary in time.
  EXPECT_EQ(control.SwitchPlacement(FullyReplicated(), {"a:1"}, absl::Seconds(1)).code(),
            absl::StatusCode::kInvalidArgument);
  auto held = backend.Submit(c.View(), out_c.data());
  ASSERT_TRUE(held.ok());
  EXPECT_EQ(control.SwitchPlacement(Contiguous(3), addresses, absl::Milliseconds(50)).code(),
            absl::StatusCode::kDeadlineExceeded);
  ASSERT_TRUE(backend.Await(*held).ok());
  EXPECT_EQ(control.placement().version(), 11u) << "a timed-out switch does not happen later";
}

// Pooled request messages and reply buffers keep a decode step's capacity,
// not a prefill's: after a batch whose requests and replies are each over
// 256 KiB per server, the pools hold no more than after a 4-token batch plus
// one buffer (issue 13: the router's RSS grew in steps as each pooled object
// reached the largest message it ever held; here that would be ~4 MB).
TEST_F(RemoteExpertBackendTest, PoolsDoNotKeepTheLargestBatchesBuffers) {
  StartServers(Contiguous(2));
  auto made = MakeRemoteExperts(Options());
  ASSERT_TRUE(made.ok()) << made.status();
  core::ExpertBackend& backend = *made->backend;
  const HostBatch small = RandomBatch(1, 4, true, 91);
  std::vector<float> out(small.tokens() * kHidden);
  ASSERT_TRUE(backend.Compute(small.View(), out.data()).ok());
  const size_t after_small = made->control->PooledBufferBytes();
  EXPECT_GT(after_small, 0u) << "a decode-sized batch's buffers are pooled for the next one";

  // 12000 tokens: ~6000 per server, 384 KB of activations and 1.5 MB of
  // reply rows (4 per token) each.
  const HostBatch large = RandomBatch(2, 12000, true, 92);
  out.assign(large.tokens() * kHidden, 0.0f);
  ASSERT_TRUE(backend.Compute(large.View(), out.data()).ok());
  ExpectRowsNear(out, Reference(large), kF32Rel);
  EXPECT_LT(made->control->PooledBufferBytes(), after_small + (size_t{256} << 10));

  // And the pools still serve: the same small batch, the same bits.
  std::vector<float> again(small.tokens() * kHidden);
  ASSERT_TRUE(backend.Compute(small.View(), again.data()).ok());
  ExpectRowsNear(again, Reference(small), kF32Rel);
}

// ---- the conformance suite every ExpertBackend runs ----------------------------

// Three test-double servers, every expert on two of them, f32 on the wire: a
// token's result is the in-process CPU backend's bits, whatever the split.
absl::StatusOr<testing::BackendUnderTest> RemoteOverThreeServers(const testing::ConformanceModel& m,
                                                                 place::SharedDuty duty) {
  auto servers = std::make_shared<std::vector<std::unique_ptr<FakeExpertServer>>>();
  const place::Placement p = FullyReplicated();
  for (int s = 0; s < p.num_servers(); ++s) {
    servers->push_back(std::make_unique<FakeExpertServer>(
        s, p, [&m](core::ExpertBackend& b, int32_t l, int32_t f) {
          return b.LoadFfn(l, f, m.Ffn(l, f).View());
        }));
    servers->back()->Start();
  }
  RemoteExpertOptions o;
  for (const auto& s : *servers) o.servers.push_back(s->address());
  o.placement = p;
  o.wire_dtype = common::WireDType::kF32;
  o.shared_duty = duty;
  o.local_compute = core::ComputeType::kF32;
  o.deadline = std::chrono::milliseconds(10000);
  absl::StatusOr<std::unique_ptr<core::ExpertBackend>> b = MakeRemoteExpertBackend(o);
  if (!b.ok()) return b.status();
  if (duty == place::SharedDuty::kRouter) {
    for (int32_t l : kMoeLayers) {
      const absl::Status st = (*b)->LoadFfn(l, kSharedFfn, m.Ffn(l, kSharedFfn).View());
      if (!st.ok()) return st;
    }
  }
  testing::BackendUnderTest out;
  out.keep_alive = servers;
  out.backend = *std::move(b);
  return out;
}

INSTANTIATE_TEST_SUITE_P(
    Remote, ExpertBackendConformance,
    ::testing::Values(testing::ConformanceParam{.name = "SharedOnServers",
                                                .make =
                                                    [](const testing::ConformanceModel& m) {
                                                      return RemoteOverThreeServers(
                                                          m, place::SharedDuty::kExpertServers);
                                                    }},
                      testing::ConformanceParam{.name = "SharedOnRouter",
                                                .make =
                                                    [](const testing::ConformanceModel& m) {
                                                      return RemoteOverThreeServers(
                                                          m, place::SharedDuty::kRouter);
                                                    }}),
    testing::ConformanceName);

}  // namespace
}  // namespace dmoe::router
