// Process memory statistics (Linux).
#ifndef DMOE_CORE_SYS_STATS_H_
#define DMOE_CORE_SYS_STATS_H_

#include <cstddef>

namespace dmoe::core {

// Peak resident set size of this process so far, in bytes (getrusage ru_maxrss).
size_t PeakRssBytes();
// Current resident set size in bytes (/proc/self/statm), 0 if unavailable.
size_t CurrentRssBytes();

}  // namespace dmoe::core

#endif  // DMOE_CORE_SYS_STATS_H_
