// `dmoe forward` and `dmoe generate`.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/isa.h"
#include "core/kernels/cpu/linear.h"
#include "core/npy.h"
#include "core/sampler.h"
#include "core/status.h"
#include "core/sys_stats.h"
#include "nlohmann/json.hpp"
#include "tools/commands.h"
#include "tools/model_flags.h"

namespace dmoe::tools {
namespace {

absl::StatusOr<std::vector<int32_t>> PromptTokens(const Args& args) {
  DMOE_ASSIGN_OR_RETURN(std::vector<int64_t> ids, args.IntList("tokens"));
  if (ids.empty()) return absl::InvalidArgumentError("--tokens: give at least one token id");
  std::vector<int32_t> out;
  for (int64_t id : ids) {
    if (id < 0 || id > INT32_MAX) {
      return absl::InvalidArgumentError(
          absl::StrCat("--tokens: token id ", id, " is out of range"));
    }
    out.push_back(static_cast<int32_t>(id));
  }
  return out;
}

void PrintStats(const LoadedModel& m, int64_t tokens, double seconds, const char* what) {
  std::fprintf(stderr,
               "stats: load %.2f s, weights %.1f MiB, %s %lld tokens in %.3f s (%.1f tok/s), "
               "threads %d, peak RSS %.1f MiB, RSS now %.1f MiB\n"
               "stats: %s\n",
               m.load_seconds, m.model->WeightBytes() / 1048576.0, what,
               static_cast<long long>(tokens), seconds, tokens / std::max(seconds, 1e-9),
               core::ComputeThreads(), core::PeakRssBytes() / 1048576.0,
               core::CurrentRssBytes() / 1048576.0, core::IsaSummary().c_str());
}

void PrintExpertLoad(const core::Model& m) {
  const auto& load = m.expert_load();
  for (size_t l = 0; l < load.size(); ++l) {
    if (!m.config().IsMoeLayer(static_cast<int64_t>(l))) continue;
    std::fprintf(stderr, "expert load, layer %zu: [%s]\n", l, absl::StrJoin(load[l], ",").c_str());
  }
}

absl::Status Forward(const Args& args) {
  DMOE_ASSIGN_OR_RETURN(std::vector<int32_t> prompt, PromptTokens(args));
  const std::string out_path = args.Str("dump-logits");
  DMOE_ASSIGN_OR_RETURN(LoadedModel m, LoadModelFromFlags(args));
  core::KvCache cache(m.model->config(), m.kv_cache_bytes, core::KvCache::kDefaultBlockTokens,
                      false, m.kv_dtype);
  DMOE_ASSIGN_OR_RETURN(int32_t seq, cache.Allocate(static_cast<int64_t>(prompt.size())));
  core::SeqInput in{seq, prompt, /*all_logits=*/true};
  std::vector<float> logits;
  const auto t0 = std::chrono::steady_clock::now();
  DMOE_RETURN_IF_ERROR(m.model->Forward({&in, 1}, cache, &logits));
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const int64_t V = m.model->config().vocab_size;
  const int64_t shape[2] = {static_cast<int64_t>(prompt.size()), V};
  if (!out_path.empty()) {
    DMOE_RETURN_IF_ERROR(core::WriteNpyF32(out_path, logits, shape));
  } else {
    // No dump requested: print the argmax of every position.
    std::vector<int32_t> argmax;
    for (int64_t t = 0; t < shape[0]; ++t) {
      argmax.push_back(core::ArgMax({logits.data() + t * V, static_cast<size_t>(V)}));
    }
    nlohmann::json j;
    j["prompt_tokens"] = prompt;
    j["argmax"] = argmax;
    std::printf("%s\n", j.dump().c_str());
  }
  if (args.Bool("stats")) {
    PrintStats(m, static_cast<int64_t>(prompt.size()), secs, "prefill");
    PrintExpertLoad(*m.model);
  }
  return absl::OkStatus();
}

absl::Status Generate(const Args& args) {
  DMOE_ASSIGN_OR_RETURN(std::vector<int32_t> prompt, PromptTokens(args));
  DMOE_ASSIGN_OR_RETURN(int64_t max_tokens, args.Int("max-tokens"));
  if (max_tokens < 0 || max_tokens > (1 << 24)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max-tokens must be in [0, 16777216], got ", max_tokens));
  }
  core::SamplingParams sp;
  DMOE_ASSIGN_OR_RETURN(sp.temperature, args.Double("temperature"));
  DMOE_ASSIGN_OR_RETURN(sp.top_k, args.Int("top-k"));
  DMOE_ASSIGN_OR_RETURN(sp.top_p, args.Double("top-p"));
  DMOE_ASSIGN_OR_RETURN(int64_t seed, args.Int("seed"));
  sp.seed = static_cast<uint64_t>(seed);
  DMOE_RETURN_IF_ERROR(sp.Validate());
  DMOE_ASSIGN_OR_RETURN(std::vector<int64_t> stop_ids, args.IntList("stop-ids"));
  const bool ignore_eos = args.Bool("ignore-eos");

  DMOE_ASSIGN_OR_RETURN(LoadedModel m, LoadModelFromFlags(args));
  const core::ModelConfig& cfg = m.model->config();
  std::vector<int64_t> stops = stop_ids;
  if (!ignore_eos) stops.insert(stops.end(), cfg.eos_token_ids.begin(), cfg.eos_token_ids.end());

  core::KvCache cache(cfg, m.kv_cache_bytes, core::KvCache::kDefaultBlockTokens, false, m.kv_dtype);
  DMOE_ASSIGN_OR_RETURN(int32_t seq, cache.Allocate(static_cast<int64_t>(prompt.size()) +
                                                    std::max<int64_t>(max_tokens, 1)));
  core::Sampler sampler(sp);
  std::vector<int32_t> generated;
  std::vector<float> logits;
  std::string finish = "length";
  const auto t0 = std::chrono::steady_clock::now();
  double prefill_s = 0;
  std::vector<int32_t> step = prompt;
  while (static_cast<int64_t>(generated.size()) < max_tokens) {
    core::SeqInput in{seq, step, false};
    DMOE_RETURN_IF_ERROR(m.model->Forward({&in, 1}, cache, &logits));
    if (prefill_s == 0) {
      prefill_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    const int32_t next = sampler.Sample(logits);
    generated.push_back(next);
    if (std::find(stops.begin(), stops.end(), next) != stops.end()) {
      finish = "stop";
      break;
    }
    step.assign(1, next);
  }
  const double total_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (args.Bool("json")) {
    nlohmann::json j;
    j["prompt_tokens"] = prompt;
    j["tokens"] = generated;
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::printf("prompt:    %s\ngenerated: %s\nfinish:    %s\n", absl::StrJoin(prompt, " ").c_str(),
                absl::StrJoin(generated, " ").c_str(), finish.c_str());
  }
  if (args.Bool("stats")) {
    PrintStats(m, static_cast<int64_t>(prompt.size()), prefill_s, "prefill");
    const int64_t decoded = static_cast<int64_t>(generated.size()) - 1;
    if (decoded > 0) {
      std::fprintf(stderr, "stats: decode %lld tokens in %.3f s (%.1f tok/s)\n",
                   static_cast<long long>(decoded), total_s - prefill_s,
                   decoded / std::max(total_s - prefill_s, 1e-9));
    }
    PrintExpertLoad(*m.model);
  }
  return absl::OkStatus();
}

}  // namespace

int RunForward(int argc, char** argv) {
  Args args("forward", "run a prompt through the model and write the logits of every position");
  AddModelFlags(args);
  args.Flag("tokens", "IDS", "prompt token ids, comma-separated", std::nullopt, true)
      .Flag("dump-logits", "OUT.npy",
            "write logits [T, vocab] as little-endian float32 .npy (else print the argmax)");
  if (auto s = args.Parse(argc, argv, 2); !s.ok()) return ReportError("forward", s) + 1;
  if (args.help_requested()) return 0;
  if (auto s = Forward(args); !s.ok()) return ReportError("forward", s);
  return 0;
}

int RunGenerate(int argc, char** argv) {
  Args args("generate", "generate tokens after a prompt, using the KV cache");
  AddModelFlags(args);
  args.Flag("tokens", "IDS", "prompt token ids, comma-separated", std::nullopt, true)
      .Flag("max-tokens", "N", "tokens to generate at most", "16")
      .Flag("temperature", "T", "sampling temperature; 0 = greedy", "0")
      .Flag("top-k", "K", "sample among the K most likely tokens (0 = all)", "0")
      .Flag("top-p", "P", "nucleus sampling mass", "1")
      .Flag("seed", "S", "random seed for sampling", "0")
      .Flag("stop-ids", "IDS", "extra token ids that end generation, comma-separated", "")
      .Flag("ignore-eos", "", "do not stop at the model's eos token(s)")
      .Flag("json", "", "print {\"prompt_tokens\":[...],\"tokens\":[...]} only");
  if (auto s = args.Parse(argc, argv, 2); !s.ok()) return ReportError("generate", s) + 1;
  if (args.help_requested()) return 0;
  if (auto s = Generate(args); !s.ok()) return ReportError("generate", s);
  return 0;
}

}  // namespace dmoe::tools
