// The deployment files (deploy/, docker-compose.yml) checked against the real
// tools and the real binaries, as far as a machine without a container engine
// or a cluster allows:
//
//   - `kubectl kustomize` renders the base and every overlay, with the objects
//     the deployment needs (GPU resources only in the gpu overlay);
//   - `docker-compose config -q` accepts docker-compose.yml; yamllint is clean;
//     `promtool check rules` / `check config` pass; the PrometheusRule holds
//     the rules file;
//   - every flag a manifest, the compose file or an image script passes exists
//     in that binary's --help (after $(VAR) expansion from env and ConfigMap);
//   - ports, hosts and probes agree with what the binaries serve (flags or
//   their
//     --help defaults), Services / ServiceMonitors / NetworkPolicies point at
//     declared ports, the expert servers' names follow the StatefulSet and the
//     headless Service, grace periods cover the drain, the Dockerfiles copy
//     files that exist and install every shared library the binaries link;
//   - the expert entrypoint's start-up scheme, run for real on loopback:
//   initial
//     servers, a joining server, a restarted server resuming its slots; and the
//     images' health check (grpc_health_probe.cc, healthcheck.sh) against the
//     running servers.
//
// A check whose tool is missing (kubectl with kustomize >= v4, docker-compose,
// yamllint, promtool, python3 with PyYAML, jq, g++) is skipped with a message;
// tools/setup.sh installs them.
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "testing/files.h"
#include "testing/http.h"
#include "testing/ports.h"
#include "testing/subprocess.h"
#include "tests/test_util.h"

extern char** environ;

namespace dmoe {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using testing::BinDir;
using testing::ChildProcess;
using testing::FindInPath;
using testing::FreePort;
using testing::ReadFile;
using testing::RunResult;
using testing::SourceDir;

// ------------------------------------------------------------------ helpers

// Runs argv (argv[0] looked up in PATH) with `input` on stdin; waits at most
// `timeout_s` seconds.
RunResult Exec(const std::vector<std::string>& argv, const std::string& input = "",
               int timeout_s = 60, const std::string& cwd = "") {
  return testing::RunCommand(
      argv, {.input = input, .timeout = std::chrono::seconds(timeout_s), .cwd = cwd});
}

// A Python 3 with PyYAML (Debian's python3-yaml), or "".
std::string PythonWithYaml() {
  for (const std::string& p : std::vector<std::string>{"/usr/bin/python3", "python3"}) {
    const std::string bin = FindInPath(p);
    if (!bin.empty() && Exec({bin, "-c", "import yaml"}).code == 0) return bin;
  }
  return "";
}

// All YAML documents of `text` as a JSON array (nulls dropped).
json YamlDocs(const std::string& python, const std::string& text) {
  const RunResult r = Exec({python, "-c",
                            "import sys, yaml, json\n"
                            "json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not "
                            "None], sys.stdout)"},
                           text);
  EXPECT_EQ(r.code, 0) << r.err;
  json j = json::parse(r.out, nullptr, false);
  EXPECT_FALSE(j.is_discarded()) << r.out;
  return j.is_discarded() ? json::array() : j;
}

// `kubectl` whose kustomize understands the manifests (v4+), or "" with `why`.
std::string Kubectl(std::string* why) {
  const std::string k = FindInPath("kubectl");
  if (k.empty()) {
    *why = "no kubectl (apt-get install kubectl or kubernetes-client)";
    return "";
  }
  const RunResult v = Exec({k, "version", "--client"});
  std::smatch m;
  if (!std::regex_search(v.out, m, std::regex(R"(Kustomize Version: v(\d+))")) ||
      std::stoi(m[1]) < 4) {
    *why =
        "kubectl's kustomize is older than v4 (Debian's kubernetes-client 1.20 "
        "has v2): " +
        v.out;
    return "";
  }
  return k;
}

// The flags a binary (or `dmoe SUBCOMMAND`) declares in --help, with defaults.
struct Help {
  std::set<std::string> flags;
  std::map<std::string, std::string> defaults;
};

Help ParseHelp(const std::vector<std::string>& argv) {
  const RunResult r = Exec(argv);
  Help h;
  EXPECT_EQ(r.code, 0) << argv[0] << " --help: " << r.err;
  std::stringstream ss(r.out);
  const std::regex flag(R"(^  --([a-z0-9-]+)\b(.*)$)"), def(R"(\[default: ([^\]]*)\])");
  for (std::string line; std::getline(ss, line);) {
    std::smatch m;
    if (!std::regex_match(line, m, flag)) continue;
    h.flags.insert(m[1]);
    const std::string rest = m[2];
    std::smatch d;
    if (std::regex_search(rest, d, def)) h.defaults[m[1]] = d[1];
  }
  EXPECT_FALSE(h.flags.empty()) << "no flags in the --help of " << argv[0] << ":\n" << r.out;
  return h;
}

std::string Default(const Help& h, const std::string& flag) {
  auto it = h.defaults.find(flag);
  EXPECT_NE(it, h.defaults.end()) << "no default for --" << flag;
  return it == h.defaults.end() ? "" : it->second;
}

// --help of each program a deployment file can start, parsed once.
class Helps {
 public:
  // `program`: dmoe-router, dmoe-expert, dmoe-gateway, or "dmoe SUB".
  const Help& Get(const std::string& program) {
    auto it = cache_.find(program);
    if (it != cache_.end()) return it->second;
    std::vector<std::string> argv;
    if (program.rfind("dmoe ", 0) == 0) {
      argv = {BinDir() + "/dmoe"};
      std::stringstream ss(program.substr(5));
      for (std::string w; ss >> w;) argv.push_back(w);
    } else {
      argv = {BinDir() + "/" + program};
    }
    argv.push_back("--help");
    return cache_[program] = ParseHelp(argv);
  }

