#include "router_service/router_metrics.h"

#include <algorithm>
#include <string>
#include <utility>

#include "absl/status/status.h"

namespace dmoe::router {
namespace {

constexpr char kKvBlocksHelp[] =
    "KV cache blocks: used (attached to sequences), cached (prefix-cached, held by no "
    "sequence, reusable and evicted on demand) and total";

// One request's round trip: from a loopback hop of a few tokens (~50 us) to
// the default 10 s deadline.
prometheus::Histogram::BucketBoundaries RoundTripBuckets() {
  return {50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3,
          50e-3, 0.1,    0.25,   0.5,    1,    2.5,    5,    10};
}

// A re-placement: loading slots and switching takes from milliseconds (a few
// small experts) to minutes (GiBs of weights).
prometheus::Histogram::BucketBoundaries SwitchBuckets() {
  return {0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600};
}

std::vector<int64_t> MoeLayers(const core::ModelConfig& cfg) {
  std::vector<int64_t> out;
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    if (cfg.IsMoeLayer(l)) out.push_back(l);
  }
  return out;
}

prometheus::Family<prometheus::Counter>& Counter(prometheus::Registry& r, const char* name,
                                                 const char* help) {
  return prometheus::BuildCounter().Name(name).Help(help).Register(r);
}
prometheus::Family<prometheus::Gauge>& Gauge(prometheus::Registry& r, const char* name,
                                             const char* help) {
  return prometheus::BuildGauge().Name(name).Help(help).Register(r);
}
prometheus::Family<prometheus::Histogram>& Histogram(prometheus::Registry& r, const char* name,
                                                     const char* help) {
  return prometheus::BuildHistogram().Name(name).Help(help).Register(r);
}

}  // namespace

