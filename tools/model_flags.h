// Flags shared by the CLI commands that load a model (forward, generate), and
// the loading itself with a progress bar on stderr.
#ifndef DMOE_TOOLS_MODEL_FLAGS_H_
#define DMOE_TOOLS_MODEL_FLAGS_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/args.h"
#include "core/model.h"

namespace dmoe::tools {

using ::dmoe::common::Args;

// Declares --model, --dtype, --threads, --kv-cache-bytes, --kv-dtype, --stats, --quiet.
void AddModelFlags(Args& args);

struct LoadedModel {
  std::unique_ptr<core::Model> model;
  double load_seconds = 0;
  size_t kv_cache_bytes = 0;
  core::KvDtype kv_dtype = core::KvDtype::kF32;
};

// Validates the model flags, sets the compute thread pool and loads the model,
// drawing a progress bar on stderr when it is a terminal or the model is large.
absl::StatusOr<LoadedModel> LoadModelFromFlags(const Args& args);

// Prints `status` as "dmoe <cmd>: <message>" and returns the exit code (1).
int ReportError(const std::string& cmd, const absl::Status& status);

}  // namespace dmoe::tools

#endif  // DMOE_TOOLS_MODEL_FLAGS_H_