 private:
  std::map<std::string, Help> cache_;
};

// One program started by a command line, and the flags it was given.
struct Invocation {
  std::string program;  // dmoe-router, dmoe-expert, dmoe-gateway, "dmoe SUB"
  std::vector<std::pair<std::string, std::string>> flags;  // name, value ("" if none)
  std::string Flag(const std::string& name) const {
    for (const auto& [n, v] : flags) {
      if (n == name) return v;
    }
    return "";
  }
  bool Has(const std::string& name) const {
    return std::any_of(flags.begin(), flags.end(), [&](const auto& f) { return f.first == name; });
  }
};

bool IsSeparator(const std::string& t) {
  return t == "&&" || t == "||" || t == ";" || t == "|" || t == "{" || t == "}" || t == "(" ||
         t == ")";
}

// Finds the dmoe programs in a command line (a container's command + args, a
// compose `command`, or the words of an `sh -c` script) and their flags.
// `--flag=value` and `--flag value` are both read; the expert entrypoint passes
// its flags through to dmoe-expert.
std::vector<Invocation> FindInvocations(const std::vector<std::string>& words) {
  std::vector<std::string> tokens;
  for (size_t i = 0; i < words.size(); ++i) {
    const std::string& w = words[i];
    if ((w == "sh" || w == "bash" || w == "/bin/sh") && i + 2 < words.size() &&
        words[i + 1] == "-c") {
      // The script's words, with shell punctuation split off.
      std::string s = words[i + 2];
      for (const char* p : {"&&", "||", ";", "{", "}", "(", ")"}) {
        s = std::regex_replace(
            s, std::regex(std::regex_replace(p, std::regex(R"([|{}()])"), R"(\$&)")),
            std::string(" ") + p + " ");
      }
      std::stringstream ss(s);
      for (std::string t; ss >> t;) tokens.push_back(t);
      i += 2;
      continue;
    }
    tokens.push_back(w);
  }
  std::vector<Invocation> out;
  for (size_t i = 0; i < tokens.size(); ++i) {
    std::string prog = fs::path(tokens[i]).filename().string();
    if (prog == "dmoe-expert-entrypoint" || prog == "dmoe-expert-entrypoint.sh")
      prog = "dmoe-expert";
    if (prog == "dmoe" && i + 1 < tokens.size()) {
      prog = "dmoe " + tokens[++i];
      if (prog == "dmoe ctl" && i + 1 < tokens.size()) prog += " " + tokens[++i];
    } else if (prog != "dmoe-router" && prog != "dmoe-expert" && prog != "dmoe-gateway") {
      continue;
    }
    Invocation inv{prog, {}};
    for (++i; i < tokens.size() && !IsSeparator(tokens[i]); ++i) {
      const std::string& t = tokens[i];
      if (t.rfind("--", 0) != 0 || t == "--") continue;
      const size_t eq = t.find('=');
      if (eq != std::string::npos) {
        inv.flags.emplace_back(t.substr(2, eq - 2), t.substr(eq + 1));
      } else {
        std::string v;
        if (i + 1 < tokens.size() && tokens[i + 1].rfind("--", 0) != 0 &&
            !IsSeparator(tokens[i + 1])) {
          v = tokens[i + 1];
        }
        inv.flags.emplace_back(t.substr(2), v);
      }
    }
    --i;
    out.push_back(std::move(inv));
  }
  return out;
}

void ExpectFlagsExist(Helps& helps, const Invocation& inv, const std::string& where) {
  const Help& h = helps.Get(inv.program);
  for (const auto& [name, value] : inv.flags) {
    EXPECT_TRUE(h.flags.count(name))
        << where << ": " << inv.program << " has no flag --" << name << " (see its --help)";
  }
}

// The port a server listens on: its flag, else the --help default.
int PortOf(Helps& helps, const Invocation& inv, const std::string& flag) {
  std::string v = inv.Flag(flag);
  if (v.empty()) v = Default(helps.Get(inv.program), flag);
  return std::atoi(v.c_str());
}

// What a dmoe server serves, from its flags: named ports (grpc, metrics, http).
std::map<std::string, int> ServedPorts(Helps& helps, const Invocation& inv) {
  std::map<std::string, int> p;
  if (inv.program == "dmoe-router" || inv.program == "dmoe-expert") {
    p["grpc"] = PortOf(helps, inv, "port");
    p["metrics"] = PortOf(helps, inv, "metrics-port");
  } else if (inv.program == "dmoe-gateway") {
    p["http"] = PortOf(helps, inv, "http-port");  // the API and /metrics
    if (inv.Has("grpc-port")) p["grpc"] = PortOf(helps, inv, "grpc-port");
  }
  return p;
}

std::vector<std::string> Split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string x; std::getline(ss, x, sep);) out.push_back(x);
  return out;
}

// ------------------------------------------------------------------ Kubernetes

// One rendered kustomization: its objects, indexed.
struct Rendered {
  json objects = json::array();
  std::vector<json> Of(const std::string& kind) const {
    std::vector<json> out;
    for (const json& o : objects) {
      if (o.value("kind", "") == kind) out.push_back(o);
    }
    return out;
  }
  json Get(const std::string& kind, const std::string& name) const {
    for (const json& o : objects) {
      if (o.value("kind", "") == kind && o["metadata"].value("name", "") == name) return o;
    }
    ADD_FAILURE() << "no " << kind << " " << name;
    return json::object();
  }
  // The pod templates of Deployments, StatefulSets and Jobs.
  std::vector<std::pair<json, json>> Workloads() const {  // (object, pod template)
    std::vector<std::pair<json, json>> out;
    for (const json& o : objects) {
      const std::string k = o.value("kind", "");
      if (k == "Deployment" || k == "StatefulSet" || k == "Job")
        out.emplace_back(o, o["spec"]["template"]);
    }
    return out;
  }
};

bool SelectorMatches(const json& match_labels, const json& labels) {
  if (!match_labels.is_object() || match_labels.empty()) return false;
  for (const auto& [k, v] : match_labels.items()) {
    if (!labels.contains(k) || labels[k] != v) return false;
  }
  return true;
}

// The container's environment: explicit env (fieldRef/resourceFieldRef get
// stand-ins), then envFrom ConfigMaps of `r`.
std::map<std::string, std::string> ContainerEnv(const Rendered& r, const json& c,
                                                const std::string& pod_name) {
  std::map<std::string, std::string> env;
  for (const json& from : c.value("envFrom", json::array())) {
    if (!from.contains("configMapRef")) continue;
    const json cm = r.Get("ConfigMap", from["configMapRef"]["name"]);
    const json data = cm.value("data", json::object());
    for (const auto& [k, v] : data.items()) env[k] = v;
  }
  const std::regex ref(R"(\$\(([A-Za-z_][A-Za-z0-9_]*)\))");
  for (const json& e : c.value("env", json::array())) {
    std::string v;
    if (e.contains("value")) {
      v = e["value"];
      // Kubernetes expands $(NAME) of earlier variables in values.
      std::string expanded;
      auto begin = std::sregex_iterator(v.begin(), v.end(), ref);
      size_t last = 0;
      for (auto it = begin; it != std::sregex_iterator(); ++it) {
        expanded += v.substr(last, it->position() - last);
        const std::string name = (*it)[1];
        expanded += env.count(name) ? env[name] : it->str();
        last = it->position() + it->length();
      }
      v = expanded + v.substr(last);
    } else if (e.contains("valueFrom") && e["valueFrom"].contains("fieldRef")) {
      v = e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name" ? pod_name : "field";
    } else if (e.contains("valueFrom") && e["valueFrom"].contains("resourceFieldRef")) {
      v = "2";
    }
    env[e["name"]] = v;
  }
  return env;
}

// command + args with $(NAME) replaced from `env` (unknown names stay).
std::vector<std::string> ContainerWords(const json& c,
                                        const std::map<std::string, std::string>& env) {
  std::vector<std::string> words;
  for (const char* key : {"command", "args"}) {
    for (const json& w : c.value(key, json::array())) {
      std::string s = w;
      for (const auto& [k, v] : env) {
        const std::string pat = "$(" + k + ")";
        for (size_t p; (p = s.find(pat)) != std::string::npos;) s.replace(p, pat.size(), v);
      }
      words.push_back(s);
    }
  }
  return words;
}

