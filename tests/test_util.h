// Helpers shared by tests: generated checkpoints and config patches. Fresh
// directories (FreshDir) come from testing/files.h, included here.
#ifndef DMOE_TESTS_TEST_UTIL_H_
#define DMOE_TESTS_TEST_UTIL_H_

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "testing/files.h"
#include "tools/make_model.h"

namespace dmoe::testing {

// Writes a generated checkpoint of `preset` and returns its directory.
inline std::string MakeModel(const std::string& preset, uint64_t seed = 1,
                             tools::WeightFormat format = tools::WeightFormat::kBF16,
                             int shards = 1, int layers = 0) {
  tools::MakeModelOptions o;
  o.preset = preset;
  o.out_dir = FreshDir(preset + "_" + std::to_string(seed) + "_" +
                       std::to_string(static_cast<int>(format)) + "_" + std::to_string(shards));
  o.seed = seed;
  o.format = format;
  o.shards = shards;
  o.layers = layers;
  auto st = tools::WriteRandomModel(o);
  EXPECT_TRUE(st.ok()) << st;
  return o.out_dir;
}

// Rewrites keys of DIR/config.json.
inline void PatchConfig(const std::string& dir, const nlohmann::json& patch) {
  const std::string path = dir + "/config.json";
  nlohmann::json j;
  {
    std::ifstream in(path);
    in >> j;
  }
  j.merge_patch(patch);
  std::ofstream(path) << j.dump(2);
}

}  // namespace dmoe::testing

#endif  // DMOE_TESTS_TEST_UTIL_H_