RouterMetrics::RouterMetrics(prometheus::Registry& registry, const core::ModelConfig& cfg,
                             const place::Placement& placement, LoadWindow* window,
                             RouterMetricsOptions options)
    : layers_(cfg.num_hidden_layers),
      experts_(cfg.n_routed_experts),
      top_k_(cfg.num_experts_per_tok),
      moe_layers_(MoeLayers(cfg)),
      per_expert_(options.per_expert),
      num_servers_(static_cast<int>(options.servers.size())),
      window_(window),
      routed_family_(Counter(registry, "moe_router_routed_tokens_total",
                             "Token-to-expert assignments made by the gates (each token counts "
                             "once per chosen expert), by MoE layer and logical expert "
                             "(expert=\"all\" with --expert-metrics=per-layer)")),
      server_tokens_family_(Counter(registry, "moe_router_server_tokens_total",
                                    "Tokens sent to the expert server (once per token and layer "
                                    "it visits the server; re-sends included)")),
      sent_bytes_family_(Counter(registry, "moe_router_server_sent_bytes_total",
                                 "Request bytes sent to the expert server (serialized messages)")),
      received_bytes_family_(Counter(registry, "moe_router_server_received_bytes_total",
                                     "Reply bytes received from the expert server")),
      round_trip_family_(Histogram(registry, "moe_router_server_round_trip_seconds",
                                   "Round trip of one request to the expert server, sent to "
                                   "last reply chunk")),
      failovers_(Counter(registry, "moe_router_server_failovers_total",
                         "Requests the expert server failed (code: UNAVAILABLE, "
                         "DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED); their tokens went to replicas")),
      resent_tokens_(Counter(registry, "moe_router_resent_tokens_total",
                             "Tokens re-sent to replicas after a server failed them")
                         .Add({})),
      stranded_tokens_(Counter(registry, "moe_router_stranded_tokens_total",
                               "Tokens a failed server held with no replica elsewhere (their "
                               "sequences failed)")
                           .Add({})),
      server_info_(Gauge(registry, "moe_router_server_info",
                         "1 per expert server: its index (the server label elsewhere) and "
                         "address")),
      layer_server_mom_(Gauge(registry, "moe_router_layer_server_max_over_mean",
                              "Max over mean of the servers' loads in the layer over the load "
                              "window (load = assignments of a server's slots, replicas "
                              "sharing an expert's equally); 1 = balanced, 0 = no tokens")),
      layer_slot_mom_(Gauge(registry, "moe_router_layer_slot_max_over_mean",
                            "Max over mean of the slots' (physical experts') loads in the layer "
                            "over the load window")),
      layer_expert_stat_(Gauge(registry, "moe_router_layer_expert_balance_stat",
                               "DeepSeek expert-level balance statistic N/K * sum_i f_i*P_i of "
                               "the layer over the load window; 1 = balanced")),
      layer_server_stat_(Gauge(registry, "moe_router_layer_server_balance_stat",
                               "DeepSeek device-level balance statistic sum_d f'_d*P'_d of the "
                               "layer over the load window, with replicas; 1 = balanced")),
      server_mom_(Gauge(registry, "moe_router_server_max_over_mean",
                        "Max over mean of the servers' loads summed over all MoE layers, over "
                        "the load window")
                      .Add({})),
      server_load_(Gauge(registry, "moe_router_server_load",
                         "The server's load over the load window: assignments of its slots "
                         "summed over the MoE layers (replicas share an expert's equally)")),
      placement_version_(Gauge(registry, "moe_router_placement_version",
                               "Version of the placement the router plans with")
                             .Add({})),
      replacements_(
          Counter(registry, "moe_router_replacements_total", "Re-placements applied, by trigger")),
      replacement_bytes_(Counter(registry, "moe_router_replacement_bytes_moved_total",
                                 "Expert weight bytes loaded onto servers by re-placements")
                             .Add({})),
      replacement_switch_(Histogram(registry, "moe_router_replacement_switch_seconds",
                                    "Time of a re-placement from decision to switch")
                              .Add({}, SwitchBuckets())),
      leaves_refused_(Counter(registry, "moe_router_leaves_refused_total",
                              "Scale-in leaves the placement controller refused: the other "
                              "servers could not hold the leaving server's experts (once per "
                              "leave)")
                          .Add({})),
      ready_(Gauge(registry, "moe_router_ready",
                   "1 when the router can run a token (every routed expert of the placement "
                   "has a live expert server), else 0")
                 .Add({})),
      step_seconds_(Histogram(registry, "moe_router_step_seconds",
                              "Duration of one scheduler step (model forward of a batch); its "
                              "tail shows the latency cost of a re-placement")
                        .Add({}, RoundTripBuckets())),
      active_sequences_(
          Gauge(registry, "moe_router_active_sequences", "Sequences admitted and not finished")
              .Add({})),
      queued_requests_(
          Gauge(registry, "moe_router_queued_requests", "Requests waiting for admission").Add({})),
      kv_free_(Gauge(registry, "moe_router_kv_cache_free_bytes",
                     "KV cache bytes in blocks neither attached to a sequence nor reserved")
                   .Add({})),
      kv_blocks_used_(
          Gauge(registry, "moe_router_kv_cache_blocks", kKvBlocksHelp).Add({{"state", "used"}})),
      kv_blocks_total_(
          Gauge(registry, "moe_router_kv_cache_blocks", kKvBlocksHelp).Add({{"state", "total"}})),
      kv_blocks_cached_(
          Gauge(registry, "moe_router_kv_cache_blocks", kKvBlocksHelp).Add({{"state", "cached"}})),
      kv_bytes_per_token_(Gauge(registry, "moe_router_kv_cache_bytes_per_token",
                                "KV cache bytes one token takes over all layers (the loaded "
                                "model's entry width x layers x the --kv-dtype size)")
                              .Add({})),
      prefix_queried_(Counter(registry, "moe_router_prefix_cache_queried_tokens_total",
                              "Prompt tokens looked up in the prefix cache at admission "
                              "(recomputations after preemption included)")
                          .Add({})),
      prefix_hit_(Counter(registry, "moe_router_prefix_cache_hit_tokens_total",
                          "Prompt tokens whose KV entries came from the prefix cache; hit rate = "
                          "rate(hit) / rate(queried)")
                      .Add({})),
      prefix_evicted_(Counter(registry, "moe_router_prefix_cache_evicted_blocks_total",
                              "Prefix-cached KV blocks evicted to make room")
                          .Add({})),
      kv_saturated_(Counter(registry, "moe_router_kv_cache_saturated_values_total",
                            "Values an f16 KV cache stored saturated at +-65504 (should stay 0; "
                            "else use --kv-dtype bf16 or f32)")
                        .Add({})),
      preemptions_(Counter(registry, "moe_router_preemptions_total",
                           "Sequences preempted for KV blocks (recomputed when they resume)")
                       .Add({})),
      recomputed_tokens_(Counter(registry, "moe_router_recomputed_tokens_total",
                                 "Cached tokens of preempted sequences, computed again on resume")
                             .Add({})),
      kv_budget_(Gauge(registry, "moe_router_kv_cache_budget_bytes",
                       "KV cache bytes usable: the whole blocks of the --kv-cache-bytes budget")
                     .Add({})),
      steps_(Counter(registry, "moe_router_steps_total", "Scheduler steps (model forwards) run")
                 .Add({})),
      failed_steps_(Counter(registry, "moe_router_failed_steps_total",
                            "Scheduler steps that failed (their sequences ended with the error)")
                        .Add({})),
      step_tokens_(Counter(registry, "moe_router_step_tokens_total",
                           "Tokens carried by scheduler steps (decodes + prefill chunks)")
                       .Add({})),
      placement_(placement) {
  // Every series that exists from the start is created here, so that it is
  // exported (as 0) before its first event and rate() sees it begin.
  routed_.assign(static_cast<size_t>(per_expert_ ? layers_ * experts_ : layers_), nullptr);
  for (int64_t l : moe_layers_) {
    const std::string layer = std::to_string(l);
    if (per_expert_) {
      for (int64_t e = 0; e < experts_; ++e) {
        routed_[l * experts_ + e] =
            &routed_family_.Add({{"layer", layer}, {"expert", std::to_string(e)}});
      }
    } else {
      routed_[l] = &routed_family_.Add({{"layer", layer}, {"expert", "all"}});
    }
    layer_server_mom_.Add({{"layer", layer}});
    layer_slot_mom_.Add({{"layer", layer}});
    layer_expert_stat_.Add({{"layer", layer}});
    layer_server_stat_.Add({{"layer", layer}});
  }
  {
    absl::MutexLock lock(&traffic_mu_);
    for (int s = 0; s < num_servers_; ++s) Server(s);
    route_counts_.assign(static_cast<size_t>(experts_), 0);
  }
  SetServers(options.servers);
  for (int s = 0; s < placement.num_servers(); ++s) {
    server_load_.Add({{"server", std::to_string(s)}});
  }
  placement_version_.Set(static_cast<double>(placement.version()));
  auto& stage_family = prometheus::BuildCounter()
                           .Name("moe_router_step_stage_seconds_total")
                           .Help(
                               "Seconds scheduler steps spent per stage (embed, norm, attention, "
                               "gate, experts, dense_ffn, combine, lm_head, sample, schedule); "
                               "phase prefill = steps carrying prompt tokens, else decode")
                           .Register(registry);
  auto& phase_family = prometheus::BuildCounter()
                           .Name("moe_router_phase_steps_total")
                           .Help("Scheduler steps by phase (prefill: carrying prompt tokens)")
                           .Register(registry);
  for (const char* phase : {"decode", "prefill"}) {
    std::vector<prometheus::Counter*> per_stage;
    for (int st = 0; st < core::kNumStages; ++st) {
      per_stage.push_back(&stage_family.Add(
          {{"stage", core::StageName(static_cast<core::Stage>(st))}, {"phase", phase}}));
    }
    stage_seconds_.push_back(std::move(per_stage));
    phase_steps_.push_back(&phase_family.Add({{"phase", phase}}));
  }
}

