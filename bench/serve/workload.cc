#include "bench/serve/workload.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace dmoe::bench::serve {
namespace {

using json = nlohmann::json;

// Short common English words: with the generated tokenizer most are one token.
constexpr const char* kWords[] = {
    "the",  "of",    "and", "to",   "in",    "is",    "it",    "you",  "that",  "he",   "was",
    "for",  "on",    "are", "as",   "with",  "his",   "they",  "at",   "be",    "this", "from",
    "or",   "one",   "had", "by",   "word",  "but",   "not",   "what", "all",   "were", "we",
    "when", "your",  "can", "said", "there", "use",   "an",    "each", "which", "she",  "do",
    "how",  "their", "if",  "will", "up",    "other", "about", "out",  "many",  "then", "them"};
constexpr int kNumWords = sizeof(kWords) / sizeof(kWords[0]);

std::string Words(int n, std::mt19937_64& rng) {
  std::uniform_int_distribution<int> pick(0, kNumWords - 1);
  std::string s;
  for (int i = 0; i < n; ++i) {
    if (i) s += ' ';
    s += kWords[pick(rng)];
  }
  return s;
}

std::vector<int64_t> Ids(int n, int64_t low, int64_t high, std::mt19937_64& rng) {
  std::uniform_int_distribution<int64_t> pick(low, high - 1);
  std::vector<int64_t> v(n);
  for (auto& id : v) id = pick(rng);
  return v;
}

}  // namespace

int LengthDist::Draw(std::mt19937_64& rng) const {
  double v = mean;
  switch (kind) {
    case Kind::kFixed:
      break;
    case Kind::kUniform: {
      const int lo = static_cast<int>(std::llround(mean * (1 - spread)));
      const int hi = static_cast<int>(std::llround(mean * (1 + spread)));
      v = std::uniform_int_distribution<int>(std::min(lo, hi), std::max(lo, hi))(rng);
      break;
    }
    case Kind::kLogNormal: {
      // E[X] = exp(mu + sigma^2 / 2) = mean.
      const double mu = std::log(mean) - sigma * sigma / 2;
      v = std::lognormal_distribution<double>(mu, sigma)(rng);
      break;
    }
  }
  return static_cast<int>(std::clamp<double>(std::llround(v), 1, max));
}

absl::StatusOr<LengthDist::Kind> ParseLengthKind(const std::string& s) {
  if (s == "fixed") return LengthDist::Kind::kFixed;
  if (s == "uniform") return LengthDist::Kind::kUniform;
  if (s == "lognormal") return LengthDist::Kind::kLogNormal;
  return absl::InvalidArgumentError(
      absl::StrCat("length distribution \"", s, "\": expected fixed, uniform or lognormal"));
}

const char* LengthKindName(LengthDist::Kind k) {
  switch (k) {
    case LengthDist::Kind::kFixed:
      return "fixed";
    case LengthDist::Kind::kUniform:
      return "uniform";
    case LengthDist::Kind::kLogNormal:
      return "lognormal";
  }
  return "?";
}

std::string Workload::Describe() const {
  std::string s = absl::StrCat(api == Api::kChat ? "chat" : "completions", ", ",
                               prompt == Prompt::kText ? "text" : "token-id", " prompts: input ",
                               LengthKindName(input.kind), " mean ", input.mean, ", output ",
                               LengthKindName(output.kind), " mean ", output.mean,
                               ignore_eos ? " (ignore_eos)" : "");
  if (max_tokens_cap > 0) {
    absl::StrAppend(&s, ", max_tokens ", max_tokens_cap,
                    " sent, the client ends each stream at its output length");
  }
  if (num_prefixes > 0) {
    absl::StrAppend(&s, ", ", num_prefixes, " shared prefixes of ", prefix_len, " tokens");
  }
  return s;
}

absl::StatusOr<std::vector<RequestSpec>> Generate(const Workload& w, int n, uint64_t seed) {
  if (w.api == Workload::Api::kChat && w.prompt == Workload::Prompt::kTokenIds) {
    return absl::InvalidArgumentError(
        "chat requests carry text: use text prompts (--prompt text) with --api chat");
  }
  if (w.prompt == Workload::Prompt::kTokenIds && w.vocab <= w.id_low) {
    return absl::InvalidArgumentError(absl::StrCat("token-id prompts need a vocabulary above id ",
                                                   w.id_low, ", got vocab ", w.vocab));
  }
  if (w.input.mean < 1 || w.output.mean < 1) {
    return absl::InvalidArgumentError("input and output lengths must be at least 1");
  }
  if (w.num_prefixes < 0 || w.prefix_len < 0 || (w.num_prefixes > 0 && w.prefix_len < 1)) {
    return absl::InvalidArgumentError("shared prefixes need a count >= 0 and a length >= 1");
  }
  std::mt19937_64 rng(seed);
  // Prefixes first, so that they do not depend on n.
  std::vector<std::vector<int64_t>> prefix_ids;
  std::vector<std::string> prefix_text;
  for (int k = 0; k < w.num_prefixes; ++k) {
    if (w.prompt == Workload::Prompt::kTokenIds) {
      prefix_ids.push_back(Ids(w.prefix_len, w.id_low, w.vocab, rng));
    } else {
      prefix_text.push_back(Words(w.prefix_len, rng));
    }
  }
  std::vector<RequestSpec> out;
  out.reserve(n);
  for (int i = 0; i < n; ++i) {
    RequestSpec r;
    const int in = w.input.Draw(rng);
    r.max_tokens = w.output.Draw(rng);
    if (w.max_tokens_cap > 0) {
      r.max_tokens = std::min(r.max_tokens, w.max_tokens_cap);
      r.stop_after = r.max_tokens;
    }
    const int k = w.num_prefixes > 0 ? i % w.num_prefixes : -1;
    r.prompt_tokens = in + (k >= 0 ? w.prefix_len : 0);
    json body = {{"model", w.model},
                 {"max_tokens", w.max_tokens_cap > 0 ? w.max_tokens_cap : r.max_tokens},
                 {"temperature", w.temperature},
                 {"stream", true},
                 {"stream_options", {{"include_usage", true}}},
                 {"seed", static_cast<int64_t>(seed % 1000000007) + i}};
    if (w.ignore_eos) body["ignore_eos"] = true;
    if (w.prompt == Workload::Prompt::kTokenIds) {
      std::vector<int64_t> ids = k >= 0 ? prefix_ids[k] : std::vector<int64_t>{};
      const std::vector<int64_t> rest = Ids(in, w.id_low, w.vocab, rng);
      ids.insert(ids.end(), rest.begin(), rest.end());
      body["prompt"] = ids;
      r.path = "/v1/completions";
    } else {
      const std::string user = Words(in, rng);
      if (w.api == Workload::Api::kChat) {
        json messages = json::array();
        if (k >= 0) messages.push_back({{"role", "system"}, {"content", prefix_text[k]}});
        messages.push_back({{"role", "user"}, {"content", user}});
        body["messages"] = messages;
        r.path = "/v1/chat/completions";
      } else {
        body["prompt"] = k >= 0 ? prefix_text[k] + " " + user : user;
        r.path = "/v1/completions";
      }
    }
    r.body = body.dump();
    out.push_back(std::move(r));
  }
  return out;
}

}  // namespace dmoe::bench::serve
