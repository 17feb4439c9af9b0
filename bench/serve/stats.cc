#include "bench/serve/stats.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace dmoe::bench::serve {
namespace {

using json = nlohmann::json;

// How many tokens one streamed chunk carries (0: none, e.g. the final chunk).
int TokensIn(const json& chunk) {
  const auto choices = chunk.find("choices");
  if (choices == chunk.end() || !choices->is_array()) return 0;
  int n = 0;
  for (const json& c : *choices) {
    if (!c.is_object()) continue;
    const json* holder = &c;
    if (const auto d = c.find("delta"); d != c.end() && d->is_object()) holder = &*d;
    if (const auto ids = holder->find("token_ids"); ids != holder->end() && ids->is_array()) {
      n += static_cast<int>(ids->size());
      continue;
    }
    for (const char* field : {"text", "content"}) {
      const auto t = holder->find(field);
      if (t != holder->end() && t->is_string() && !t->get<std::string>().empty()) {
        ++n;
        break;
      }
    }
  }
  return n;
}

std::string ErrorMessage(const std::string& body) {
  const json j = json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (j.is_object()) {
    if (const auto e = j.find("error"); e != j.end()) {
      if (e->is_object() && e->contains("message") && (*e)["message"].is_string()) {
        return (*e)["message"].get<std::string>();
      }
      if (e->is_string()) return e->get<std::string>();
    }
  }
  return body.substr(0, 200);
}

}  // namespace

int TokensInEvent(const SseEvent& e) {
  if (e.data == "[DONE]") return 0;
  const json j = json::parse(e.data, nullptr, /*allow_exceptions=*/false);
  return j.is_object() ? TokensIn(j) : 0;
}

RequestRecord RecordFromHttp(const HttpResult& r, double start_s, int intended_prompt_tokens) {
  RequestRecord rec;
  rec.start_s = start_s;
  rec.status = r.status;
  rec.e2e_s = r.done_t;
  rec.prompt_tokens = intended_prompt_tokens;
  if (r.status == 0) {
    rec.error = r.error.empty() ? "no answer" : r.error;
    return rec;
  }
  if (r.status != 200) {
    rec.error = ErrorMessage(r.body);
    return rec;
  }
  bool done = r.client_closed;
  int usage_out = -1;
  for (const SseEvent& e : r.events) {
    if (e.data == "[DONE]") {
      done = true;
      continue;
    }
    const json j = json::parse(e.data, nullptr, /*allow_exceptions=*/false);
    if (!j.is_object()) {
      rec.error = "a stream event that is not JSON: " + e.data.substr(0, 100);
      return rec;
    }
    if (j.contains("error")) {
      rec.error = ErrorMessage(e.data);
      return rec;
    }
    const int n = TokensIn(j);
    for (int i = 0; i < n; ++i) rec.token_t.push_back(e.t);
    if (const auto u = j.find("usage"); u != j.end() && u->is_object()) {
      if (u->contains("completion_tokens") && (*u)["completion_tokens"].is_number_integer()) {
        usage_out = (*u)["completion_tokens"].get<int>();
      }
      if (u->contains("prompt_tokens") && (*u)["prompt_tokens"].is_number_integer()) {
        rec.prompt_tokens = (*u)["prompt_tokens"].get<int>();
      }
    }
  }
  rec.output_tokens = usage_out >= 0 ? usage_out : static_cast<int>(rec.token_t.size());
  if (!rec.token_t.empty()) rec.ttft_s = rec.token_t.front();
  if (!done) {
    rec.error = "the stream ended without [DONE]";
  } else if (rec.token_t.empty()) {
    rec.error = "no token in the stream";
  } else {
    rec.ok = true;
  }
  return rec;
}

SteadyRate SteadyOutputRate(const std::vector<RequestRecord>& all, size_t warmup,
                            double min_window_s) {
  SteadyRate r;
  if (all.empty()) return r;
  std::vector<double> ends;
  double first_start = all.front().start_s, last_start = all.front().start_s;
  for (const RequestRecord& rec : all) {
    first_start = std::min(first_start, rec.start_s);
    last_start = std::max(last_start, rec.start_s);
    if (rec.e2e_s >= 0) ends.push_back(rec.start_s + rec.e2e_s);
  }
  std::sort(ends.begin(), ends.end());
  if (warmup == 0) {
    r.begin_s = first_start;
  } else if (warmup <= ends.size()) {
    r.begin_s = ends[warmup - 1];
  } else {
    return r;
  }
  if (last_start - r.begin_s < std::max(min_window_s, 1e-9)) return r;
  r.window_s = last_start - r.begin_s;
  for (const RequestRecord& rec : all) {
    for (double t : rec.token_t) {
      const double at = rec.start_s + t;
      if (at >= r.begin_s && at < last_start) ++r.tokens;
    }
  }
  r.output_tok_per_s = static_cast<double>(r.tokens) / r.window_s;
  return r;
}

