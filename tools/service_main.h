// Start-up helpers shared by the service binaries (dmoe-expert, dmoe-router,
// dmoe-gateway).
#ifndef DMOE_TOOLS_SERVICE_MAIN_H_
#define DMOE_TOOLS_SERVICE_MAIN_H_

#include <signal.h>

#include <cstddef>
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

// Caps tcmalloc's per-thread caches (all threads together) at 8 MiB unless
// TCMALLOC_MAX_TOTAL_THREAD_CACHE_BYTES says otherwise; returns the cap set,
// 0 when none was (no tcmalloc: sanitizer builds, the dmoe CLI). With
// tcmalloc's default (32 MiB) the soak (tools/soak.py) saw the router's RSS
// grow ~15% in 4 minutes after warm-up while the bytes in use stayed flat:
// freelists of variable-size buffers (the expert servers' replies, 30-250
// KiB over ~60 size classes) allocated on gRPC's threads and freed on others.
// The router and expert servers call it; the gateway (hundreds of HTTP
// threads) does not: with the cap its RSS grew +30% in a 30-minute soak.
size_t CapMallocThreadCaches();

// Writes `port` and a newline to `path` atomically (write, then rename), so that
// a watcher polling for the file never reads a half-written one.
absl::Status WritePortFile(const std::string& path, int port);

}  // namespace dmoe::tools

#endif  // DMOE_TOOLS_SERVICE_MAIN_H_
