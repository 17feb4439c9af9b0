// The `dmoe` binary end to end: make-model, forward --dump-logits, generate --json,
// --help everywhere, and clear errors with exit codes for bad flags and inputs.
#include <sys/wait.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

#include "core/expert_backend.h"
#include "core/model.h"
#include "core/npy.h"
#include "core/sampler.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/test_util.h"

namespace dmoe {
namespace {

struct RunResult {
  int exit_code = -1;
  std::string out, err;
};

std::string Bin() {
  const char* d = std::getenv("DMOE_BIN_DIR");
  return std::string(d ? d : "build/bin") + "/dmoe";
}

RunResult Dmoe(const std::string& args) {
  const std::string err_path = testing::FreshDir("stderr") + "/err.txt";
  const std::string cmd = Bin() + " " + args + " 2>" + err_path;
  RunResult r;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) r.out.append(buf, n);
  const int status = pclose(p);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream e(err_path);
  std::stringstream ss;
  ss << e.rdbuf();
  r.err = ss.str();
  return r;
}

TEST(Cli, EveryCommandHasHelp) {
  RunResult top = Dmoe("--help");
  EXPECT_EQ(top.exit_code, 0);
  for (const char* cmd : {"make-model", "forward", "generate"}) {
    EXPECT_NE(top.out.find(cmd), std::string::npos) << cmd;
    RunResult r = Dmoe(std::string(cmd) + " --help");
    EXPECT_EQ(r.exit_code, 0) << cmd << r.err;
    EXPECT_NE(r.out.find("usage: dmoe " + std::string(cmd)), std::string::npos) << r.out;
  }
}

TEST(Cli, ForwardDumpsLogitsAsNpyMatchingTheLibrary) {
  const std::string dir = testing::FreshDir("model");
  RunResult mk = Dmoe("make-model --preset tiny-v3 --out " + dir + " --seed 5");
  ASSERT_EQ(mk.exit_code, 0) << mk.err;
  const std::string npy = dir + "/logits.npy";
  RunResult fw = Dmoe("forward --model " + dir +
                      " --tokens 3,1,4,1,5 --dtype f32 --threads 1 --dump-logits " + npy);
  ASSERT_EQ(fw.exit_code, 0) << fw.err;
  auto arr = core::ReadNpyF32(npy);
  ASSERT_TRUE(arr.ok()) << arr.status();
  ASSERT_EQ(arr->shape, (std::vector<int64_t>{5, 512}));

  core::ModelOptions o;
  o.compute = core::ComputeType::kF32;
  auto m = core::Model::Load(dir, std::move(o));
  ASSERT_TRUE(m.ok());
  core::KvCache cache((*m)->config(), 1 << 24);
  const int32_t s = *cache.Allocate(5);
  std::vector<int32_t> toks = {3, 1, 4, 1, 5};
  core::SeqInput in{s, toks, true};
  std::vector<float> logits;
  ASSERT_TRUE((*m)->Forward({&in, 1}, cache, &logits).ok());
  ASSERT_EQ(logits.size(), arr->data.size());
  for (size_t i = 0; i < logits.size(); ++i) ASSERT_NEAR(arr->data[i], logits[i], 1e-5) << i;
}

// --expert-weights int8: the experts' weights quantised at load. The CLI's
// logits are the library's with an int8 CPU backend, bit for bit, and close
// to (but not the same as) the bf16 ones.
TEST(Cli, ForwardWithInt8ExpertWeights) {
  const std::string dir = testing::FreshDir("model");
  ASSERT_EQ(Dmoe("make-model --preset tiny-v2lite --out " + dir + " --seed 3").exit_code, 0);
  const std::string base = "forward --model " + dir + " --tokens 3,1,4,1,5,9,2,6 --threads 1";
  RunResult i8 = Dmoe(base + " --expert-weights int8 --dump-logits " + dir + "/i8.npy");
  ASSERT_EQ(i8.exit_code, 0) << i8.err;
  RunResult bf = Dmoe(base + " --dump-logits " + dir + "/bf.npy");
  ASSERT_EQ(bf.exit_code, 0) << bf.err;
  auto a = core::ReadNpyF32(dir + "/i8.npy"), b = core::ReadNpyF32(dir + "/bf.npy");
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_EQ(a->data.size(), b->data.size());

  core::ModelOptions o;
  o.compute = core::ComputeType::kBF16;
  o.experts = core::MakeCpuExpertBackend(core::ComputeType::kInt8);
  auto m = core::Model::Load(dir, std::move(o));
  ASSERT_TRUE(m.ok()) << m.status();
  core::KvCache cache((*m)->config(), 1 << 24);
  std::vector<int32_t> toks = {3, 1, 4, 1, 5, 9, 2, 6};
  const int32_t s = *cache.Allocate(static_cast<int64_t>(toks.size()));
  core::SeqInput in{s, toks, true};
  std::vector<float> logits;
  ASSERT_TRUE((*m)->Forward({&in, 1}, cache, &logits).ok());
  ASSERT_EQ(logits.size(), a->data.size());
  EXPECT_EQ(0, std::memcmp(logits.data(), a->data.data(), logits.size() * sizeof(float)));

  double err = 0, norm = 0;
  for (size_t i = 0; i < a->data.size(); ++i) {
    err += (double{a->data[i]} - b->data[i]) * (double{a->data[i]} - b->data[i]);
    norm += double{b->data[i]} * b->data[i];
  }
  EXPECT_GT(err, 0.0) << "int8 gave bf16's logits: not quantised";
  EXPECT_LT(std::sqrt(err / norm), 0.05);

  RunResult fp8 = Dmoe(base + " --expert-weights fp8");
  EXPECT_NE(fp8.exit_code, 0);
  EXPECT_NE(fp8.err.find("not kept as FP8 yet"), std::string::npos) << fp8.err;
}

TEST(Cli, GenerateJsonIsGreedyWithTheKvCache) {
  const std::string dir = testing::FreshDir("model");
  ASSERT_EQ(Dmoe("make-model --preset tiny-v2lite --out " + dir + " --seed 9").exit_code, 0);
  RunResult g =
      Dmoe("generate --model " + dir +
           " --tokens 1,2,3 --max-tokens 6 --dtype f32 --temperature 0 --ignore-eos --json");
  ASSERT_EQ(g.exit_code, 0) << g.err;
  auto j = nlohmann::json::parse(g.out);
  EXPECT_EQ(j["prompt_tokens"], nlohmann::json({1, 2, 3}));
  ASSERT_EQ(j["tokens"].size(), 6u);

  // The same greedy continuation from full recomputation without reuse.
  core::ModelOptions o;
  o.compute = core::ComputeType::kF32;
  auto m = core::Model::Load(dir, std::move(o));
  ASSERT_TRUE(m.ok());
  std::vector<int32_t> seq = {1, 2, 3};
  for (int i = 0; i < 6; ++i) {
    core::KvCache cache((*m)->config(), 1 << 24);
    const int32_t s = *cache.Allocate(static_cast<int64_t>(seq.size()));
    core::SeqInput in{s, seq, false};
    std::vector<float> logits;
    ASSERT_TRUE((*m)->Forward({&in, 1}, cache, &logits).ok());
    const int32_t next = core::ArgMax(logits);
    EXPECT_EQ(j["tokens"][i].get<int32_t>(), next) << "step " << i;
    seq.push_back(next);
  }
}

TEST(Cli, SampledGenerationIsReproducibleBySeed) {
  const std::string dir = testing::FreshDir("model");
  ASSERT_EQ(Dmoe("make-model --preset tiny-moe16b --out " + dir).exit_code, 0);
  const std::string base =
      "generate --model " + dir +
      " --tokens 7,8 --max-tokens 8 --temperature 1.5 --top-k 50 --top-p 0.9 --ignore-eos --json";
  RunResult a = Dmoe(base + " --seed 1"), b = Dmoe(base + " --seed 1");
  ASSERT_EQ(a.exit_code, 0) << a.err;
  EXPECT_EQ(a.out, b.out);
}

TEST(Cli, ErrorsAreClearWithExitCodes) {
  RunResult r = Dmoe("generate --model /nonexistent --tokens 1");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("/nonexistent"), std::string::npos) << r.err;

