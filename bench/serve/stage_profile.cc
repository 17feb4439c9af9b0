#include "bench/serve/stage_profile.h"

#include <cstdlib>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace dmoe::bench::serve {
namespace {

// The value of label `name` in `labels` ("a=\"x\",b=\"y\""), or "".
std::string Label(const std::string& labels, const std::string& name) {
  const std::string key = name + "=\"";
  size_t at = labels.find(key);
  while (at != std::string::npos && at > 0 && labels[at - 1] != ',' && labels[at - 1] != '{') {
    at = labels.find(key, at + 1);
  }
  if (at == std::string::npos) return "";
  const size_t begin = at + key.size();
  const size_t end = labels.find('"', begin);
  return end == std::string::npos ? "" : labels.substr(begin, end - begin);
}

}  // namespace

StageCounters ParseStageCounters(const std::string& text) {
  StageCounters c;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    const bool stage = line.rfind("moe_router_step_stage_seconds_total{", 0) == 0;
    const bool steps = line.rfind("moe_router_phase_steps_total{", 0) == 0;
    if (!stage && !steps) continue;
    const size_t open = line.find('{'), close = line.find('}', open);
    if (close == std::string::npos || close + 1 >= line.size()) continue;
    const std::string labels = line.substr(open, close - open + 1);
    char* end = nullptr;
    const double v = std::strtod(line.c_str() + close + 1, &end);
    if (end == line.c_str() + close + 1) continue;
    const std::string phase = Label(labels, "phase");
    if (phase.empty()) continue;
    if (stage) {
      const std::string name = Label(labels, "stage");
      if (!name.empty()) c.seconds[phase][name] = v;
    } else {
      c.steps[phase] = v;
    }
  }
  return c;
}

StageCounters Delta(const StageCounters& after, const StageCounters& before) {
  StageCounters d;
  for (const auto& [phase, stages] : after.seconds) {
    for (const auto& [stage, v] : stages) {
      double b = 0;
      if (auto p = before.seconds.find(phase); p != before.seconds.end()) {
        if (auto s = p->second.find(stage); s != p->second.end()) b = s->second;
      }
      d.seconds[phase][stage] = v - b;
    }
  }
  for (const auto& [phase, v] : after.steps) {
    const auto b = before.steps.find(phase);
    d.steps[phase] = v - (b == before.steps.end() ? 0 : b->second);
  }
  return d;
}

std::string Format(const StageCounters& d) {
  std::string out;
  for (const auto& [phase, stages] : d.seconds) {
    const auto n = d.steps.find(phase);
    if (n == d.steps.end() || n->second <= 0) continue;
    double total = 0;
    for (const auto& [stage, v] : stages) total += v;
    absl::StrAppendFormat(&out, "    %-7s %6.0f steps, %.2f ms/step:", phase, n->second,
                          total / n->second * 1e3);
    for (const char* stage : {"embed", "norm", "attention", "gate", "experts", "dense_ffn",
                              "combine", "lm_head", "sample", "schedule"}) {
      const auto s = stages.find(stage);
      if (s == stages.end()) continue;
      absl::StrAppendFormat(&out, " %s %.2f (%.0f%%)", stage, s->second / n->second * 1e3,
                            total > 0 ? 100 * s->second / total : 0.0);
    }
    out += "\n";
  }
  return out;
}

nlohmann::json ToJson(const StageCounters& d) {
  nlohmann::json j = nlohmann::json::object();
  for (const auto& [phase, stages] : d.seconds) {
    const auto n = d.steps.find(phase);
    const double steps = n == d.steps.end() ? 0 : n->second;
    nlohmann::json per_step = nlohmann::json::object();
    for (const auto& [stage, v] : stages) per_step[stage] = steps > 0 ? v / steps * 1e3 : 0.0;
    j[phase] = {{"steps", steps}, {"ms_per_step", per_step}};
  }
  return j;
}

}  // namespace dmoe::bench::serve
