// The expert server's Dispatch request decoding: a serialized
// dmoe.v1.ExpertRequest (as gRPC hands it over) is parsed, validated as
// ComputeWorker::Append does (ValidateExpertRequest + ValidateExpertChunk
// against the tiny-v2lite config and a slot table holding experts 0-7 of
// every MoE layer in placement version 1), and its activations decoded into a
// buffer of exactly rows x hidden floats.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "common/wire.h"
#include "core/config.h"
#include "dmoe/v1/expert.pb.h"
#include "expert_service/internal/request_validation.h"
#include "expert_service/internal/slot_table.h"
#include "fuzz/fuzz_data.h"

namespace {

using dmoe::expert::internal::SlotTable;

struct Fixture {
  dmoe::core::ModelConfig cfg;
  std::unique_ptr<SlotTable> slots;
};

const Fixture& Fix() {
  static const auto* f = [] {
    auto* f = new Fixture();
    f->cfg = *dmoe::fuzz::ValueOrDie(
        dmoe::core::ModelConfig::FromJson(dmoe::fuzz::ReadDataFile("config.json")), "config");
    dmoe::expert::internal::LayerSlots held(f->cfg.num_hidden_layers);
    for (int64_t l = 0; l < f->cfg.num_hidden_layers; ++l) {
      if (!f->cfg.IsMoeLayer(l)) continue;
      for (int32_t e = 0; e < 8; ++e) held[l].push_back(e);
    }
    f->slots = dmoe::fuzz::ValueOrDie(SlotTable::Create(f->cfg, 0, 1, held), "slots").value();
    return f;
  }();
  return *f;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const Fixture& fix = Fix();
  dmoe::v1::ExpertRequest req;
  if (!req.ParseFromArray(data, static_cast<int>(size))) return 0;
  auto in_type = dmoe::expert::internal::ValidateExpertRequest(req, fix.cfg);
  if (!in_type.ok()) return 0;
  if (!dmoe::expert::internal::ValidateExpertChunk(req, req, fix.cfg, *in_type, *fix.slots, "")
           .ok())
    return 0;
  std::vector<float> x(static_cast<size_t>(req.x().rows()) * fix.cfg.hidden_size);
  (void)dmoe::common::UnpackActivations(*in_type, req.x().data(), req.x().row_scales(),
                                        req.x().rows(), fix.cfg.hidden_size, x.data());
  return 0;
}
