// Free TCP ports for tests that must name a port up front (a server that
// cannot report the port it bound for :0, e.g. Prometheus).
//
// Contract:
//   FreePort()  a port on 127.0.0.1 that was free a moment ago: the kernel
//               picks it for a socket bound to port 0, which is then closed.
//               Another process may take it before the caller binds it, so
//               prefer --port 0 plus a port file wherever the binary supports
//               it. Returns 0 when no socket could be bound.
#ifndef DMOE_TESTING_PORTS_H_
#define DMOE_TESTING_PORTS_H_

namespace dmoe::testing {

int FreePort();

}  // namespace dmoe::testing

#endif  // DMOE_TESTING_PORTS_H_
