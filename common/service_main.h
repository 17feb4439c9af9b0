// Start-up helpers shared by the service binaries (dmoe-expert, dmoe-router,
// dmoe-gateway).
#ifndef DMOE_COMMON_SERVICE_MAIN_H_
#define DMOE_COMMON_SERVICE_MAIN_H_

#include <signal.h>

#include <cstddef>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "common/args.h"

namespace dmoe::common {

// Blocks SIGTERM and SIGINT in the calling thread (and every thread it starts
// later, which inherit the mask) and returns that set, to be taken with sigwait.
// Call before any thread is started.
sigset_t BlockStopSignals();

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

// Parses a service binary's flags (argv[1..argc)). --help or -h anywhere
// (even after a bad flag): prints args.Usage() on stdout and returns 0; a
// flag error: prints it on stderr and returns 2; else nullopt (go on).
std::optional<int> ParseFlagsOrExit(Args& args, int argc, char** argv);

// The HOST:PORT other processes reach this one at: `advertise` when given,
// else `host`:`port`, with the machine's hostname for a wildcard host
// (0.0.0.0, ::, [::]).
std::string AdvertiseAddress(const std::string& advertise, const std::string& host, int port);

// Writes `port` and a newline to `path` atomically (write, then rename), so that
// a watcher polling for the file never reads a half-written one.
absl::Status WritePortFile(const std::string& path, int port);

}  // namespace dmoe::common

#endif  // DMOE_COMMON_SERVICE_MAIN_H_