// The container port a probe / Service targets (a name or a number), or 0.
int ResolvePort(const json& container, const json& port) {
  if (port.is_number_integer()) return port.get<int>();
  for (const json& p : container.value("ports", json::array())) {
    if (p.value("name", "") == port.get<std::string>()) return p["containerPort"];
  }
  return 0;
}

class DeployTest : public ::testing::Test {
 protected:
  void SetUp() override { src_ = SourceDir(); }

  // Renders deploy/k8s/<dir>; skips the test without a usable kubectl / PyYAML.
  Rendered Render(const std::string& dir) {
    Rendered r;
    std::string why;
    const std::string kubectl = Kubectl(&why);
    python_ = PythonWithYaml();
    if (kubectl.empty() || python_.empty()) {
      skip_ = kubectl.empty() ? why : "no python3 with PyYAML (apt-get install python3-yaml)";
      return r;
    }
    const RunResult out = Exec({kubectl, "kustomize", src_ + "/deploy/k8s/" + dir});
    EXPECT_EQ(out.code, 0) << "kubectl kustomize deploy/k8s/" << dir << ":\n" << out.err;
    r.objects = YamlDocs(python_, out.out);
    return r;
  }

  std::string src_, python_, skip_;
  Helps helps_;
};

#define SKIP_IF_NEEDED()   \
  if (!skip_.empty()) {    \
    GTEST_SKIP() << skip_; \
  }

TEST_F(DeployTest, KustomizeRendersEveryOverlay) {
  for (const std::string& dir : std::vector<std::string>{"base", "overlays/cpu", "overlays/gpu"}) {
    SCOPED_TRACE(dir);
    const Rendered r = Render(dir);
    SKIP_IF_NEEDED();
    std::map<std::string, int> kinds;
    for (const json& o : r.objects) {
      ++kinds[o.value("kind", "")];
      if (o.value("kind", "") != "Namespace") {
        EXPECT_EQ(o["metadata"].value("namespace", ""), "dmoe") << o["metadata"]["name"];
      }
    }
    EXPECT_EQ(kinds["Deployment"], 2);  // gateway, router
    EXPECT_EQ(kinds["StatefulSet"], 1);
    EXPECT_EQ(kinds["PodDisruptionBudget"], 3);
    EXPECT_EQ(kinds["HorizontalPodAutoscaler"], 1);
    EXPECT_EQ(kinds["ServiceMonitor"], 3);
    EXPECT_EQ(kinds["PrometheusRule"], 1);
    EXPECT_GE(kinds["NetworkPolicy"], 4);
    EXPECT_EQ(kinds["PersistentVolumeClaim"], 1);
    r.Get("Deployment", "dmoe-gateway");
    r.Get("Deployment", "dmoe-router");
    const json sts = r.Get("StatefulSet", "dmoe-expert");
    const json headless = r.Get("Service", sts["spec"]["serviceName"]);
    EXPECT_EQ(headless["spec"].value("clusterIP", ""), "None") << "the expert Service is headless";
    EXPECT_TRUE(headless["spec"].value("publishNotReadyAddresses", false));
    // The dashboard ConfigMap for the Grafana sidecar, holding the dashboard
    // file.
    const json dash = r.Get("ConfigMap", "dmoe-grafana-dashboard");
    EXPECT_EQ(dash["metadata"]["labels"].value("grafana_dashboard", ""), "1");
    EXPECT_EQ(dash["data"].value("dmoe.json", ""),
              ReadFile(src_ + "/deploy/grafana/dashboards/dmoe.json"));
    // Model weights come from the PVC, read-only, in router and expert servers.
    for (const std::string& name : std::vector<std::string>{"dmoe-router", "dmoe-expert"}) {
      const json w = r.Get(name == "dmoe-router" ? "Deployment" : "StatefulSet", name);
      bool pvc = false;
      for (const json& v : w["spec"]["template"]["spec"]["volumes"]) {
        if (v.contains("persistentVolumeClaim")) {
          pvc = v["persistentVolumeClaim"]["claimName"] == "dmoe-models";
          EXPECT_TRUE(v["persistentVolumeClaim"].value("readOnly", false)) << name;
        }
      }
      EXPECT_TRUE(pvc) << name << " mounts the dmoe-models PVC";
    }
    // GPUs: only the gpu overlay's expert servers ask for them, with the CUDA
    // image.
    for (const auto& [obj, tmpl] : r.Workloads()) {
      for (const json& c : tmpl["spec"]["containers"]) {
        const json limits = c.value("resources", json::object()).value("limits", json::object());
        const bool gpu = limits.contains("nvidia.com/gpu");
        const bool expert = obj["metadata"]["name"] == "dmoe-expert";
        EXPECT_EQ(gpu, dir == "overlays/gpu" && expert) << obj["metadata"]["name"];
        EXPECT_EQ(c.value("image", "").find("cuda") != std::string::npos, gpu) << c["image"];
        EXPECT_TRUE(c.contains("resources") && c["resources"].contains("requests") &&
                    c["resources"].contains("limits"))
            << obj["metadata"]["name"] << "/" << c["name"] << ": requests and limits";
      }
    }
  }
}

// Every flag of every dmoe program a manifest starts exists in its --help.
TEST_F(DeployTest, EveryManifestFlagExistsInTheBinarysHelp) {
  for (const std::string& dir : std::vector<std::string>{"overlays/cpu", "overlays/gpu"}) {
    SCOPED_TRACE(dir);
    const Rendered r = Render(dir);
    SKIP_IF_NEEDED();
    int checked = 0;
    for (const auto& [obj, tmpl] : r.Workloads()) {
      const std::string name = obj["metadata"]["name"];
      for (const char* list : {"initContainers", "containers"}) {
        for (const json& c : tmpl["spec"].value(list, json::array())) {
          const auto env = ContainerEnv(r, c, name + "-0");
          for (const Invocation& inv : FindInvocations(ContainerWords(c, env))) {
            ExpectFlagsExist(helps_, inv, dir + " " + name + "/" + std::string(c["name"]));
            ++checked;
          }
        }
      }
    }
    EXPECT_GE(checked, 3) << "gateway, router and expert commands found";
  }
}

