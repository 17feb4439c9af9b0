// dmoe-grpc-health-probe HOST:PORT [SERVICE] [--timeout-s S]
//
// The container health check of the images: asks grpc.health.v1.Health/Check
// of a dmoe-router or dmoe-expert (both serve it) and exits 0 iff the answer
// is SERVING; 1 for any other status or an RPC error, 2 for bad usage.
// Kubernetes probes the same service natively (`grpc:` probes); Docker and
// docker-compose need a program in the image, and no Debian package ships one.
//
// Built in the Dockerfiles' build stage with g++ and pkg-config grpc++. It
// calls the method through the generic stub with hand-encoded bytes, so that
// it needs no generated code: HealthCheckRequest{service} is field 1 (string),
// HealthCheckResponse{status} is field 1 (enum, SERVING = 1).
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <string>
#include <vector>

namespace {

// Protobuf wire format of HealthCheckRequest{service: `service`}.
std::string EncodeRequest(const std::string& service) {
  std::string out;
  if (service.empty()) return out;
  out.push_back(0x0a);  // field 1, length-delimited
  for (size_t n = service.size();; n >>= 7) {
    if (n < 0x80) {
      out.push_back(static_cast<char>(n));
      break;
    }
    out.push_back(static_cast<char>((n & 0x7f) | 0x80));
  }
  return out + service;
}

// The `status` field of a HealthCheckResponse, or -1 if absent/unparsable.
int DecodeStatus(const std::string& bytes) {
  for (size_t i = 0; i + 1 < bytes.size();) {
    const unsigned char tag = static_cast<unsigned char>(bytes[i++]);
    if (tag == 0x08) return static_cast<unsigned char>(bytes[i]) & 0x7f;  // field 1, varint
    return -1;  // the message has no other fields
  }
  return -1;
}

int Usage() {
  std::fprintf(stderr, "usage: dmoe-grpc-health-probe HOST:PORT [SERVICE] [--timeout-s S]\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> pos;
  int timeout_s = 3;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--timeout-s" && i + 1 < argc) {
      timeout_s = std::atoi(argv[++i]);
    } else if (a.rfind("--", 0) == 0) {
      return Usage();
    } else {
      pos.push_back(a);
    }
  }
  if (pos.empty() || pos.size() > 2 || timeout_s <= 0) return Usage();
  const std::string target = pos[0];
  const std::string service = pos.size() > 1 ? pos[1] : "";

  grpc::GenericStub stub(grpc::CreateChannel(target, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(timeout_s));
  const std::string req_bytes = EncodeRequest(service);
  grpc::Slice slice(req_bytes);
  grpc::ByteBuffer request(&slice, 1);
  grpc::ByteBuffer response;
  std::promise<grpc::Status> done;
  stub.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request, &response,
                 [&done](grpc::Status st) { done.set_value(std::move(st)); });
  const grpc::Status st = done.get_future().get();
  if (!st.ok()) {
    std::fprintf(stderr, "%s: health check failed: %d %s\n", target.c_str(),
                 static_cast<int>(st.error_code()), st.error_message().c_str());
    return 1;
  }
  std::vector<grpc::Slice> slices;
  std::string bytes;
  if (response.Dump(&slices).ok()) {
    for (const grpc::Slice& s : slices) {
      bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
    }
  }
  const int status = DecodeStatus(bytes);
  static const char* const kNames[] = {"UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"};
  const char* name = status >= 0 && status <= 3 ? kNames[status] : "unparsable answer";
  std::printf("%s: %s\n", target.c_str(), name);
  return status == 1 ? 0 : 1;
}