void RouterMetrics::OnStepStages(const core::StageTimes& stages, bool prefill) {
  const int phase = prefill ? 1 : 0;
  for (int st = 0; st < core::kNumStages; ++st) {
    stage_seconds_[phase][st]->Increment(stages.seconds[st]);
  }
  phase_steps_[phase]->Increment();
}

RouterMetrics::ServerSeries& RouterMetrics::Server(int server) {
  while (static_cast<int>(servers_.size()) <= server) {
    const prometheus::Labels labels{{"server", std::to_string(servers_.size())}};
    ServerSeries s;
    s.tokens = &server_tokens_family_.Add(labels);
    s.sent_bytes = &sent_bytes_family_.Add(labels);
    s.received_bytes = &received_bytes_family_.Add(labels);
    s.round_trip = &round_trip_family_.Add(labels, RoundTripBuckets());
    servers_.push_back(s);
  }
  return servers_[static_cast<size_t>(server)];
}

void RouterMetrics::OnRoute(int64_t layer, const core::GateResult& routing) {
  if (layer < 0 || layer >= layers_) return;
  if (window_ != nullptr) window_->AddRouting(layer, routing, absl::Now());
  absl::MutexLock lock(&traffic_mu_);
  if (!per_expert_) {
    prometheus::Counter* c = routed_[static_cast<size_t>(layer)];
    uint64_t n = 0;
    for (int32_t e : routing.experts) n += (e >= 0 && e < experts_) ? 1 : 0;
    if (c != nullptr && n > 0) c->Increment(static_cast<double>(n));
    return;
  }
  // Summed per expert first: one atomic update per chosen expert, not per token.
  std::fill(route_counts_.begin(), route_counts_.end(), 0);
  for (int32_t e : routing.experts) {
    if (e >= 0 && e < experts_) ++route_counts_[static_cast<size_t>(e)];
  }
  for (int64_t e = 0; e < experts_; ++e) {
    const uint64_t n = route_counts_[static_cast<size_t>(e)];
    prometheus::Counter* c = routed_[static_cast<size_t>(layer * experts_ + e)];
    if (n > 0 && c != nullptr) c->Increment(static_cast<double>(n));
  }
}

