// The router's step breakdown for serve_bench: moe_router_step_stage_seconds_total
// and moe_router_phase_steps_total scraped from the router's /metrics before
// and after a run, and their difference per phase (decode / prefill steps).
//
// Contract:
//   ParseStageCounters(text)  the two families' values from Prometheus text
//                             (other lines ignored; unparsable values skipped).
//   Delta(after, before)      per (phase, stage) seconds and steps of the run.
//   Format(delta)             one line per phase with steps and, per stage, ms
//                             per step and its share of the step ("" when the
//                             run had no steps).
#ifndef DMOE_BENCH_SERVE_STAGE_PROFILE_H_
#define DMOE_BENCH_SERVE_STAGE_PROFILE_H_

#include <map>
#include <string>

#include "nlohmann/json.hpp"

namespace dmoe::bench::serve {

struct StageCounters {
  std::map<std::string, std::map<std::string, double>> seconds;  // [phase][stage]
  std::map<std::string, double> steps;                           // [phase]
};

StageCounters ParseStageCounters(const std::string& text);
StageCounters Delta(const StageCounters& after, const StageCounters& before);
std::string Format(const StageCounters& d);
nlohmann::json ToJson(const StageCounters& d);

}  // namespace dmoe::bench::serve

#endif  // DMOE_BENCH_SERVE_STAGE_PROFILE_H_
