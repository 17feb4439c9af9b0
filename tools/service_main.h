// Start-up helpers shared by the service binaries (dmoe-expert, dmoe-router,
// dmoe-gateway).
#ifndef DMOE_TOOLS_SERVICE_MAIN_H_
#define DMOE_TOOLS_SERVICE_MAIN_H_

#include <signal.h>

#include <string>

#include "absl/status/status.h"

namespace dmoe::tools {

// Blocks SIGTERM and SIGINT in the calling thread (and every thread it starts
// later, which inherit the mask) and returns that set, to be taken with sigwait.
// Call before any thread is started.
sigset_t BlockStopSignals();

// Checks DMOE_MAX_ISA (core/isa.h) and logs the instruction-set level the
// kernels run at ("<name>: isa avx2 (host avx2, ...)"); the error names a bad
// DMOE_MAX_ISA value. Call once at start, before loading a model.
absl::Status CheckAndLogIsa(const char* name);

// Writes `port` and a newline to `path` atomically (write, then rename), so that
// a watcher polling for the file never reads a half-written one.
absl::Status WritePortFile(const std::string& path, int port);

}  // namespace dmoe::tools

#endif  // DMOE_TOOLS_SERVICE_MAIN_H_
