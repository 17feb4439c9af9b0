// `dmoe plan` end to end: the binary on files written here, the exact JSON
// contract (two keys, S ids per server, the constraints, the predicted
// max/mean), hierarchical nodes, --current, and errors with exit codes.
#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <numeric>
#include <random>
#include <set>
#include <sstream>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "placement/planner.h"
#include "tests/test_util.h"

namespace dmoe {
namespace {

using json = nlohmann::json;

struct RunResult {
  int exit_code = -1;
  std::string out, err;
};

RunResult Dmoe(const std::string& args) {
  const char* d = std::getenv("DMOE_BIN_DIR");
  const std::string err_path = testing::FreshDir("stderr") + "/err.txt";
  const std::string cmd = std::string(d ? d : "build/bin") + "/dmoe " + args + " 2>" + err_path;
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

std::string Write(const std::string& dir, const std::string& name, const std::string& text) {
  const std::string path = dir + "/" + name;
  std::ofstream(path) << text;
  return path;
}

std::vector<double> Zipf(int n, double s, uint64_t seed) {
  std::vector<double> v(n);
  for (int k = 0; k < n; ++k) v[k] = std::round(1e6 / std::pow(k + 1, s));
  std::mt19937_64 rng(seed);
  std::shuffle(v.begin(), v.end(), rng);
  return v;
}

// Checks the contract of `out` for `loads`; returns the plan's layers.
std::vector<place::ServerSlots> CheckContract(const std::string& out,
                                              const std::vector<std::vector<double>>& loads, int n,
                                              int s, int groups = 0, int nodes = 0) {
  std::vector<place::ServerSlots> layers;
  EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 1) << "one JSON object on one line";
  const json j = json::parse(out, nullptr, false);
  EXPECT_TRUE(j.is_object()) << out;
  if (!j.is_object()) return layers;
  EXPECT_EQ(j.size(), 2u) << "exactly \"layers\" and \"predicted_max_over_mean\"";
  EXPECT_TRUE(j["layers"].is_array());
  EXPECT_TRUE(j["predicted_max_over_mean"].is_array());
  EXPECT_EQ(j["layers"].size(), loads.size());
  EXPECT_EQ(j["predicted_max_over_mean"].size(), loads.size());
  for (size_t l = 0; l < loads.size() && l < j["layers"].size(); ++l) {
    const json& lj = j["layers"][l];
    EXPECT_EQ(lj.size(), 1u) << "only \"servers\" per layer";
    EXPECT_EQ(lj["servers"].size(), static_cast<size_t>(n));
    const int num_experts = static_cast<int>(loads[l].size());
    place::ServerSlots servers;
    std::vector<int> count(num_experts, 0);
    std::vector<std::set<int>> nodes_of_group(std::max(groups, 1));
    for (int sv = 0; sv < static_cast<int>(lj["servers"].size()); ++sv) {
      const json& sj = lj["servers"][sv];
      EXPECT_EQ(sj.size(), static_cast<size_t>(s)) << "layer " << l << " server " << sv;
      std::set<int> seen;
      servers.emplace_back();
      for (const json& e : sj) {
        EXPECT_TRUE(e.is_number_integer());
        const int id = e.get<int>();
        EXPECT_GE(id, 0);
        EXPECT_LT(id, num_experts);
        EXPECT_TRUE(seen.insert(id).second)
            << "layer " << l << " server " << sv << " holds " << id << " twice";
        if (id < 0 || id >= num_experts) continue;
        ++count[id];
        servers.back().push_back(id);
        if (groups > 0) {
          int node = 0;  // servers i*N/M .. (i+1)*N/M-1 form node i
          while ((node + 1) * n / nodes <= sv) ++node;
          nodes_of_group[id / (num_experts / groups)].insert(node);
        }
      }
    }
    for (int e = 0; e < num_experts; ++e)
      EXPECT_GE(count[e], 1) << "layer " << l << " expert " << e;
    for (size_t g = 0; groups > 0 && g < nodes_of_group.size(); ++g) {
      EXPECT_EQ(nodes_of_group[g].size(), 1u) << "group " << g << " spans nodes";
    }
    // Predicted max/mean, recomputed in float64 from the definition.
    std::vector<double> server_load(n, 0.0);
    for (int sv = 0; sv < n; ++sv) {
      for (int32_t e : servers[sv]) server_load[sv] += loads[l][e] / count[e];
    }
    const double mean = std::accumulate(server_load.begin(), server_load.end(), 0.0) / n;
    const double expected =
        mean > 0 ? *std::max_element(server_load.begin(), server_load.end()) / mean : 1.0;
    EXPECT_NEAR(j["predicted_max_over_mean"][l].get<double>(), expected, 1e-9) << "layer " << l;
    layers.push_back(servers);
  }
  return layers;
}

std::string Placement(const std::vector<place::ServerSlots>& layers, int n) {
  json p = {{"version", 7}, {"num_servers", n}, {"layers", json::array()}};
  for (size_t l = 0; l < layers.size(); ++l)
    p["layers"].push_back({{"layer", l + 1}, {"servers", layers[l]}});
  return p.dump();
}

TEST(CliPlan, PrintsTheJsonContract) {
  const std::string dir = testing::FreshDir("files");
  const std::vector<std::vector<double>> loads = {Zipf(64, 1.2, 1), Zipf(64, 0.5, 2),
                                                  std::vector<double>(64, 0.0)};
  const std::string path = Write(dir, "loads.json", json{{"loads", loads}}.dump());
  RunResult r = Dmoe("plan --loads " + path + " --servers 8 --slots-per-server 10 --json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.err, "");
  const auto layers = CheckContract(r.out, loads, 8, 10);
  const json j = json::parse(r.out);
  EXPECT_LE(j["predicted_max_over_mean"][0].get<double>(), 1.01);
  EXPECT_EQ(j["predicted_max_over_mean"][2].get<double>(), 1.0);
  // The command is the library.
  place::PlanOptions o;
  o.num_servers = 8;
  o.slots_per_server = 10;
  for (size_t l = 0; l < loads.size(); ++l)
    EXPECT_EQ(layers[l], place::PlanLayer(loads[l], o)->servers);

  // Without --json: one readable block per layer.
  r = Dmoe("plan --loads " + path + " --servers 8 --slots-per-server 10");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("layer 2: max/mean 1.0000"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("  server 7 (load "), std::string::npos) << r.out;

  RunResult help = Dmoe("plan --help");
  EXPECT_EQ(help.exit_code, 0);
  EXPECT_NE(help.out.find("usage: dmoe plan"), std::string::npos);
  EXPECT_NE(Dmoe("--help").out.find("plan "), std::string::npos);
}

TEST(CliPlan, HierarchicalKeepsGroupsOnNodes) {
  const std::string dir = testing::FreshDir("files");
  const std::vector<std::vector<double>> loads = {Zipf(256, 0.8, 3), Zipf(256, 1.0, 4)};
  const std::string path = Write(dir, "loads.json", json{{"loads", loads}}.dump());
  RunResult r = Dmoe("plan --loads " + path +
                     " --servers 32 --slots-per-server 9 --groups 8 --nodes 4 --json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  CheckContract(r.out, loads, 32, 9, 8, 4);
  // Indivisible shapes: 6 groups on 4 nodes of 2 or 3 servers (N = 10).
  const std::vector<std::vector<double>> small = {Zipf(48, 1.0, 5)};
  const std::string small_path = Write(dir, "small.json", json{{"loads", small}}.dump());
  r = Dmoe("plan --loads " + small_path +
           " --servers 10 --slots-per-server 8 --groups 6 --nodes 4 --json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  CheckContract(r.out, small, 10, 8, 6, 4);
}

TEST(CliPlan, CurrentPlacementMovesFewSlots) {
  const std::string dir = testing::FreshDir("files");
  std::vector<std::vector<double>> loads = {Zipf(64, 1.0, 6), Zipf(64, 0.8, 7)};
  const std::string before_path = Write(dir, "before.json", json{{"loads", loads}}.dump());
  RunResult r = Dmoe("plan --loads " + before_path + " --servers 8 --slots-per-server 10 --json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto before = CheckContract(r.out, loads, 8, 10);
  const std::string current = Write(dir, "current.json", Placement(before, 8));

  std::mt19937_64 rng(8);
  for (auto& layer : loads) {
    for (double& l : layer)
      l = std::round(l * std::uniform_real_distribution<double>(0.9, 1.1)(rng));
  }
  const std::string after_path = Write(dir, "after.json", json{{"loads", loads}}.dump());
  RunResult fresh =
      Dmoe("plan --loads " + after_path + " --servers 8 --slots-per-server 10 --json");
  r = Dmoe("plan --loads " + after_path + " --servers 8 --slots-per-server 10 --current " +
           current + " --expert-bytes 1000 --json");
  ASSERT_EQ(fresh.exit_code, 0) << fresh.err;
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto scratch = CheckContract(fresh.out, loads, 8, 10);
  const auto incr = CheckContract(r.out, loads, 8, 10);
  const json fj = json::parse(fresh.out), ij = json::parse(r.out);
  for (size_t l = 0; l < loads.size(); ++l) {
    const int64_t m_scratch = place::SlotsMoved(before[l], scratch[l]);
    const int64_t m_incr = place::SlotsMoved(before[l], incr[l]);
    std::printf(
        "layer %zu: from scratch %.4f moving %lld slots, --current %.4f moving "
        "%lld slots\n",
        l, fj["predicted_max_over_mean"][l].get<double>(), static_cast<long long>(m_scratch),
        ij["predicted_max_over_mean"][l].get<double>(), static_cast<long long>(m_incr));
    EXPECT_LT(m_incr, m_scratch);
    EXPECT_LE(ij["predicted_max_over_mean"][l].get<double>(),
              fj["predicted_max_over_mean"][l].get<double>() * 1.02 + 1e-9);
    const std::string line = "layer " + std::to_string(l) + ": max/mean ";
    EXPECT_NE(r.err.find(line), std::string::npos) << r.err;
    EXPECT_NE(r.err.find(std::to_string(m_incr) + " of 80 slots moved (" +
                         std::to_string(m_incr * 1000) + " bytes)"),
              std::string::npos)
        << r.err;
  }

  // A server joins (N = 9): the current placement has 8.
  r = Dmoe("plan --loads " + after_path + " --servers 9 --slots-per-server 9 --current " + current +
           " --json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  CheckContract(r.out, loads, 9, 9);
}

TEST(CliPlan, ErrorsAreClearWithExitCodes) {
  const std::string dir = testing::FreshDir("files");
  const std::string ok =
      Write(dir, "ok.json", json{{"loads", {std::vector<double>(16, 1.0)}}}.dump());
  auto expect = [](const RunResult& r, int code, const std::string& message) {
    EXPECT_EQ(r.exit_code, code) << r.err;
    EXPECT_NE(r.err.find(message), std::string::npos)
        << "stderr: " << r.err << "\nexpected: " << message;
    EXPECT_EQ(r.out, "");
  };
  // Usage: exit 2.
  expect(Dmoe("plan --servers 4 --slots-per-server 4"), 2, "--loads is required");
  expect(Dmoe("plan --loads " + ok + " --servers 4 --slots-per-server 4 --bogus 1"), 2,
         "unknown flag --bogus");
  expect(Dmoe("plan --loads " + ok + " --servers 0 --slots-per-server 4"), 2,
         "--servers must be in [1, 65536], got 0");
  expect(Dmoe("plan --loads " + ok + " --servers x --slots-per-server 4"), 2, "--servers");
  expect(Dmoe("plan --loads " + ok + " --servers 2 --slots-per-server 3"), 2,
         "--servers 2 x --slots-per-server 3 = 6 slots < 16 experts (every "
         "expert needs a slot) (layer 0 of --loads "
         "has 16 experts)");
  expect(Dmoe("plan --loads " + ok + " --servers 2 --slots-per-server 17"), 2,
         "--slots-per-server 17 exceeds the 16 experts of the layer");
  expect(Dmoe("plan --loads " + ok + " --servers 4 --slots-per-server 4 --groups 4"), 2,
         "--groups and --nodes go together");
  expect(Dmoe("plan --loads " + ok + " --servers 4 --slots-per-server 4 --groups 3 --nodes 2"), 2,
         "--groups 3 does not divide the 16 experts");
  expect(Dmoe("plan --loads " + ok + " --servers 4 --slots-per-server 4 --groups 4 --nodes 8"), 2,
         "--nodes 8 exceeds --servers 4");
  expect(Dmoe("plan --loads " + ok + " --servers 4 --slots-per-server 4 --groups 2 --nodes 4"), 2,
         "node 0 (1 servers x 4 slots) cannot hold whole groups of 8 experts");
  expect(Dmoe("plan --loads " + ok + " --servers 4 --slots-per-server 4 --balance-slack -1"), 2,
         "--balance-slack must be finite and >= 0, got -1");
  expect(Dmoe("plan --loads " + ok +
              " --servers 4 --slots-per-server 4 --expert-bytes 10 "
              "--server-bytes 39"),
         2, "--slots-per-server 4 x --expert-bytes 10 exceeds --server-bytes 39");

  // Input files: exit 1, naming the flag, the file and the field.
  const std::string missing = dir + "/missing.json";
  expect(Dmoe("plan --loads " + missing + " --servers 4 --slots-per-server 4"), 1,
         "--loads " + missing + ": cannot open");
  const std::string bad = Write(dir, "bad.json", "{\"loads\": [[1, 2,]]}");
  expect(Dmoe("plan --loads " + bad + " --servers 4 --slots-per-server 4"), 1,
         "--loads " + bad + ": not valid JSON");
  const std::string shape = Write(dir, "shape.json", "{\"load\": [[1, 2]]}");
  expect(Dmoe("plan --loads " + shape + " --servers 4 --slots-per-server 4"), 1,
         "expected {\"loads\": [[load of expert 0, 1, ...] per layer]}");
  const std::string empty = Write(dir, "empty.json", "{\"loads\": [[1, 2], []]}");
  expect(Dmoe("plan --loads " + empty + " --servers 4 --slots-per-server 4"), 1,
         "loads[1] must be a non-empty array of expert loads");
  const std::string negative = Write(dir, "negative.json", "{\"loads\": [[1, 2], [1, 2, 3, -1]]}");
  expect(Dmoe("plan --loads " + negative + " --servers 4 --slots-per-server 1"), 1,
         "loads[1][3] is -1; loads must be finite and >= 0");
  const std::string text = Write(dir, "text.json", "{\"loads\": [[1, \"2\"]]}");
  expect(Dmoe("plan --loads " + text + " --servers 4 --slots-per-server 1"), 1,
         "loads[0][1] is not a number");
  const std::string huge = Write(dir, "huge.json", "{\"loads\": [[1, 1e400]]}");
  expect(Dmoe("plan --loads " + huge + " --servers 4 --slots-per-server 1"), 1, "number overflow");

  const std::string two_layers = Write(dir, "cur2.json", Placement({{{0, 1}}, {{0, 1}}}, 1));
  expect(
      Dmoe("plan --loads " + ok + " --servers 4 --slots-per-server 4 --current " + two_layers), 1,
      "--current " + two_layers + ": 2 layers, but --loads has 1 (layers are matched by position)");
  const std::string range = Write(dir, "range.json", Placement({{{0, 1}, {2, 99}}}, 2));
  expect(Dmoe("plan --loads " + ok + " --servers 4 --slots-per-server 4 --current " + range), 1,
         "--current " + range +
             ": layer 0: current placement: server 1: expert id 99 out of "
             "range [0, 16)");
  const std::string twice = Write(dir, "twice.json", Placement({{{0, 1, 0}}}, 1));
  expect(Dmoe("plan --loads " + ok + " --servers 4 --slots-per-server 4 --current " + twice), 1,
         "layer 0: current placement: server 0 holds expert 0 twice");
  const std::string count = Write(dir, "count.json", Placement({{{0, 1}}}, 3));
  expect(Dmoe("plan --loads " + ok + " --servers 4 --slots-per-server 4 --current " + count), 1,
         "layers[0] lists 1 servers, \"num_servers\" is 3");
  const std::string ids = Write(dir, "ids.json", "{\"layers\": [{\"servers\": [[0, 1.5]]}]}");
  expect(Dmoe("plan --loads " + ok + " --servers 4 --slots-per-server 4 --current " + ids), 1,
         "layers[0].servers[0]: expert ids must be integers");
}

}  // namespace
}  // namespace dmoe
