// Subcommands of the `dmoe` CLI. Each returns the process exit code and prints
// errors to stderr as "dmoe <command>: <message>".
#ifndef DMOE_TOOLS_COMMANDS_H_
#define DMOE_TOOLS_COMMANDS_H_

#include "common/args.h"

namespace dmoe::tools {

// The flag parser the commands share with the services.
using ::dmoe::common::Args;

// argv[0] is "dmoe", argv[1] the subcommand name; flags start at argv[2].
int RunMakeModel(int argc, char** argv);
int RunForward(int argc, char** argv);
int RunGenerate(int argc, char** argv);
int RunUp(int argc, char** argv);
int RunPlan(int argc, char** argv);
int RunCtl(int argc, char** argv);
int RunTokenize(int argc, char** argv);
int RunDetokenize(int argc, char** argv);
int RunChatTemplate(int argc, char** argv);

}  // namespace dmoe::tools

#endif  // DMOE_TOOLS_COMMANDS_H_
