// Placement JSON (as `dmoe plan` writes and the router loads) to
// Placement::FromJson against the tiny-v2lite config; an accepted placement
// must survive ToJson -> FromJson.
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "core/config.h"
#include "fuzz/fuzz_data.h"
#include "nlohmann/json.hpp"
#include "placement/placement.h"

namespace {
const dmoe::core::ModelConfig& Config() {
  static const auto* cfg = new dmoe::core::ModelConfig(*dmoe::fuzz::ValueOrDie(
      dmoe::core::ModelConfig::FromJson(dmoe::fuzz::ReadDataFile("config.json")), "config"));
  return *cfg;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto& cfg = Config();
  nlohmann::json j = nlohmann::json::parse(data, data + size, nullptr,
                                           /*allow_exceptions=*/false);
  if (j.is_discarded()) return 0;
  auto p = dmoe::place::Placement::FromJson(j, cfg);
  if (!p.ok()) return 0;
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    if (!cfg.IsMoeLayer(l)) continue;
    for (int s = 0; s < p->num_servers(); ++s) (void)p->Slots(l, s);
  }
  if (!dmoe::place::Placement::FromJson(p->ToJson(), cfg).ok()) std::abort();
  return 0;
}
