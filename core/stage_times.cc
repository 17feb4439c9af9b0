#include "core/stage_times.h"

namespace dmoe::core {

const char* StageName(Stage s) {
  switch (s) {
    case Stage::kEmbed:
      return "embed";
    case Stage::kNorm:
      return "norm";
    case Stage::kAttention:
      return "attention";
    case Stage::kGate:
      return "gate";
    case Stage::kExperts:
      return "experts";
    case Stage::kDenseFfn:
      return "dense_ffn";
    case Stage::kCombine:
      return "combine";
    case Stage::kLmHead:
      return "lm_head";
    case Stage::kSample:
      return "sample";
    case Stage::kSchedule:
      return "schedule";
    case Stage::kCount:
      break;
  }
  return "?";
}

double StageTimes::Total() const {
  double t = 0;
  for (double s : seconds) t += s;
  return t;
}

}  // namespace dmoe::core
