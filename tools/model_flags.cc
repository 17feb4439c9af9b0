#include "tools/model_flags.h"

#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "core/expert_backend.h"
#include "core/kernels/cpu/linear.h"
#include "core/status.h"

namespace dmoe::tools {

void AddModelFlags(Args& args) {
  args.Flag("model", "DIR", "checkpoint directory (config.json + *.safetensors)", std::nullopt,
            true)
      .Flag("dtype", "f32|bf16",
            "compute type: f32 = exact mode (fp32 activations and weights), bf16 = serving mode",
            "bf16")
      .Flag("expert-weights", "auto|f32|bf16|int8",
            "format of the routed and shared experts' weights (auto = --dtype; int8 = "
            "per-channel symmetric, quantised at load)",
            "auto")
      .Flag("threads", "N", "compute threads (0 = all cores)", "0")
      .Flag("kv-cache-bytes", "BYTES", "KV cache budget in bytes", "1073741824")
      .Flag("kv-dtype", "f32|f16|bf16",
            "KV cache storage (f16 / bf16: half the bytes, values rounded once when stored)", "f32")
      .Flag("stats", "", "print load time, weight bytes, peak RSS and speed to stderr")
      .Flag("quiet", "", "no progress bar");
}

int ReportError(const std::string& cmd, const absl::Status& status) {
  std::fprintf(stderr, "dmoe %s: %s\n", cmd.c_str(), std::string(status.message()).c_str());
  return 1;
}

absl::StatusOr<LoadedModel> LoadModelFromFlags(const Args& args) {
  LoadedModel out;
  core::ModelOptions opts;
  const std::string dtype = args.Str("dtype");
  if (dtype == "f32") {
    opts.compute = core::ComputeType::kF32;
  } else if (dtype == "bf16") {
    opts.compute = core::ComputeType::kBF16;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--dtype must be f32 or bf16, got '", dtype, "'"));
  }
  absl::StatusOr<core::ComputeType> weights =
      core::ParseExpertWeights(args.Str("expert-weights"), opts.compute);
  if (!weights.ok()) {
    return absl::Status(weights.status().code(), absl::StrCat("--", weights.status().message()));
  }
  if (*weights != opts.compute) opts.experts = core::MakeCpuExpertBackend(*weights);
  DMOE_ASSIGN_OR_RETURN(int64_t threads, args.Int("threads"));
  if (threads < 0 || threads > 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("--threads must be in [0, 1024], got ", threads));
  }
  core::SetComputeThreads(static_cast<int>(threads));
  DMOE_ASSIGN_OR_RETURN(int64_t kv_bytes, args.Int("kv-cache-bytes"));
  if (kv_bytes <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--kv-cache-bytes must be positive, got ", kv_bytes));
  }
  out.kv_cache_bytes = static_cast<size_t>(kv_bytes);
  const std::string kv_dtype = args.Str("kv-dtype");
  if (kv_dtype != "f32" && kv_dtype != "f16" && kv_dtype != "bf16") {
    return absl::InvalidArgumentError(
        absl::StrCat("--kv-dtype must be f32, f16 or bf16, got '", kv_dtype, "'"));
  }
  out.kv_dtype = kv_dtype == "bf16"  ? core::KvDtype::kBF16
                 : kv_dtype == "f16" ? core::KvDtype::kF16
                                     : core::KvDtype::kF32;

  const std::string dir = args.Str("model");
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) {
    return absl::NotFoundError(absl::StrCat("--model: '", dir, "' is not a directory"));
  }
  // A progress bar for models whose files exceed 256 MB, or whenever stderr is a tty.
  uintmax_t bytes = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
    if (e.path().extension() == ".safetensors") bytes += e.file_size(ec);
  }
  const bool show = !args.Bool("quiet") && (isatty(STDERR_FILENO) || bytes > (256u << 20));
  if (show) {
    // Redraw in place on a terminal; elsewhere (logs) one line per 10%.
    const bool tty = isatty(STDERR_FILENO);
    opts.progress = [tty, last = -1](int64_t done, int64_t total) mutable {
      const int pct = static_cast<int>(100 * done / std::max<int64_t>(total, 1));
      if (pct == last || (!tty && pct / 10 == last / 10 && done != total)) return;
      last = pct;
      const int width = 40;
      const int filled = width * pct / 100;
      std::fprintf(stderr, "%sloading [%s%s] %3d%%%s", tty ? "\r" : "",
                   std::string(filled, '#').c_str(), std::string(width - filled, ' ').c_str(), pct,
                   tty && done != total ? "" : "\n");
      std::fflush(stderr);
    };
  }
  const auto t0 = std::chrono::steady_clock::now();
  DMOE_ASSIGN_OR_RETURN(out.model, core::Model::Load(dir, std::move(opts)));
  out.load_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return out;
}

}  // namespace dmoe::tools
