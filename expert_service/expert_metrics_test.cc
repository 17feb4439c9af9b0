#include "expert_service/expert_metrics.h"

#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/wire.h"
#include "dmoe/v1/expert.grpc.pb.h"
#include "expert_service/expert_server.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "placement/placement.h"
#include "prometheus/registry.h"
#include "tests/test_util.h"

namespace dmoe::expert {
namespace {

using internal::LayerExpert;

// The metric `name` with exactly `labels`, or null.
const prometheus::ClientMetric* Find(const std::vector<prometheus::MetricFamily>& families,
                                     const std::string& name, prometheus::Labels labels = {}) {
  for (const auto& f : families) {
    if (f.name != name) continue;
    for (const auto& m : f.metric) {
      prometheus::Labels got;
      for (const auto& l : m.label) got[l.name] = l.value;
      if (got == labels) return &m;
    }
  }
  return nullptr;
}

double Value(const std::vector<prometheus::MetricFamily>& families, const std::string& name,
             prometheus::Labels labels = {}) {
  const prometheus::ClientMetric* m = Find(families, name, labels);
  EXPECT_NE(m, nullptr) << name;
  return m == nullptr ? -1 : m->counter.value + m->gauge.value;
}

size_t SeriesCount(const std::vector<prometheus::MetricFamily>& families, const std::string& name) {
  for (const auto& f : families) {
    if (f.name == name) return f.metric.size();
  }
  return 0;
}

core::ModelConfig Config() {
  core::ModelConfig c;
  c.num_hidden_layers = 3;
  c.first_k_dense_replace = 1;
  c.n_routed_experts = 4;
  c.num_experts_per_tok = 2;
  return c;
}

TEST(ExpertMetrics, BatchesCountTokensPerSlotAndTime) {
  prometheus::Registry registry;
  ExpertMetrics m(registry, Config());
  const std::vector<int32_t> held = {2, 3};
  m.DeclareSlots(1, held);
  auto fams = registry.Collect();
  EXPECT_EQ(SeriesCount(fams, "moe_expert_slot_tokens_total"), 2u);
  EXPECT_EQ(Value(fams, "moe_expert_slot_tokens_total", {{"layer", "1"}, {"expert", "3"}}), 0);

  const std::vector<std::pair<LayerExpert, uint64_t>> counts = {{{1, 2}, 5}, {{1, 3}, 7}};
  m.OnBatch(1, 9, absl::Microseconds(700), counts);
  m.OnBatch(2, 1, absl::Milliseconds(2),
            std::vector<std::pair<LayerExpert, uint64_t>>{{{2, 0}, 1}});
  m.OnAnswered(absl::StatusCode::kOk);
  m.OnAnswered(absl::StatusCode::kOk);
  m.OnAnswered(absl::StatusCode::kFailedPrecondition);
  m.OnQueueDepth(4);
  m.SetResidentWeightBytes(12345);
  m.SetPlacementVersion(3);
  fams = registry.Collect();
  EXPECT_EQ(Value(fams, "moe_expert_slot_tokens_total", {{"layer", "1"}, {"expert", "2"}}), 5);
  EXPECT_EQ(Value(fams, "moe_expert_slot_tokens_total", {{"layer", "1"}, {"expert", "3"}}), 7);
  // Made on first use when not declared.
  EXPECT_EQ(Value(fams, "moe_expert_slot_tokens_total", {{"layer", "2"}, {"expert", "0"}}), 1);
  const auto* h = Find(fams, "moe_expert_compute_seconds");
  ASSERT_NE(h, nullptr);
  EXPECT_EQ(h->histogram.sample_count, 2u);
  EXPECT_NEAR(h->histogram.sample_sum, 0.0027, 1e-12);
  const auto* t = Find(fams, "moe_expert_batch_tokens");
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->histogram.sample_sum, 10);
  EXPECT_EQ(Value(fams, "moe_expert_requests_total", {{"code", "OK"}}), 2);
  EXPECT_EQ(Value(fams, "moe_expert_requests_total", {{"code", "FAILED_PRECONDITION"}}), 1);
  EXPECT_EQ(Value(fams, "moe_expert_queue_depth"), 4);
  EXPECT_EQ(
      Value(fams, "moe_expert_resident_weight_bytes", {{"device", "cpu"}, {"format", "bf16"}}),
      12345);
  EXPECT_EQ(Value(fams, "moe_expert_placement_version"), 3);
}

TEST(ExpertMetrics, PerLayerModeSumsTheLayerUnderExpertAll) {
  prometheus::Registry registry;
  ExpertMetrics m(registry, Config(), {.per_expert = false});
  const std::vector<int32_t> held = {2, 3};
  m.DeclareSlots(1, held);
  m.OnBatch(1, 9, absl::Microseconds(700),
            std::vector<std::pair<LayerExpert, uint64_t>>{{{1, 2}, 5}, {{1, 3}, 7}});
  const auto fams = registry.Collect();
  EXPECT_EQ(SeriesCount(fams, "moe_expert_slot_tokens_total"), 2u);  // MoE layers 1 and 2
  EXPECT_EQ(Value(fams, "moe_expert_slot_tokens_total", {{"layer", "1"}, {"expert", "all"}}), 12);
  EXPECT_EQ(Value(fams, "moe_expert_slot_tokens_total", {{"layer", "2"}, {"expert", "all"}}), 0);
}

// The server's hooks: slots declared, weights and version set at start and on
// LoadSlots, every answered request counted by code, tokens per slot.
TEST(ExpertMetrics, ServerReportsItsSlotsWeightsVersionAndRequests) {
  const std::string dir = testing::MakeModel("tiny-v3", 3, tools::WeightFormat::kF32);
  auto cfg = core::ModelConfig::FromFile(dir + "/config.json");
  ASSERT_TRUE(cfg.ok()) << cfg.status();
  prometheus::Registry registry;
  ExpertMetrics metrics(registry, *cfg);
  ExpertServerOptions o;
  o.model_dir = dir;
  o.server_index = 1;
  o.placement = *place::Placement::Contiguous(*cfg, 2);
  o.compute = core::ComputeType::kF32;
  o.metrics = &metrics;
  const place::Placement placement = o.placement;
  auto server = ExpertServer::Create(o);
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_TRUE((*server)->Start("127.0.0.1", 0).ok());

  int64_t layer = 0;
  while (!cfg->IsMoeLayer(layer)) ++layer;
  const std::vector<int32_t>& held = placement.Slots(layer, 1);
  ASSERT_GE(held.size(), 2u);
  auto fams = registry.Collect();
  EXPECT_EQ(
      Value(fams, "moe_expert_resident_weight_bytes", {{"device", "cpu"}, {"format", "bf16"}}),
      static_cast<double>((*server)->resident_weight_bytes()));
  EXPECT_EQ(Value(fams, "moe_expert_placement_version"), 1);
  EXPECT_EQ(Value(fams, "moe_expert_slot_tokens_total",
                  {{"layer", std::to_string(layer)}, {"expert", std::to_string(held[0])}}),
            0);

  // Three tokens: held[0]; held[0] + held[1]; held[1] with shared duty.
  const int64_t H = cfg->hidden_size;
  v1::ExpertRequest req;
  req.set_request_id(1);
  req.set_layer(static_cast<uint32_t>(layer));
  req.set_placement_version(1);
  std::vector<float> x(3 * H, 0.5f);
  req.mutable_x()->set_dtype(v1::ACTIVATION_DTYPE_F32);
  req.mutable_x()->set_rows(3);
  req.mutable_x()->set_cols(static_cast<uint32_t>(H));
  common::PackActivations(x.data(), 3, H, 0, common::WireDType::kF32,
                          req.mutable_x()->mutable_data(), req.mutable_x()->mutable_row_scales());
  for (int32_t off : {0, 1, 3, 4}) req.add_token_offsets(off);
  for (int32_t e : {held[0], held[0], held[1], held[1]}) {
    req.add_expert_ids(e);
    req.add_weights(0.5f);
  }
  for (bool d : {false, false, true}) req.add_shared_duty(d);
  v1::ExpertRequest stale = req;
  stale.set_request_id(2);
  stale.set_placement_version(7);

  auto stub = v1::ExpertService::NewStub((*server)->InProcessChannel());
  {
    grpc::ClientContext ctx;
    auto stream = stub->Dispatch(&ctx);
    ASSERT_TRUE(stream->Write(req));
    v1::ExpertResponse resp;
    ASSERT_TRUE(stream->Read(&resp));
    EXPECT_EQ(resp.error_code(), 0) << resp.error_message();
    ASSERT_TRUE(stream->Write(stale));
    ASSERT_TRUE(stream->Read(&resp));
    EXPECT_EQ(resp.error_code(), static_cast<int>(absl::StatusCode::kFailedPrecondition));
    stream->WritesDone();
    EXPECT_TRUE(stream->Finish().ok());
  }
  fams = registry.Collect();
  const std::string l = std::to_string(layer);
  EXPECT_EQ(Value(fams, "moe_expert_slot_tokens_total",
                  {{"layer", l}, {"expert", std::to_string(held[0])}}),
            2);
  EXPECT_EQ(Value(fams, "moe_expert_slot_tokens_total",
                  {{"layer", l}, {"expert", std::to_string(held[1])}}),
            2);
  EXPECT_EQ(Value(fams, "moe_expert_requests_total", {{"code", "OK"}}), 1);
  EXPECT_EQ(Value(fams, "moe_expert_requests_total", {{"code", "FAILED_PRECONDITION"}}), 1);
  const auto* batch = Find(fams, "moe_expert_batch_tokens");
  ASSERT_NE(batch, nullptr);
  EXPECT_EQ(batch->histogram.sample_count, 1u);
  EXPECT_EQ(batch->histogram.sample_sum, 3);
  EXPECT_EQ(Value(fams, "moe_expert_queue_depth"), 0);

  // Version 2 adds expert 0 of the layer: new series, more weights.
  v1::LoadSlotsRequest load;
  load.set_placement_version(2);
  auto* ls = load.add_slots();
  ls->set_layer(static_cast<uint32_t>(layer));
  ls->add_experts(0);
  v1::SlotsResponse slots_resp;
  grpc::ClientContext ctx;
  ASSERT_TRUE(stub->LoadSlots(&ctx, load, &slots_resp).ok());
  fams = registry.Collect();
  EXPECT_EQ(Value(fams, "moe_expert_placement_version"), 2);
  EXPECT_EQ(
      Value(fams, "moe_expert_resident_weight_bytes", {{"device", "cpu"}, {"format", "bf16"}}),
      static_cast<double>(slots_resp.resident_weight_bytes()));
  EXPECT_EQ(Value(fams, "moe_expert_slot_tokens_total", {{"layer", l}, {"expert", "0"}}), 0);
  (*server)->Shutdown(absl::ZeroDuration());
}

}  // namespace
}  // namespace dmoe::expert
