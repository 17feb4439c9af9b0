// dmoe-gateway's flags: their declarations (help texts and defaults) and the
// flags -> options parsing with every check, so that gateway/main.cc only
// starts and stops the gateway. Error messages are the binary's: printed as
// they are, exit status 2.
#ifndef DMOE_GATEWAY_GATEWAY_OPTIONS_H_
#define DMOE_GATEWAY_GATEWAY_OPTIONS_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/args.h"
#include "gateway/gateway.h"

namespace dmoe::gateway {

inline constexpr char kGatewayProgram[] = "dmoe-gateway";

// What the dmoe-gateway binary runs with.
struct GatewayMainOptions {
  GatewayOptions gateway;
  std::string port_file;       // --port-file; empty = none
  std::string grpc_port_file;  // --grpc-port-file; empty = none
  int64_t grace_ms = 5000;     // --shutdown-grace-ms

  // The cross-flag rules (also checked by GatewayOptionsFromFlags):
  // InvalidArgument "dmoe-gateway: --routers is empty", "... --host is empty",
  // "... --grpc-port-file needs --grpc-port", "... --model-name is empty".
  absl::Status Validate() const;
};

// Args::ForProgram("dmoe-gateway", ...) with every flag declared.
common::Args GatewayArgs();
void DeclareGatewayFlags(common::Args& args);

// Parsed flags -> options. Loads --tokenizer (and its chat template; a template
// that does not parse is only a warning on stderr). InvalidArgument naming the
// flag for every bad value.
absl::StatusOr<GatewayMainOptions> GatewayOptionsFromFlags(const common::Args& args);

}  // namespace dmoe::gateway

#endif  // DMOE_GATEWAY_GATEWAY_OPTIONS_H_