void RouterMetrics::OnSend(int32_t layer, int server, const place::ServerShare& share,
                           size_t wire_bytes) {
  if (server < 0) return;
  const auto tokens = static_cast<int64_t>(share.tokens.size());
  if (window_ != nullptr) window_->AddServerTokens(layer, server, tokens, absl::Now());
  absl::MutexLock lock(&traffic_mu_);
  ServerSeries& s = Server(server);
  s.tokens->Increment(static_cast<double>(tokens));
  s.sent_bytes->Increment(static_cast<double>(wire_bytes));
}

void RouterMetrics::OnReply(int32_t layer, int server, int64_t tokens, size_t wire_bytes,
                            absl::Duration round_trip) {
  if (server < 0) return;
  absl::MutexLock lock(&traffic_mu_);
  ServerSeries& s = Server(server);
  s.received_bytes->Increment(static_cast<double>(wire_bytes));
  s.round_trip->Observe(absl::ToDoubleSeconds(round_trip));
}

void RouterMetrics::OnFailover(int32_t layer, int server, absl::StatusCode code, int64_t resent,
                               int64_t stranded) {
  // Rare: the family's own lookup is fine here.
  failovers_.Add({{"server", std::to_string(server)}, {"code", absl::StatusCodeToString(code)}})
      .Increment();
  if (resent > 0) resent_tokens_.Increment(static_cast<double>(resent));
  if (stranded > 0) stranded_tokens_.Increment(static_cast<double>(stranded));
}

void RouterMetrics::SetPlacement(const place::Placement& placement) {
  absl::MutexLock lock(&state_mu_);
  placement_ = placement;
  placement_version_.Set(static_cast<double>(placement.version()));
}

void RouterMetrics::SetServers(const std::vector<std::string>& addresses) {
  absl::MutexLock lock(&info_mu_);
  for (prometheus::Gauge* g : info_) server_info_.Remove(g);
  info_.clear();
  for (size_t s = 0; s < addresses.size(); ++s) {
    prometheus::Gauge& g =
        server_info_.Add({{"server", std::to_string(s)}, {"address", addresses[s]}});
    g.Set(1);
    info_.push_back(&g);
  }
}

void RouterMetrics::RecordReplacement(const std::string& trigger, uint64_t bytes_moved,
                                      absl::Duration switch_time) {
  replacements_.Add({{"trigger", trigger}}).Increment();
  replacement_bytes_.Increment(static_cast<double>(bytes_moved));
  replacement_switch_.Observe(absl::ToDoubleSeconds(switch_time));
}