TEST_F(DeployTest, ManifestPortsProbesAndNamesMatchTheBinaries) {
  for (const std::string& dir : std::vector<std::string>{"overlays/cpu", "overlays/gpu"}) {
    SCOPED_TRACE(dir);
    const Rendered r = Render(dir);
    SKIP_IF_NEEDED();
    // Pod labels and container of each dmoe server, and what it serves.
    struct Server {
      std::string workload, program;
      json labels, container;
      std::map<std::string, int> served;
      Invocation inv;
      std::map<std::string, std::string> env;
      json pod_spec;
    };
    std::map<std::string, Server> servers;  // by program
    for (const auto& [obj, tmpl] : r.Workloads()) {
      const std::string name = obj["metadata"]["name"];
      for (const json& c : tmpl["spec"]["containers"]) {
        const auto env = ContainerEnv(r, c, name + "-0");
        for (const Invocation& inv : FindInvocations(ContainerWords(c, env))) {
          if (inv.program.rfind("dmoe ", 0) == 0) continue;  // CLI jobs serve nothing
          Server s{name, inv.program, tmpl["metadata"]["labels"], c, ServedPorts(helps_, inv), inv,
                   env,  tmpl["spec"]};
          servers[inv.program] = s;
        }
      }
    }
    ASSERT_EQ(servers.size(), 3u) << "dmoe-gateway, dmoe-router and dmoe-expert containers";
    for (auto& [program, s] : servers) {
      SCOPED_TRACE(program);
      // Reachable from other pods.
      EXPECT_EQ(s.inv.Flag("host"), "0.0.0.0");
      if (program != "dmoe-gateway") {
        EXPECT_EQ(s.inv.Flag("metrics-host"), "0.0.0.0");
      }
      // Declared container ports = what the binary serves, by name.
      std::map<std::string, int> declared;
      for (const json& p : s.container.value("ports", json::array()))
        declared[p["name"]] = p["containerPort"];
      EXPECT_EQ(declared, s.served);
      // Probes: gRPC health on the gRPC port (router, expert serve
      // grpc.health.v1), HTTP GET on the gateway's HTTP port and one of its
      // routes.
      int probes = 0;
      for (const char* kind : {"startupProbe", "readinessProbe", "livenessProbe"}) {
        if (!s.container.contains(kind)) continue;
        ++probes;
        const json& p = s.container[kind];
        if (program == "dmoe-gateway") {
          ASSERT_TRUE(p.contains("httpGet")) << kind;
          EXPECT_EQ(ResolvePort(s.container, p["httpGet"]["port"]), s.served["http"]) << kind;
          const std::string path = p["httpGet"]["path"];
          EXPECT_TRUE(path == "/health" || path == "/v1/models" || path == "/metrics") << path;
        } else {
          ASSERT_TRUE(p.contains("grpc")) << kind;
          EXPECT_EQ(p["grpc"]["port"].get<int>(), s.served["grpc"]) << kind;
        }
      }
      EXPECT_GE(probes, 2) << "readiness and liveness probes";
      EXPECT_TRUE(s.container.contains("readinessProbe"));
      EXPECT_TRUE(s.container.contains("livenessProbe"));
      // Non-root, as the image's user.
      EXPECT_TRUE(s.pod_spec["securityContext"].value("runAsNonRoot", false));
      // The grace period covers the shutdown: preStop sleep + the server's own
      // drain (router/gateway: --shutdown-grace-ms; expert: leave + drain).
      int pre_stop = 0;
      if (s.container.contains("lifecycle")) {
        const json cmd = s.container["lifecycle"]["preStop"]["exec"]["command"];
        if (cmd.size() == 2 && cmd[0] == "sleep") pre_stop = std::stoi(cmd[1].get<std::string>());
      }
      double shutdown_s = 0;
      if (program == "dmoe-expert") {
        EXPECT_TRUE(s.inv.Has("leave-timeout-s") && s.inv.Has("drain-timeout-s"));
        shutdown_s = std::atof(s.inv.Flag("leave-timeout-s").c_str()) +
                     std::atof(s.inv.Flag("drain-timeout-s").c_str());
      } else {
        std::string g = s.inv.Flag("shutdown-grace-ms");
        if (g.empty()) g = Default(helps_.Get(program), "shutdown-grace-ms");
        shutdown_s = std::stod(g) / 1000 + 2;  // + the gRPC server's last 2 s
        EXPECT_GE(pre_stop, 1) << "a preStop sleep lets the Service stop sending first";
      }
      EXPECT_GE(s.pod_spec.value("terminationGracePeriodSeconds", 30), pre_stop + shutdown_s);
    }

    // Services target declared ports of the pods they select; ServiceMonitors
    // scrape /metrics on a Service port that reaches a metrics-serving port.
    std::map<std::string, std::pair<json, const Server*>> services;  // name -> (svc, server)
    for (const json& svc : r.Of("Service")) {
      const Server* target = nullptr;
      for (const auto& [program, s] : servers) {
        if (SelectorMatches(svc["spec"]["selector"], s.labels)) target = &s;
      }
      ASSERT_NE(target, nullptr) << "Service " << svc["metadata"]["name"]
                                 << " selects no dmoe server";
      for (const json& p : svc["spec"]["ports"]) {
        EXPECT_NE(ResolvePort(target->container, p.value("targetPort", p["port"])), 0)
            << "Service " << svc["metadata"]["name"] << " port " << p["name"];
      }
      services[svc["metadata"]["name"]] = {svc, target};
    }
    for (const json& sm : r.Of("ServiceMonitor")) {
      bool any = false;
      for (const auto& [name, sv] : services) {
        if (!SelectorMatches(sm["spec"]["selector"]["matchLabels"], sv.first["metadata"]["labels"]))
          continue;
        any = true;
        for (const json& ep : sm["spec"]["endpoints"]) {
          EXPECT_EQ(ep.value("path", ""), "/metrics");
          int port = 0;
          for (const json& p : sv.first["spec"]["ports"]) {
            if (p["name"] == ep["port"])
              port = ResolvePort(sv.second->container, p.value("targetPort", p["port"]));
          }
          const auto& served = sv.second->served;
          const int metrics = served.count("metrics") ? served.at("metrics") : served.at("http");
          EXPECT_EQ(port, metrics)
              << "ServiceMonitor " << sm["metadata"]["name"] << " port " << ep["port"];
        }
      }
      EXPECT_TRUE(any) << "ServiceMonitor " << sm["metadata"]["name"] << " selects no Service";
    }
    // PDBs select a workload; NetworkPolicy ports are ports the selected pods
    // serve.
    for (const json& pdb : r.Of("PodDisruptionBudget")) {
      bool any = false;
      for (const auto& [program, s] : servers)
        any |= SelectorMatches(pdb["spec"]["selector"]["matchLabels"], s.labels);
      EXPECT_TRUE(any) << "PDB " << pdb["metadata"]["name"];
    }
    for (const json& np : r.Of("NetworkPolicy")) {
      for (const auto& [program, s] : servers) {
        if (!SelectorMatches(np["spec"]["podSelector"].value("matchLabels", json::object()),
                             s.labels))
          continue;
        std::set<int> mine;
        for (const auto& [n, p] : s.served) mine.insert(p);
        for (const json& rule : np["spec"].value("ingress", json::array())) {
          for (const json& p : rule.value("ports", json::array())) {
            EXPECT_TRUE(mine.count(p["port"].get<int>()))
                << "NetworkPolicy " << np["metadata"]["name"] << " lets in port " << p["port"]
                << " of " << program;
          }
        }
        for (const json& rule : np["spec"].value("egress", json::array())) {
          for (const json& to : rule.value("to", json::array())) {
            for (const auto& [peer_program, peer] : servers) {
              if (!SelectorMatches(
                      to.value("podSelector", json::object()).value("matchLabels", json::object()),
                      peer.labels)) {
                continue;
              }
              for (const json& p : rule.value("ports", json::array())) {
                EXPECT_EQ(p["port"].get<int>(), peer.served.at("grpc"))
                    << "NetworkPolicy " << np["metadata"]["name"] << ": " << program << " -> "
                    << peer_program;
              }
            }
          }
        }
      }
    }

    // Names: the router's --experts are the StatefulSet's first `replicas` pods
    // through the headless Service; the HPA never scales below them.
    const Server& router = servers["dmoe-router"];
    const Server& expert = servers["dmoe-expert"];
    const Server& gateway = servers["dmoe-gateway"];
    const json sts = r.Get("StatefulSet", "dmoe-expert");
    const std::string headless = sts["spec"]["serviceName"];
    const int replicas = sts["spec"]["replicas"];
    const int grpc = expert.served.at("grpc");
    std::vector<std::string> want;
    for (int i = 0; i < replicas; ++i) {
      want.push_back("dmoe-expert-" + std::to_string(i) + "." + headless + ":" +
                     std::to_string(grpc));
    }
    EXPECT_EQ(Split(router.inv.Flag("experts"), ','), want);
    EXPECT_EQ(expert.env.at("DMOE_EXPERTS"), router.inv.Flag("experts"));
    EXPECT_EQ(expert.env.at("DMOE_ADVERTISE"),
              "dmoe-expert-0." + headless + ":" + std::to_string(grpc));
    EXPECT_TRUE(router.inv.Has("controller"));
    // Expert servers join, and the gateway sends, to the router's Service and
    // gRPC port.
    const auto [router_svc, router_server] = services.at("dmoe-router");
    std::string router_address;
    for (const json& p : router_svc["spec"]["ports"]) {
      if (ResolvePort(router.container, p.value("targetPort", p["port"])) ==
          router.served.at("grpc")) {
        router_address = "dmoe-router:" + std::to_string(p["port"].get<int>());
      }
    }
    EXPECT_EQ(expert.env.at("DMOE_ROUTER"), router_address);
    EXPECT_EQ(gateway.inv.Flag("routers"), router_address);
    const json hpa = r.Get("HorizontalPodAutoscaler", "dmoe-expert");
    EXPECT_EQ(hpa["spec"]["scaleTargetRef"]["kind"], "StatefulSet");
    EXPECT_EQ(hpa["spec"]["scaleTargetRef"]["name"], "dmoe-expert");
    EXPECT_EQ(hpa["spec"]["minReplicas"].get<int>(), replicas);
    EXPECT_GT(hpa["spec"]["maxReplicas"].get<int>(), replicas);
    // The HPA's metrics are the ones the prometheus-adapter rules serve, per
    // pod.
    const json adapter =
        YamlDocs(python_, ReadFile(src_ + "/deploy/prometheus/prometheus-adapter-values.yaml"))[0];
    std::set<std::string> served_metrics;
    for (const json& rule : adapter["rules"]["custom"]) {
      served_metrics.insert(rule["name"]["as"].get<std::string>());
      EXPECT_EQ(rule["resources"]["overrides"]["pod"]["resource"], "pod");
    }
    for (const json& m : hpa["spec"]["metrics"]) {
      EXPECT_EQ(m["type"], "Pods");
      EXPECT_TRUE(served_metrics.count(m["pods"]["metric"]["name"])) << m["pods"]["metric"]["name"];
    }
    // The expert ServiceMonitor labels targets with the address the router
    // uses.
    bool relabelled = false;
    for (const json& sm : r.Of("ServiceMonitor")) {
      for (const json& ep : sm["spec"]["endpoints"]) {
        for (const json& rl : ep.value("relabelings", json::array())) {
          if (rl.value("targetLabel", "") != "address") continue;
          relabelled = true;
          EXPECT_EQ(rl["replacement"], "$1." + headless + ":" + std::to_string(grpc));
        }
      }
    }
    EXPECT_TRUE(relabelled);
    // The alert rules are the rules file.
    EXPECT_EQ(r.Get("PrometheusRule", "dmoe")["spec"],
              YamlDocs(python_, ReadFile(src_ + "/deploy/prometheus/dmoe-rules.yml"))[0]);
  }
}

