// The one conversion between absl::Status (what the project's functions return)
// and grpc::Status (what crosses a gRPC boundary). The two code enums share their
// numeric values (both follow google.rpc.Code), so a code survives the round trip.
#ifndef DMOE_COMMON_GRPC_STATUS_H_
#define DMOE_COMMON_GRPC_STATUS_H_

#include <cstdint>
#include <string_view>

#include "absl/status/status.h"
#include "grpcpp/support/status.h"

namespace dmoe::common {

// The status of a finished RPC; with `context` the message reads
// "<context>: <gRPC message>" (e.g. the peer's address and the method).
absl::Status FromGrpc(const grpc::Status& status);
absl::Status FromGrpc(const grpc::Status& status, std::string_view context);

// What a server returns for `status`: same code, same message.
grpc::Status ToGrpc(const absl::Status& status);

// A status code that arrived as a number in a message (e.g. an in-band error of
// a stream): the code itself when it is a valid non-OK code, else kUnknown.
absl::StatusCode StatusCodeFromWire(int32_t code);

}  // namespace dmoe::common

#endif  // DMOE_COMMON_GRPC_STATUS_H_
