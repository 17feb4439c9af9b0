// What serve_bench asks: a reproducible list of requests drawn from a
// workload description (lengths, shared prefixes, API, prompt form).
//
// Contract:
//   LengthDist    a request length: kFixed (always `mean`), kUniform (integers
//                 uniform in [mean * (1 - spread), mean * (1 + spread)]) or
//                 kLogNormal (mean `mean`, sigma `sigma` of the log, like chat
//                 traces such as ShareGPT), clamped to [1, max].
//   Workload      K shared prefixes of prefix_len tokens (K = 0: none) put
//                 before every prompt (request i gets prefix i mod K), then a
//                 random part of input length; output length = max_tokens with
//                 ignore_eos (so the server generates exactly that many unless
//                 ignore_eos is off), or with max_tokens_cap > 0: max_tokens =
//                 the cap, and the client ends the stream after the drawn
//                 length (RequestSpec::stop_after), as a chat whose answer
//                 stops early (the server cannot know the length in advance). Prompts are token ids
//                 drawn uniformly from [id_low, vocab) (completions only) or text of random words
//                 from a fixed list, about one token per word with the
//                 generated tokenizer (needs a gateway with --tokenizer).
//                 Chat sends the prefix as the system message and the rest as
//                 the user message.
//   Generate(w, n, seed)
//                 n requests; the same (w, n, seed) gives the same requests on
//                 every host. InvalidArgument for an inconsistent workload
//                 (chat with token ids, vocab <= id_low, lengths < 1, ...).
#ifndef DMOE_BENCH_SERVE_WORKLOAD_H_
#define DMOE_BENCH_SERVE_WORKLOAD_H_

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace dmoe::bench::serve {

struct LengthDist {
  enum class Kind { kFixed, kUniform, kLogNormal };
  Kind kind = Kind::kFixed;
  double mean = 128;
  double spread = 0.5;  // kUniform
  double sigma = 0.6;   // kLogNormal
  int max = 1 << 20;
  int Draw(std::mt19937_64& rng) const;
};

absl::StatusOr<LengthDist::Kind> ParseLengthKind(const std::string& s);
const char* LengthKindName(LengthDist::Kind k);

struct Workload {
  enum class Api { kCompletions, kChat };
  enum class Prompt { kTokenIds, kText };
  Api api = Api::kCompletions;
  Prompt prompt = Prompt::kTokenIds;
  LengthDist input, output;
  int num_prefixes = 0, prefix_len = 0;
  int64_t vocab = 0;    // token ids are drawn from [id_low, vocab)
  int64_t id_low = 16;  // skips the special tokens at the start of the vocabulary
  bool ignore_eos = true;
  std::string model = "dmoe";  // the "model" field
  double temperature = 0.0;
  int max_tokens_cap = 0;  // > 0: max_tokens sent; outputs end at the drawn length
  std::string Describe() const;
};

struct RequestSpec {
  std::string path;       // /v1/completions or /v1/chat/completions
  std::string body;       // JSON
  int prompt_tokens = 0;  // intended (exact for token ids, about for text)
  int max_tokens = 0;     // the drawn output length
  int stop_after = 0;     // > 0: the client ends the stream after this many tokens
};

absl::StatusOr<std::vector<RequestSpec>> Generate(const Workload& w, int n, uint64_t seed);

}  // namespace dmoe::bench::serve

#endif  // DMOE_BENCH_SERVE_WORKLOAD_H_