// The flags dmoe-expert-entrypoint adds itself (--server-index, --join, ...)
// and its `dmoe ctl` call exist too.
TEST_F(DeployTest, EntrypointFlagsExistInTheBinarysHelp) {
  std::string script = ReadFile(src_ + "/deploy/docker/dmoe-expert-entrypoint.sh");
  ASSERT_FALSE(script.empty());
  script = std::regex_replace(script, std::regex(R"("\$expert_bin")"), "dmoe-expert");
  script = std::regex_replace(script, std::regex(R"("\$cli_bin")"), "dmoe");
  script = std::regex_replace(script, std::regex(R"(\$\()"), " ");  // x=$(cmd ...)
  std::set<std::string> programs;
  std::stringstream lines(script);
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind("#", 0) == 0) continue;
    std::vector<std::string> words;
    std::stringstream ws(line);
    for (std::string w; ws >> w;) words.push_back(w);
    for (const Invocation& inv : FindInvocations(words)) {
      ExpectFlagsExist(helps_, inv, "dmoe-expert-entrypoint.sh: " + line);
      programs.insert(inv.program);
    }
  }
  EXPECT_EQ(programs, (std::set<std::string>{"dmoe-expert", "dmoe ctl placement"}));
}

// ------------------------------------------------------------------ compose

