// dmoe: the command-line tool. `dmoe <command> --help` describes each command.
#include <cstdio>
#include <cstring>
#include <string>

#include "core/isa.h"
#include "tools/commands.h"

namespace {

// `dmoe isa`: the instruction-set level the kernels run at; `--levels` lists
// every level this host can run (for scripts that test each, e.g.
// `for l in $(dmoe isa --levels); do DMOE_MAX_ISA=$l ...; done`).
int RunIsa(int argc, char** argv) {
  using dmoe::core::IsaLevel;
  if (argc > 2 && std::strcmp(argv[2], "--levels") == 0) {
    const int host = static_cast<int>(dmoe::core::HostIsa());
    for (int l = 0; l <= host; ++l) {
      std::printf("%s%s", l ? " " : "", dmoe::core::IsaName(static_cast<IsaLevel>(l)));
    }
    std::printf("\n");
    return 0;
  }
  if (argc > 2) {
    std::fprintf(stderr,
                 "usage: dmoe isa [--levels]\n  prints the active instruction-set level "
                 "(DMOE_MAX_ISA caps it), or with --levels every level this host "
                 "supports\n");
    return std::strcmp(argv[2], "--help") == 0 ? 0 : 2;
  }
  std::printf("%s\n", dmoe::core::IsaSummary().c_str());
  return 0;
}

struct Command {
  const char* name;
  int (*run)(int, char**);
  const char* summary;
};

constexpr Command kCommands[] = {
    {"make-model", dmoe::tools::RunMakeModel,
     "write a random checkpoint in Hugging Face layout (config.json + "
     "safetensors)"},
    {"forward", dmoe::tools::RunForward, "run a prompt through the model, dump logits (.npy)"},
    {"generate", dmoe::tools::RunGenerate, "generate tokens with the KV cache"},
    {"up", dmoe::tools::RunUp, "run gateway + router + expert servers locally (Ctrl-C stops)"},
    {"plan", dmoe::tools::RunPlan, "plan expert placement over servers from expert loads (JSON)"},
    {"ctl", dmoe::tools::RunCtl,
     "placement controller of a running router: placement, load, rebalance, "
     "add/remove-server"},
    {"tokenize", dmoe::tools::RunTokenize, "text on stdin -> token ids with the model's tokenizer"},
    {"detokenize", dmoe::tools::RunDetokenize, "token ids on stdin -> text"},
    {"chat-template", dmoe::tools::RunChatTemplate,
     "chat messages on stdin -> the prompt the model's chat template renders"},
    {"isa", RunIsa, "the CPU instruction-set level the kernels use (DMOE_MAX_ISA caps it)"},
};

void PrintUsage(FILE* out) {
  std::fprintf(out, "usage: dmoe <command> [flags]\n\ncommands:\n");
  for (const auto& c : kCommands) std::fprintf(out, "  %-12s %s\n", c.name, c.summary);
  std::fprintf(out, "\n`dmoe <command> --help` lists the flags of a command.\n");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    PrintUsage(stderr);
    return 2;
  }
  const std::string cmd = argv[1];
  if (cmd == "--help" || cmd == "-h" || cmd == "help") {
    PrintUsage(stdout);
    return 0;
  }
  if (const absl::Status isa = dmoe::core::IsaConfigStatus(); !isa.ok()) {
    std::fprintf(stderr, "dmoe: %s\n", std::string(isa.message()).c_str());
    return 2;
  }
  for (const auto& c : kCommands) {
    if (cmd == c.name) return c.run(argc, argv);
  }
  std::fprintf(stderr, "dmoe: unknown command '%s'\n\n", cmd.c_str());
  PrintUsage(stderr);
  return 2;
}
