// Helpers for tests that run a real Prometheus server and ask its HTTP API.
//
// Contract:
//   FindPrometheus()  the prometheus binary to run: $DMOE_PROMETHEUS when set
//                     (if executable), else /usr/bin/prometheus, else the
//                     first in $PATH; "" when there is none (tests skip then).
//   UrlEncode(s)      `s` percent-encoded for a URL query value
//                     (/api/v1/query?query=...): every byte but A-Z a-z 0-9
//                     - _ . ~ becomes %XX (upper-case hex).
#ifndef DMOE_TESTING_PROMETHEUS_H_
#define DMOE_TESTING_PROMETHEUS_H_

#include <string>

namespace dmoe::testing {

std::string FindPrometheus();

std::string UrlEncode(const std::string& s);

}  // namespace dmoe::testing

#endif  // DMOE_TESTING_PROMETHEUS_H_