TEST_F(DeployTest, ComposeFileIsValidAndMatchesTheBinaries) {
  const std::string compose = FindInPath("docker-compose");
  python_ = PythonWithYaml();
  if (compose.empty()) GTEST_SKIP() << "no docker-compose (apt-get install docker-compose)";
  if (python_.empty()) GTEST_SKIP() << "no python3 with PyYAML (apt-get install python3-yaml)";
  const RunResult q =
      Exec({compose, "-f", src_ + "/docker-compose.yml", "config", "-q"}, "", 60, src_);
  ASSERT_EQ(q.code, 0) << "docker-compose config -q:\n" << q.err;
  const RunResult full =
      Exec({compose, "-f", src_ + "/docker-compose.yml", "config"}, "", 60, src_);
  ASSERT_EQ(full.code, 0) << full.err;
  const json cfg = YamlDocs(python_, full.out)[0];
  const json& services = cfg["services"];
  for (const std::string& s :
       std::vector<std::string>{"model", "expert-0", "expert-1", "expert-2", "router", "gateway",
                                "prometheus", "grafana"}) {
    EXPECT_TRUE(services.contains(s)) << s;
  }

  std::map<std::string, Invocation> servers;  // service -> its server
  std::map<std::string, std::map<std::string, int>> served;
  for (const auto& [name, svc] : services.items()) {
    std::vector<std::string> words;
    for (const json& w : svc.value("command", json::array())) words.push_back(w);
    for (const Invocation& inv : FindInvocations(words)) {
      ExpectFlagsExist(helps_, inv, "docker-compose.yml " + name);
      if (inv.program.rfind("dmoe ", 0) == 0) continue;
      servers[name] = inv;
      served[name] = ServedPorts(helps_, inv);
    }
  }
  ASSERT_EQ(servers.size(), 5u) << "3 expert servers, a router and a gateway";
  auto addr = [&](const std::string& service, const std::string& port) {
    return service + ":" + std::to_string(served[service].at(port));
  };
  for (const auto& [name, inv] : servers) {
    SCOPED_TRACE(name);
    EXPECT_EQ(inv.Flag("host"), "0.0.0.0");
    if (inv.program != "dmoe-gateway") {
      EXPECT_EQ(inv.Flag("metrics-host"), "0.0.0.0");
    }
    // The image's health check probes what the server serves.
    const json env = services[name].value("environment", json::object());
    const std::string hc = env.value("DMOE_HEALTH_CHECK", "");
    if (inv.program == "dmoe-gateway") {
      EXPECT_EQ(hc, "http:" + std::to_string(served[name]["http"]) + "/health");
      EXPECT_EQ(services[name]["ports"][0]["target"].get<int>(), served[name]["http"]);
    } else {
      EXPECT_EQ(hc, "grpc:" + std::to_string(served[name]["grpc"]));
    }
  }
  // Names: the router's --experts are the expert services, each advertising its
  // own entry; the gateway and the joiners reach the router's gRPC port.
  const std::vector<std::string> experts = {addr("expert-0", "grpc"), addr("expert-1", "grpc"),
                                            addr("expert-2", "grpc")};
  EXPECT_EQ(Split(servers["router"].Flag("experts"), ','), experts);
  EXPECT_TRUE(servers["router"].Has("controller"));
  EXPECT_EQ(servers["gateway"].Flag("routers"), addr("router", "grpc"));
  for (int i = 0; i < 3; ++i) {
    const std::string name = "expert-" + std::to_string(i);
    const json env = services[name]["environment"];
    EXPECT_EQ(env.value("DMOE_ADVERTISE", ""), experts[i]);
    EXPECT_EQ(env.value("DMOE_EXPERTS", ""), servers["router"].Flag("experts"));
    EXPECT_EQ(env.value("DMOE_ROUTER", ""), addr("router", "grpc"));
    // stop_grace_period covers leave + drain.
    const std::string grace = services[name].value("stop_grace_period", "10s");
    EXPECT_GE(std::stoi(grace), std::stoi(servers[name].Flag("leave-timeout-s")) +
                                    std::stoi(servers[name].Flag("drain-timeout-s")));
  }
  // Prometheus scrapes every server's metrics port, with the router's names for
  // the expert servers.
  const json prom = YamlDocs(python_, ReadFile(src_ + "/deploy/prometheus/prometheus.yml"))[0];
  std::set<std::string> scraped;
  for (const json& job : prom["scrape_configs"]) {
    for (const json& sc : job["static_configs"]) {
      for (const json& t : sc["targets"]) {
        const std::string target = t;
        scraped.insert(target);
        const std::string host = target.substr(0, target.find(':'));
        ASSERT_TRUE(served.count(host)) << target << " is not a dmoe service";
        const int metrics =
            served[host].count("metrics") ? served[host]["metrics"] : served[host]["http"];
        EXPECT_EQ(target, host + ":" + std::to_string(metrics));
        if (host.rfind("expert-", 0) == 0) {
          const int i = std::stoi(host.substr(7));
          EXPECT_EQ(sc["labels"].value("address", ""), experts[i]);
          EXPECT_EQ(sc["labels"].value("server", ""), std::to_string(i));
          EXPECT_EQ(job["job_name"], "dmoe-expert");
        }
      }
    }
  }
  EXPECT_EQ(scraped.size(), 5u);
  // The files Prometheus and Grafana mount exist, where their configs expect
  // them.
  for (const std::string& s : std::vector<std::string>{"prometheus", "grafana"}) {
    for (const json& v : services[s]["volumes"]) {
      // Short syntax SOURCE:TARGET[:MODE], or the long one.
      const std::string source =
          v.is_string() ? Split(v.get<std::string>(), ':')[0] : v.value("source", std::string());
      if (source.empty() || source[0] != '/') continue;  // a named volume
      EXPECT_TRUE(fs::exists(source)) << source;
    }
  }
  EXPECT_EQ(prom["rule_files"][0], "/etc/prometheus/rules/dmoe-rules.yml");
  const json provider =
      YamlDocs(python_, ReadFile(src_ + "/deploy/grafana/provisioning/dashboards/dmoe.yml"))[0];
  EXPECT_EQ(provider["providers"][0]["options"]["path"], "/var/lib/grafana/dashboards");
}

// ------------------------------------------------------------------ linters

TEST_F(DeployTest, YamllintIsClean) {
  const std::string yamllint = FindInPath("yamllint");
  if (yamllint.empty()) GTEST_SKIP() << "no yamllint (apt-get install yamllint)";
  const RunResult r =
      Exec({yamllint, "-s", "-c", src_ + "/.yamllint", "deploy", "docker-compose.yml", ".yamllint"},
           "", 120, src_);
  EXPECT_EQ(r.code, 0) << r.out << r.err;
}

TEST_F(DeployTest, PromtoolAcceptsRulesAndConfig) {
  std::string promtool = FindInPath("promtool");
  if (promtool.empty()) GTEST_SKIP() << "no promtool (apt-get install prometheus)";
  const RunResult rules =
      Exec({promtool, "check", "rules", src_ + "/deploy/prometheus/dmoe-rules.yml"});
  EXPECT_EQ(rules.code, 0) << rules.out << rules.err;
  const RunResult cfg = Exec(
      {promtool, "check", "config", "--syntax-only", src_ + "/deploy/prometheus/prometheus.yml"});
  EXPECT_EQ(cfg.code, 0) << cfg.out << cfg.err;
}

TEST_F(DeployTest, DashboardQueriesUseTheDatasourceVariable) {
  const json d =
      json::parse(ReadFile(src_ + "/deploy/grafana/dashboards/dmoe.json"), nullptr, false);
  ASSERT_FALSE(d.is_discarded());
  int exprs = 0;
  for (const json& p : d["panels"]) {
    if (p["type"] == "row") continue;
    EXPECT_EQ(p["datasource"]["uid"], "${datasource}") << p["title"];
    ASSERT_FALSE(p.value("targets", json::array()).empty()) << p["title"];
    for (const json& t : p["targets"]) exprs += !t.value("expr", "").empty();
  }
  EXPECT_GE(exprs, 30);
}

// ------------------------------------------------------------------ images