Dist MakeDist(std::vector<double> v) {
  Dist d;
  d.n = static_cast<int>(v.size());
  if (v.empty()) return d;
  std::sort(v.begin(), v.end());
  auto rank = [&](double p) {
    const size_t k = static_cast<size_t>(std::ceil(p * static_cast<double>(v.size())));
    return v[std::min(v.size() - 1, k == 0 ? 0 : k - 1)];
  };
  d.mean = std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
  d.p50 = rank(0.50);
  d.p90 = rank(0.90);
  d.p99 = rank(0.99);
  d.max = v.back();
  return d;
}

Summary Summarize(const std::vector<RequestRecord>& records, const Slo& slo) {
  Summary s;
  s.requests = static_cast<int>(records.size());
  std::vector<double> ttft, tpot, itl, e2e;
  double first = INFINITY, last = -INFINITY;
  for (const RequestRecord& r : records) {
    first = std::min(first, r.start_s);
    last = std::max(last, r.start_s + std::max(0.0, r.e2e_s));
    if (!r.ok) {
      ++s.failed;
      ++s.errors[r.status == 0 ? "transport" : std::to_string(r.status)];
      if (s.first_error.empty()) s.first_error = r.error;
      continue;
    }
    ++s.completed;
    s.input_tokens += r.prompt_tokens;
    s.output_tokens += r.output_tokens;
    ttft.push_back(r.ttft_s * 1e3);
    e2e.push_back(r.e2e_s * 1e3);
    double tpot_ms = 0;
    if (r.output_tokens > 1) {
      tpot_ms = (r.e2e_s - r.ttft_s) * 1e3 / (r.output_tokens - 1);
      tpot.push_back(tpot_ms);
    }
    for (size_t i = 1; i < r.token_t.size(); ++i) {
      itl.push_back((r.token_t[i] - r.token_t[i - 1]) * 1e3);
    }
    const bool good = (slo.ttft_ms <= 0 || r.ttft_s * 1e3 <= slo.ttft_ms) &&
                      (slo.tpot_ms <= 0 || tpot_ms <= slo.tpot_ms);
    s.good += good;
  }
  s.ttft_ms = MakeDist(std::move(ttft));
  s.tpot_ms = MakeDist(std::move(tpot));
  s.itl_ms = MakeDist(std::move(itl));
  s.e2e_ms = MakeDist(std::move(e2e));
  s.window_s = records.empty() ? 0 : last - first;
  if (s.window_s > 0) {
    s.req_per_s = s.completed / s.window_s;
    s.input_tok_per_s = static_cast<double>(s.input_tokens) / s.window_s;
    s.output_tok_per_s = static_cast<double>(s.output_tokens) / s.window_s;
    s.goodput_req_per_s = s.good / s.window_s;
  }
  return s;
}

json ToJson(const Summary& s) {
  auto dist = [](const Dist& d) {
    return json{{"n", d.n},     {"mean", d.mean}, {"p50", d.p50},
                {"p90", d.p90}, {"p99", d.p99},   {"max", d.max}};
  };
  return json{{"requests", s.requests},
              {"completed", s.completed},
              {"failed", s.failed},
              {"errors", s.errors},
              {"first_error", s.first_error},
              {"window_s", s.window_s},
              {"request_throughput", s.req_per_s},
              {"input_tokens_per_s", s.input_tok_per_s},
              {"output_tokens_per_s", s.output_tok_per_s},
              {"input_tokens", s.input_tokens},
              {"output_tokens", s.output_tokens},
              {"good_requests", s.good},
              {"goodput_req_per_s", s.goodput_req_per_s},
              {"ttft_ms", dist(s.ttft_ms)},
              {"tpot_ms", dist(s.tpot_ms)},
              {"itl_ms", dist(s.itl_ms)},
              {"e2e_ms", dist(s.e2e_ms)}};
}

}  // namespace dmoe::bench::serve
