// Where a forward step's time goes, by stage: filled by core::Model::Forward
// (embedding to output head) and by the router's scheduler (sampling and its
// own work around the forward pass), exported as
// moe_router_step_stage_seconds_total{stage, phase} and printed by serve_bench.
//
// With micro-batches the stages of one micro-batch run while another's
// experts are out: `experts` is the time the step itself spent on them
// (in-process compute, or waiting for expert servers), not their wall time.
#ifndef DMOE_CORE_STAGE_TIMES_H_
#define DMOE_CORE_STAGE_TIMES_H_

#include <array>
#include <chrono>

namespace dmoe::core {

enum class Stage : int {
  kEmbed,      // token embeddings
  kNorm,       // RMSNorm before attention and FFN
  kAttention,  // attention incl. KV-cache writes and the residual add
  kGate,       // MoE gate, expert selection and dispatch plan
  kExperts,    // MoE experts: submit (in-process compute) + await (remote wait)
  kDenseFfn,   // the dense layers' FFN
  kCombine,    // residual add of the FFN output, load counting, route hooks
  kLmHead,     // final norm and output head
  kSample,     // sampling (scheduler)
  kSchedule,   // the rest of the step: batching, bookkeeping, callbacks (scheduler)
  kCount
};

inline constexpr int kNumStages = static_cast<int>(Stage::kCount);

const char* StageName(Stage s);

struct StageTimes {
  std::array<double, kNumStages> seconds{};
  void Add(Stage s, double sec) { seconds[static_cast<int>(s)] += sec; }
  double Get(Stage s) const { return seconds[static_cast<int>(s)]; }
  void Clear() { seconds.fill(0.0); }
  double Total() const;
};

// Adds the time from construction (or the last Lap) to `stage` on Lap.
class StageClock {
 public:
  explicit StageClock(StageTimes* times) : times_(times), t_(std::chrono::steady_clock::now()) {}
  void Lap(Stage stage) {
    const auto now = std::chrono::steady_clock::now();
    times_->Add(stage, std::chrono::duration<double>(now - t_).count());
    t_ = now;
  }

 private:
  StageTimes* times_;
  std::chrono::steady_clock::time_point t_;
};

}  // namespace dmoe::core

#endif  // DMOE_CORE_STAGE_TIMES_H_