  r = Dmoe("generate --model /tmp --tokens 1 --bogus 3");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("--bogus"), std::string::npos) << r.err;

  r = Dmoe("forward --model /tmp --tokens 1,x");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("--tokens must be comma-separated integers"), std::string::npos) << r.err;
  r = Dmoe("forward --model /tmp");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("--tokens is required"), std::string::npos) << r.err;

  r = Dmoe("make-model --preset nope --out /tmp/x");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("tiny-v2lite"), std::string::npos) << r.err;

  const std::string dir = testing::FreshDir("model");
  ASSERT_EQ(Dmoe("make-model --preset tiny-v2lite --out " + dir).exit_code, 0);
  r = Dmoe("generate --model " + dir + " --tokens 1,99999");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("99999"), std::string::npos) << r.err;
  r = Dmoe("generate --model " + dir + " --tokens 1 --max-tokens 100 --kv-cache-bytes 1000");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("KV cache"), std::string::npos) << r.err;
  r = Dmoe("generate --model " + dir + " --tokens 1 --top-p 2");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("top_p"), std::string::npos) << r.err;
  r = Dmoe("forward --model " + dir + " --tokens 1 --dtype f64");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("--dtype"), std::string::npos) << r.err;
}

TEST(Cli, StatsReportPeakRssAndExpertLoad) {
  const std::string dir = testing::FreshDir("model");
  ASSERT_EQ(Dmoe("make-model --preset tiny-v2lite --out " + dir).exit_code, 0);
  RunResult r = Dmoe("forward --model " + dir + " --tokens 1,2,3,4 --stats");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("peak RSS"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("expert load, layer 1"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace dmoe