void RouterMetrics::SetLoadSource(std::function<SchedulerLoad()> source) {
  absl::MutexLock lock(&state_mu_);
  load_source_ = std::move(source);
}

void RouterMetrics::Refresh(absl::Time now) {
  absl::MutexLock lock(&state_mu_);
  if (window_ != nullptr) {
    const LoadSnapshot snap = window_->Get(now);
    const int D = placement_.num_servers();
    std::vector<double> server_load(static_cast<size_t>(std::max(D, 0)), 0.0);
    std::vector<bool> has_slots(static_cast<size_t>(std::max(D, 0)), false);
    for (int64_t l : moe_layers_) {
      if (l >= snap.layers) continue;
      const LayerBalance b = ComputeBalance(snap, l, top_k_, placement_);
      const prometheus::Labels labels{{"layer", std::to_string(l)}};
      layer_server_mom_.Add(labels).Set(b.server_max_over_mean);
      layer_slot_mom_.Add(labels).Set(b.slot_max_over_mean);
      layer_expert_stat_.Add(labels).Set(b.expert_stat);
      layer_server_stat_.Add(labels).Set(b.server_stat);
      // A server's load as ComputeBalance defines it (assignments of its
      // slots, an expert's shared equally by its replicas), summed over layers.
      for (int d = 0; d < D; ++d) {
        if (!placement_.Slots(l, d).empty()) has_slots[static_cast<size_t>(d)] = true;
        for (int32_t e : placement_.Slots(l, d)) {
          const size_t r = placement_.Replicas(l, e).size();
          if (r > 0) server_load[static_cast<size_t>(d)] += snap.Assignments(l, e) / r;
        }
      }
    }
    // As in ComputeBalance, servers without slots (e.g. one that left) are
    // not part of the mean.
    double sum = 0, max = 0;
    int serving = 0;
    for (int d = 0; d < D; ++d) {
      const double x = server_load[static_cast<size_t>(d)];
      server_load_.Add({{"server", std::to_string(d)}}).Set(x);
      if (!has_slots[static_cast<size_t>(d)]) continue;
      sum += x;
      max = std::max(max, x);
      ++serving;
    }
    server_mom_.Set(sum > 0 ? max / (sum / serving) : 0.0);
  }
  if (load_source_) {
    const SchedulerLoad load = load_source_();
    active_sequences_.Set(static_cast<double>(load.active_sequences));
    queued_requests_.Set(static_cast<double>(load.queued_requests));
    kv_free_.Set(static_cast<double>(load.kv_cache_free_bytes));
    kv_budget_.Set(static_cast<double>(load.kv_cache_budget_bytes));
    kv_blocks_used_.Set(static_cast<double>(load.kv_blocks_used));
    kv_blocks_total_.Set(static_cast<double>(load.kv_blocks_total));
    kv_blocks_cached_.Set(static_cast<double>(load.kv_blocks_cached));
    kv_bytes_per_token_.Set(static_cast<double>(load.kv_bytes_per_token));
    // The scheduler counts since start; the counters advance by the difference.
    auto advance = [](prometheus::Counter& c, uint64_t now_value, uint64_t& last) {
      if (now_value > last) c.Increment(static_cast<double>(now_value - last));
      last = std::max(last, now_value);
    };
    advance(steps_, load.steps, last_load_.steps);
    advance(failed_steps_, load.failed_steps, last_load_.failed_steps);
    advance(step_tokens_, load.step_tokens, last_load_.step_tokens);
    advance(preemptions_, load.preemptions, last_load_.preemptions);
    advance(recomputed_tokens_, load.recomputed_tokens, last_load_.recomputed_tokens);
    advance(prefix_queried_, load.prefix_queried_tokens, last_load_.prefix_queried_tokens);
    advance(prefix_hit_, load.prefix_hit_tokens, last_load_.prefix_hit_tokens);
    advance(prefix_evicted_, load.prefix_evicted_blocks, last_load_.prefix_evicted_blocks);
    advance(kv_saturated_, load.kv_saturated_values, last_load_.kv_saturated_values);
  }
}

}  // namespace dmoe::router
