// serve_bench's measurements: one record per request from its streamed
// events, and the summary of a run that users compare servers by.
//
// Contract:
//   RecordFromHttp(result, start_s, intended_prompt_tokens)
//     a token event is an SSE data line whose JSON has a choice with token ids
//     (dmoe: one per chunk) or, for servers without token ids, non-empty text;
//     its time is the line's arrival. TTFT = the first token event's time, E2E
//     = the end of the response, output tokens = usage.completion_tokens when
//     the stream reported usage (else the token events), prompt tokens =
//     usage.prompt_tokens (else the intended count). A request succeeded when
//     the status was 200, the stream ended with [DONE] (or the client closed
//     it: HttpResult::client_closed) and had a token; else
//     `error` names why (the server's error message, a transport error, "no
//     [DONE]").
//   Summarize(records, slo)
//     over the records given (the caller drops warm-up): percentiles p50, p90,
//     p99 (nearest rank) and max of TTFT, TPOT (per request: (E2E - TTFT) /
//     (output tokens - 1), requests of 2+ tokens), ITL (every gap between
//     token events) and E2E in ms; the window from the first start to the last
//     end; requests, input and output tokens per second over it; goodput = the
//     requests per second that met every SLO given (TTFT <= slo.ttft_ms, TPOT <=
//     slo.tpot_ms; 0 = not checked); failures counted by HTTP status ("429",
//     "503", ...) or "transport".
#ifndef DMOE_BENCH_SERVE_STATS_H_
#define DMOE_BENCH_SERVE_STATS_H_

#include <map>
#include <string>
#include <vector>

#include "bench/serve/http_stream.h"
#include "nlohmann/json.hpp"

namespace dmoe::bench::serve {

struct RequestRecord {
  double start_s = 0;  // since the run began
  int status = 0;      // HTTP status; 0 = no answer
  bool ok = false;
  std::string error;
  double ttft_s = -1, e2e_s = -1;  // since sent
  std::vector<double> token_t;     // token events, since sent
  int output_tokens = 0, prompt_tokens = 0;
};

RequestRecord RecordFromHttp(const HttpResult& r, double start_s, int intended_prompt_tokens);
// Tokens one stream event carries, as RecordFromHttp counts them.
int TokensInEvent(const SseEvent& e);

struct Dist {
  int n = 0;
  double mean = 0, p50 = 0, p90 = 0, p99 = 0, max = 0;
};
Dist MakeDist(std::vector<double> values);

struct Slo {
  double ttft_ms = 0, tpot_ms = 0;  // 0: not checked
};

struct Summary {
  int requests = 0, completed = 0, failed = 0;
  std::map<std::string, int> errors;  // by HTTP status or "transport"
  std::string first_error;
  double window_s = 0;
  double req_per_s = 0, input_tok_per_s = 0, output_tok_per_s = 0;
  int good = 0;
  double goodput_req_per_s = 0;
  long long input_tokens = 0, output_tokens = 0;
  Dist ttft_ms, tpot_ms, itl_ms, e2e_ms;
};

Summary Summarize(const std::vector<RequestRecord>& records, const Slo& slo);

// Output tokens per second in the steady state of a closed loop, where the
// drain at the end (fewer and fewer users with work) and the start are left
// out: every token event of every request (warm-up included; records in issue
// order, as RunLoad returns them) that arrived between the moment the
// `warmup`-th request completed (the first start when warmup = 0) and the
// start of the last request, over that window. window_s = 0 (and no rate)
// when the window is shorter than `min_window_s`: more requests are needed.
struct SteadyRate {
  double begin_s = 0, window_s = 0;
  long long tokens = 0;
  double output_tok_per_s = 0;
};
SteadyRate SteadyOutputRate(const std::vector<RequestRecord>& all, size_t warmup,
                            double min_window_s = 10);
nlohmann::json ToJson(const Summary& s);

}  // namespace dmoe::bench::serve

#endif  // DMOE_BENCH_SERVE_STATS_H_