// The Debian packages of the shared libraries the four programs link:
// package -> "BINARY links LIBRARY" (computed once: ldd, then one dpkg -S).
const std::map<std::string, std::string>& LinkedPackages(const std::string& dpkg) {
  static const std::map<std::string, std::string> packages = [&] {
    std::map<std::string, std::string> libs;  // resolved path -> the binary linking it
    for (const std::string& bin :
         std::vector<std::string>{"dmoe", "dmoe-router", "dmoe-expert", "dmoe-gateway"}) {
      const RunResult ldd = Exec({"ldd", BinDir() + "/" + bin});
      EXPECT_EQ(ldd.code, 0) << ldd.err;
      std::stringstream ls(ldd.out);
      for (std::string line; std::getline(ls, line);) {
        std::smatch m;
        if (std::regex_search(line, m, std::regex(R"(=> (/\S+))")))
          libs[fs::canonical(m[1].str()).string()] = bin;
      }
    }
    EXPECT_FALSE(libs.empty());
    // dpkg knows a file by the path its package ships (/lib or /usr/lib on
    // merged /usr).
    std::vector<std::string> argv = {dpkg, "-S"};
    for (const auto& [lib, bin] : libs) {
      argv.push_back(lib);
      argv.push_back(std::regex_replace(lib, std::regex("^/usr/lib/"), "/lib/"));
    }
    std::map<std::string, std::string> owner;  // path -> package
    std::stringstream out(Exec(argv).out);
    for (std::string line; std::getline(out, line);) {
      const size_t sep = line.find(": /");
      if (sep == std::string::npos) continue;
      std::string pkg = line.substr(0, sep);
      pkg = pkg.substr(0, pkg.find_first_of(":,"));
      owner[line.substr(sep + 2)] = pkg;
    }
    std::map<std::string, std::string> pkgs;
    for (const auto& [lib, bin] : libs) {
      if (lib.find("libcuda") != std::string::npos || lib.find("libcublas") != std::string::npos)
        continue;
      std::string pkg = owner[lib];
      if (pkg.empty()) pkg = owner[std::regex_replace(lib, std::regex("^/usr/lib/"), "/lib/")];
      EXPECT_FALSE(pkg.empty()) << lib << " belongs to no Debian package";
      if (!pkg.empty()) pkgs[pkg] = bin + " links " + lib;
    }
    return pkgs;
  }();
  return packages;
}

// Every file the Dockerfiles COPY from the build context exists; every program
// and script the manifests start is installed; the runtime stage installs the
// Debian package of every shared library the binaries link (checked with ldd
// and dpkg on this Debian machine, the images' base).
TEST_F(DeployTest, DockerfilesCopyWhatExistsAndInstallEveryLinkedLibrary) {
  for (const std::string& name : std::vector<std::string>{"Dockerfile.cpu", "Dockerfile.cuda"}) {
    SCOPED_TRACE(name);
    const std::string text = ReadFile(src_ + "/deploy/docker/" + name);
    ASSERT_FALSE(text.empty());
    // Join continuation lines.
    const std::string joined = std::regex_replace(text, std::regex(R"(\\\n)"), " ");
    std::set<std::string> installed_bins, runtime_pkgs;
    std::stringstream lines(joined);
    bool runtime_stage = false;
    for (std::string line; std::getline(lines, line);) {
      std::smatch m;
      if (std::regex_search(line, m, std::regex(R"(^FROM\s+\S+\s+AS\s+(\S+))")))
        runtime_stage = m[1] == "runtime";
      if (std::regex_search(line, m, std::regex(R"(^COPY\s+(.*)$)"))) {
        std::vector<std::string> words;
        std::stringstream ws(m[1].str());
        for (std::string w; ws >> w;) words.push_back(w);
        const bool from_stage = !words.empty() && words[0].rfind("--from=", 0) == 0;
        if (from_stage) words.erase(words.begin());
        const std::string dest = words.back();
        words.pop_back();
        for (const std::string& w : words) {
          if (!from_stage && w != ".") {
            EXPECT_TRUE(fs::exists(src_ + "/" + w)) << "COPY " << w;
          }
          if (dest.back() == '/') installed_bins.insert(fs::path(w).filename().string());
        }
        if (dest.back() != '/' && words.size() == 1)
          installed_bins.insert(fs::path(dest).filename().string());
      }
      if (runtime_stage && line.find("apt-get install") != std::string::npos) {
        std::stringstream ws(line.substr(line.find("apt-get install")));
        for (std::string w; ws >> w;) {
          if (w == "&&") break;
          if (w[0] != '-') runtime_pkgs.insert(w);
        }
      }
    }
    for (const std::string& bin : std::vector<std::string>{
             "dmoe", "dmoe-router", "dmoe-expert", "dmoe-gateway", "dmoe-grpc-health-probe",
             "dmoe-expert-entrypoint", "dmoe-healthcheck"}) {
      EXPECT_TRUE(installed_bins.count(bin)) << bin << " is not installed in the image";
    }
    for (const std::string& tool : std::vector<std::string>{"tini", "jq", "curl"})
      EXPECT_TRUE(runtime_pkgs.count(tool)) << tool;
    // Shared libraries -> Debian packages -> installed by the runtime stage or
    // pulled in by one that is (dpkg's Depends, recursively).
    const std::string dpkg_query = FindInPath("dpkg-query"), dpkg = FindInPath("dpkg");
    if (dpkg_query.empty() || dpkg.empty()) continue;
    std::map<std::string, std::vector<std::string>>
        depends;  // installed package -> first alternatives
    const RunResult all = Exec({dpkg_query, "-W", "-f=${Package}\t${Depends}, ${Pre-Depends}\n"});
    std::stringstream ps(all.out);
    for (std::string line; std::getline(ps, line);) {
      const size_t tab = line.find('\t');
      if (tab == std::string::npos) continue;
      auto& deps = depends[line.substr(0, tab)];
      for (const std::string& alt : Split(line.substr(tab + 1), ',')) {
        std::stringstream as(alt);
        std::string first;
        as >> first;  // the first alternative, without version or architecture
        first = first.substr(0, first.find(':'));
        if (!first.empty()) deps.push_back(first);
      }
    }
    std::set<std::string> closure;
    std::vector<std::string> todo(runtime_pkgs.begin(), runtime_pkgs.end());
    while (!todo.empty()) {
      const std::string p = todo.back();
      todo.pop_back();
      if (!closure.insert(p).second) continue;
      for (const std::string& d : depends[p]) todo.push_back(d);
    }
    for (const auto& [pkg, what] : LinkedPackages(dpkg)) {
      EXPECT_TRUE(closure.count(pkg))
          << what << " from " << pkg << ", which the runtime stage does not install";
    }
  }
}

// ------------------------------------------------------------------ entrypoint

// The value of an unlabelled series in Prometheus text, or -1.
double MetricValue(const std::string& text, const std::string& name) {
  std::smatch m;
  if (std::regex_search(text, m, std::regex("\n" + name + " ([0-9.e+-]+)"))) return std::stod(m[1]);
  return -1;
}

struct Placement {
  int64_t version = -1;
  std::vector<std::string> servers;
  std::vector<int> slots;  // per server, summed over layers
};

absl::StatusOr<Placement> GetPlacement(int router_port) {
  const RunResult r = Exec({BinDir() + "/dmoe", "ctl", "placement", "--router",
                            "127.0.0.1:" + std::to_string(router_port), "--json"});
  if (r.code != 0) return absl::UnavailableError(r.err);
  const json j = json::parse(r.out, nullptr, false);
  if (j.is_discarded()) return absl::InternalError(r.out);
  Placement p;
  p.version = j["version"];
  p.servers = j["servers"].get<std::vector<std::string>>();
  p.slots.assign(p.servers.size(), 0);
  for (const json& l : j["placement"]["layers"]) {
    for (size_t s = 0; s < p.servers.size(); ++s)
      p.slots[s] += static_cast<int>(l["servers"][s].size());
  }
  return p;
}

