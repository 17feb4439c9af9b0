// Shared by the fuzz targets: the fixed inputs a target parses its fuzzed
// bytes against (the tiny-v2lite config, its tokenizer, DeepSeek-V3's chat
// template), read once from fuzz/data/ (DMOE_FUZZ_DATA_DIR, set by
// fuzz/CMakeLists.txt). A missing or invalid file aborts: that is a broken
// build, not a finding.
#ifndef DMOE_FUZZ_FUZZ_DATA_H_
#define DMOE_FUZZ_FUZZ_DATA_H_

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <utility>

namespace dmoe::fuzz {

inline std::string ReadDataFile(const std::string& name) {
  const std::string path = std::string(DMOE_FUZZ_DATA_DIR) + "/" + name;
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    std::fprintf(stderr, "fuzz: cannot read %s\n", path.c_str());
    std::abort();
  }
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

template <typename T>
T ValueOrDie(T&& v, const char* what) {
  if (!v.ok()) {
    std::fprintf(stderr, "fuzz: %s: %s\n", what, std::string(v.status().message()).c_str());
    std::abort();
  }
  return std::forward<T>(v);
}

}  // namespace dmoe::fuzz

#endif  // DMOE_FUZZ_FUZZ_DATA_H_
