// config.json's text to ModelConfig::FromJson; an accepted config is used as
// the rest of the code uses it (layer kinds, head dims, softmax scale).
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto cfg =
      dmoe::core::ModelConfig::FromJson(std::string(reinterpret_cast<const char*>(data), size));
  if (!cfg.ok()) return 0;
  volatile int64_t sink = cfg->QHeadDim();
  for (int64_t i = 0; i < cfg->num_hidden_layers && i < 1024; ++i) sink = cfg->IsMoeLayer(i);
  volatile double scale = cfg->SoftmaxScale();
  (void)sink;
  (void)scale;
  return 0;
}