// The scheme of dmoe-expert-entrypoint, run for real: two initial servers start
// before the router (its starting placement), a third one joins the placement
// controller, and a killed initial server restarts into its current slots. The
// images' health checks then probe the running servers.
TEST_F(DeployTest, ExpertEntrypointStartsJoinsAndResumes) {
  if (FindInPath("jq").empty())
    GTEST_SKIP() << "no jq (apt-get install jq): the entrypoint needs it";
  const std::string dir = testing::FreshDir("entrypoint");
  const std::string model = testing::MakeModel("tiny-v3", 7);  // 16 routed experts
  const std::string script = src_ + "/deploy/docker/dmoe-expert-entrypoint.sh";
  const int router_port = FreePort();
  const std::vector<int> ports = {FreePort(), FreePort(), FreePort()};
  auto address = [&](int i) { return "127.0.0.1:" + std::to_string(ports[i]); };
  const std::string initial = address(0) + "," + address(1);
  const std::string router = "127.0.0.1:" + std::to_string(router_port);
  std::vector<std::unique_ptr<ChildProcess>> experts(3);
  auto start_expert = [&](int i) {
    experts[i] = std::make_unique<ChildProcess>();
    const std::string log = dir + "/expert" + std::to_string(i) + ".log";
    std::remove((dir + "/expert" + std::to_string(i) + ".metrics").c_str());
    return experts[i]->Start(
        {"/usr/bin/env", "DMOE_EXPERTS=" + initial, "DMOE_ADVERTISE=" + address(i),
         "DMOE_ROUTER=" + router, "DMOE_EXPERT_BIN=" + BinDir() + "/dmoe-expert",
         "DMOE_CLI_BIN=" + BinDir() + "/dmoe", "DMOE_STATE_DIR=" + dir, "sh", script,
         "--model=" + model, "--host=127.0.0.1", "--port=" + std::to_string(ports[i]),
         "--metrics-port=0",
         "--metrics-port-file=" + dir + "/expert" + std::to_string(i) + ".metrics", "--dtype=f32",
         "--threads=1", "--leave-timeout-s=10", "--drain-timeout-s=5"},
        log);
  };
  auto log_of = [&](int i) { return experts[i]->Log(); };
  // 1. Initial servers, router not up yet: the starting placement.
  for (int i = 0; i < 2; ++i) {
    ASSERT_TRUE(start_expert(i));
    ASSERT_GT(
        testing::WaitForPortFile(dir + "/expert" + std::to_string(i) + ".metrics", *experts[i]), 0)
        << log_of(i);
    EXPECT_NE(log_of(i).find("initial server " + std::to_string(i) + " of 2"), std::string::npos)
        << log_of(i);
  }
  ChildProcess router_proc;
  ASSERT_TRUE(router_proc.Start({BinDir() + "/dmoe-router",
                                 "--model",
                                 model,
                                 "--experts",
                                 initial,
                                 "--controller",
                                 "--slots-per-server",
                                 "8",
                                 "--rebalance",
                                 "manual",
                                 "--dtype",
                                 "f32",
                                 "--threads",
                                 "1",
                                 "--port",
                                 std::to_string(router_port),
                                 "--port-file",
                                 dir + "/router.port",
                                 "--metrics-port",
                                 "0"},
                                dir + "/router.log"));
  ASSERT_GT(testing::WaitForPortFile(dir + "/router.port", router_proc), 0) << router_proc.Log();
  // 2. A server beyond the initial ones joins.
  ASSERT_TRUE(start_expert(2));
  Placement p;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (std::chrono::steady_clock::now() < deadline) {
    auto got = GetPlacement(router_port);
    if (got.ok()) p = *got;
    if (p.servers.size() == 3 && p.slots[2] > 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  ASSERT_EQ(p.servers.size(), 3u) << log_of(2) << router_proc.Log();
  EXPECT_EQ(p.servers[2], address(2));
  EXPECT_GT(p.slots[2], 0) << "the joiner got slots:\n" << log_of(2);
  EXPECT_GE(p.version, 2);
  EXPECT_NE(log_of(2).find("joining"), std::string::npos) << log_of(2);
  // 3. An initial server dies and comes back before the controller gives up on
  // it
  //    (--server-lost-after-s): it resumes its slots of the current placement.
  experts[1]->Kill(SIGKILL);
  ASSERT_TRUE(start_expert(1));
  const int metrics_port = testing::WaitForPortFile(dir + "/expert1.metrics", *experts[1]);
  ASSERT_GT(metrics_port, 0) << log_of(1);
  EXPECT_NE(log_of(1).find("resuming placement version " + std::to_string(p.version)),
            std::string::npos)
      << log_of(1);
  EXPECT_EQ(
      MetricValue(testing::HttpGetBody(metrics_port, "/metrics"), "moe_expert_placement_version"),
      p.version);
  auto after = GetPlacement(router_port);
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(after->version, p.version) << "nothing re-placed: the server took its old place";

  // The images' health checks against the running servers.
  const std::string gxx = FindInPath("g++"), pkg_config = FindInPath("pkg-config");
  if (gxx.empty() || pkg_config.empty() || Exec({pkg_config, "--exists", "grpc++"}).code != 0) {
    GTEST_SKIP() << "no g++ / pkg-config grpc++ to build "
                    "deploy/docker/grpc_health_probe.cc";
  }
  const RunResult flags = Exec({pkg_config, "--cflags", "--libs", "grpc++"});
  std::vector<std::string> cc = {gxx,
                                 "-std=c++17",
                                 "-O1",
                                 "-o",
                                 dir + "/dmoe-grpc-health-probe",
                                 src_ + "/deploy/docker/grpc_health_probe.cc"};
  std::stringstream fs_(flags.out);
  for (std::string f; fs_ >> f;) cc.push_back(f);
  const RunResult built = Exec(cc, "", 300);
  ASSERT_EQ(built.code, 0) << built.err;
  const std::string path = "PATH=" + dir + ":" + std::getenv("PATH");
  const std::string healthcheck = src_ + "/deploy/docker/healthcheck.sh";
  for (const int port : {router_port, ports[0], ports[1], ports[2]}) {
    const RunResult hc =
        Exec({"/usr/bin/env", path, "DMOE_HEALTH_CHECK=grpc:" + std::to_string(port), "sh",
              healthcheck});
    EXPECT_EQ(hc.code, 0) << port << ": " << hc.out << hc.err;
    EXPECT_NE(hc.out.find("SERVING"), std::string::npos) << hc.out;
  }
  const RunResult down =
      Exec({"/usr/bin/env", path, "DMOE_HEALTH_CHECK=grpc:" + std::to_string(FreePort()), "sh",
            healthcheck});
  EXPECT_EQ(down.code, 1) << "nothing listens there: unhealthy\n" << down.out << down.err;
  const RunResult http = Exec(
      {"/usr/bin/env", path, "DMOE_HEALTH_CHECK=http:" + std::to_string(metrics_port) + "/metrics",
       "sh", healthcheck});
  if (!FindInPath("curl").empty()) {
    EXPECT_EQ(http.code, 0) << http.err;
  }

  EXPECT_EQ(router_proc.Kill(SIGTERM), 0) << router_proc.Log();
  for (auto& e : experts) e->Kill(SIGKILL);
}

}  // namespace
}  // namespace dmoe
