#include "core/model.h"

#include <malloc.h>

#include <algorithm>
#include <cstring>
#include <set>

#include "absl/strings/str_cat.h"
#include "core/combine.h"
#include "core/ffn_loader.h"
#include "core/layers.h"
#include "core/status.h"

namespace dmoe::core {

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const std::string& dir, ModelOptions opts) {
  std::unique_ptr<Model> m(new Model());
  DMOE_ASSIGN_OR_RETURN(m->cfg_, ModelConfig::FromFile(dir + "/config.json"));
  DMOE_ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> ckpt, Checkpoint::Open(dir));
  ckpt->set_fp8_block(m->cfg_.fp8_block_rows, m->cfg_.fp8_block_cols);
  m->compute_ = opts.compute;
  if (opts.micro_batches < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("micro_batches must be at least 1, got ", opts.micro_batches));
  }
  m->micro_batches_ = opts.micro_batches;
  m->on_route_ = std::move(opts.on_route);
  DMOE_RETURN_IF_ERROR(m->LoadWeights(*ckpt, opts));
  return m;
}

absl::Status Model::LoadWeights(const Checkpoint& ckpt, ModelOptions& opts) {
  const ModelConfig& c = cfg_;
  const int64_t L = c.num_hidden_layers, hidden = c.hidden_size, V = c.vocab_size;
  int64_t total = 3, done = 0;
  for (int64_t l = 0; l < L; ++l) total += 1 + (c.IsMoeLayer(l) ? c.n_routed_experts + 2 : 1);
  auto tick = [&]() {
    ++done;
    if (opts.progress) opts.progress(done, total);
  };

  rope_ = std::make_unique<RopeTable>(c, c.IsMla() ? c.qk_rope_head_dim : c.head_dim,
                                      c.IsMla() ? RopePairing::kInterleaved : RopePairing::kHalves);
  experts_ = opts.experts ? std::move(opts.experts) : MakeCpuExpertBackend(compute_);
  dense_ = MakeCpuExpertBackend(compute_);

  // The largest tensors first (output head, embeddings), while little else is
  // resident, so their temporary copies do not add to the peak.
  if (!c.tie_word_embeddings) {
    DMOE_ASSIGN_OR_RETURN(lm_head_, LoadLinear(ckpt, "lm_head.weight", V, hidden, compute_));
  }
  tick();
  // Embeddings, converted in row chunks so that only the table itself is resident.
  {
    const std::string name = "model.embed_tokens.weight";
    const int64_t shape[2] = {V, hidden};
    constexpr int64_t kChunk = 1024;
    std::vector<float> chunk(std::min<int64_t>(kChunk, V) * hidden);
    if (compute_ == ComputeType::kF32) {
      embed_f32_.resize(V * hidden);
    } else {
      embed_bf16_.resize(V * hidden);
    }
    for (int64_t r = 0; r < V; r += kChunk) {
      const int64_t n = std::min(kChunk, V - r);
      float* dst = compute_ == ComputeType::kF32 ? embed_f32_.data() + r * hidden : chunk.data();
      DMOE_RETURN_IF_ERROR(ckpt.ReadRowsF32(name, shape, r, n, dst));
      if (compute_ != ComputeType::kF32)
        ConvertF32ToBF16(dst, n * hidden, embed_bf16_.data() + r * hidden);
    }
    tick();
    if (c.tie_word_embeddings) {
      DMOE_ASSIGN_OR_RETURN(lm_head_, LoadLinear(ckpt, name, V, hidden, compute_));
    }
    ckpt.Release(name);
  }

  expert_load_.assign(L, std::vector<int64_t>(c.n_routed_experts, 0));
  for (int64_t l = 0; l < L; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    DMOE_ASSIGN_OR_RETURN(std::vector<float> in_norm,
                          LoadVector(ckpt, p + "input_layernorm.weight", hidden));
    DMOE_ASSIGN_OR_RETURN(std::vector<float> post_norm,
                          LoadVector(ckpt, p + "post_attention_layernorm.weight", hidden));
    input_norm_.push_back(std::move(in_norm));
    post_norm_.push_back(std::move(post_norm));
    DMOE_ASSIGN_OR_RETURN(std::unique_ptr<Attention> a,
                          Attention::Load(c, ckpt, l, compute_, rope_.get()));
    attn_.push_back(std::move(a));
    tick();
    if (c.IsMoeLayer(l)) {
      DMOE_ASSIGN_OR_RETURN(std::unique_ptr<MoeGate> g, MoeGate::Load(c, ckpt, l));
      if (!opts.gate_bias_for_testing.empty()) {
        if (static_cast<int64_t>(opts.gate_bias_for_testing.size()) != c.n_routed_experts) {
          return absl::InvalidArgumentError(
              absl::StrCat("gate bias for testing has ", opts.gate_bias_for_testing.size(),
                           " entries, the model has ", c.n_routed_experts, " routed experts"));
        }
        g->set_logit_bias_for_testing(opts.gate_bias_for_testing);
      }
      gates_.push_back(std::move(g));
      tick();
      for (int64_t e = 0; e < c.n_routed_experts; ++e) {
        if (opts.load_routed_experts) {
          DMOE_RETURN_IF_ERROR(LoadFfnInto(ckpt, FfnPrefix(l, static_cast<int32_t>(e)), hidden,
                                           c.moe_intermediate_size, l, e, *experts_));
        }
        tick();
      }
      if (c.n_shared_experts > 0 && opts.load_shared_experts) {
        DMOE_RETURN_IF_ERROR(LoadFfnInto(ckpt, FfnPrefix(l, kSharedFfn), hidden,
                                         c.n_shared_experts * c.moe_intermediate_size, l,
                                         kSharedFfn, *experts_));
      }
      tick();
    } else {
      gates_.push_back(nullptr);
      DMOE_RETURN_IF_ERROR(
          LoadFfnInto(ckpt, p + "mlp.", hidden, c.intermediate_size, l, kSharedFfn, *dense_));
      tick();
    }
  }
  DMOE_ASSIGN_OR_RETURN(final_norm_, LoadVector(ckpt, "model.norm.weight", hidden));
  tick();
  ReleaseLoadBuffers();
  // Hand the temporaries' freed heap pages back to the OS (glibc keeps them).
  malloc_trim(0);
  return absl::OkStatus();
}

size_t Model::WeightBytes() const {
  size_t b = embed_f32_.size() * 4 + embed_bf16_.size() * 2 + lm_head_.weight_bytes() +
             experts_->WeightBytes() + dense_->WeightBytes() + final_norm_.size() * 4;
  for (const auto& a : attn_) b += a->WeightBytes();
  for (const auto& g : gates_) b += g ? g->WeightBytes() : 0;
  b += (input_norm_.size() + post_norm_.size()) * cfg_.hidden_size * 4;
  return b;
}

absl::Status Model::Forward(std::span<const SeqInput> batch, KvCache& cache,
                            std::vector<float>* logits) {
  const ModelConfig& c = cfg_;
  const int64_t H = c.hidden_size, V = c.vocab_size;
  if (batch.empty()) return absl::InvalidArgumentError("forward: empty batch");
  // Validate everything before touching any state.
  TokenLayout tokens;
  std::vector<int64_t> logit_rows;  // token indices whose logits are returned
  std::set<int32_t> seen;
  for (size_t b = 0; b < batch.size(); ++b) {
    const SeqInput& in = batch[b];
    if (!cache.Contains(in.seq)) {
      return absl::InvalidArgumentError(absl::StrCat("forward: unknown sequence ", in.seq));
    }
    if (!seen.insert(in.seq).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("forward: sequence ", in.seq, " appears twice in one batch"));
    }
    if (in.tokens.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("forward: sequence ", in.seq, " has no tokens"));
    }
    const int64_t start = cache.Length(in.seq);
    if (start + static_cast<int64_t>(in.tokens.size()) > cache.Capacity(in.seq)) {
      return absl::ResourceExhaustedError(
          absl::StrCat("forward: sequence ", in.seq, " would reach ", start + in.tokens.size(),
                       " tokens, over its KV cache reservation of ", cache.Capacity(in.seq)));
    }
    for (size_t i = 0; i < in.tokens.size(); ++i) {
      if (in.tokens[i] < 0 || in.tokens[i] >= V) {
        return absl::InvalidArgumentError(absl::StrCat("forward: token id ", in.tokens[i],
                                                       " at index ", i, " of sequence ", in.seq,
                                                       " is outside the vocabulary [0, ", V, ")"));
      }
      if (in.all_logits || i + 1 == in.tokens.size()) logit_rows.push_back(tokens.num_tokens);
      tokens.seq.push_back(in.seq);
      tokens.position.push_back(start + static_cast<int64_t>(i));
      ++tokens.num_tokens;
    }
  }
  // Blocks for the new positions (within each sequence's reservation, checked above).
  for (const SeqInput& in : batch) {
    DMOE_RETURN_IF_ERROR(
        cache.Grow(in.seq, cache.Length(in.seq) + static_cast<int64_t>(in.tokens.size())));
  }
  stages_.Clear();
  StageClock clock(&stages_);
  const int64_t T = tokens.num_tokens;
  int64_t max_pos = 0;
  for (int64_t p : tokens.position) max_pos = std::max(max_pos, p);
  rope_->Reserve(max_pos + 1);

  x_.resize(T * H);
  xn_.resize(T * H);
  tmp_.resize(T * H);
  {
    int64_t t = 0;
    for (const SeqInput& in : batch) {
      for (int32_t id : in.tokens) {
        float* dst = x_.data() + t * H;
        if (compute_ == ComputeType::kF32) {
          std::memcpy(dst, embed_f32_.data() + static_cast<int64_t>(id) * H, H * sizeof(float));
        } else {
          const uint16_t* src = embed_bf16_.data() + static_cast<int64_t>(id) * H;
          for (int64_t i = 0; i < H; ++i) dst[i] = BF16ToF32(src[i]);
        }
        ++t;
      }
    }
  }

  clock.Lap(Stage::kEmbed);

  if (static_cast<int64_t>(dense_offsets_.size()) < T + 1) {
    dense_offsets_.resize(T + 1);
    for (int64_t t = 0; t <= T; ++t) dense_offsets_[t] = static_cast<int32_t>(t);
    dense_ids_.assign(T, kSharedFfn);
    dense_weights_.assign(T, 1.0f);
  }

  // Micro-batches: equal runs of tokens (a prompt may straddle two; its
  // second part attends to the first part's cache entries, which the first
  // micro-batch writes earlier in the same layer).
  const int64_t M = std::min<int64_t>(micro_batches_, T);
  mbs_.resize(M);
  for (int64_t k = 0; k < M; ++k) {
    MicroBatch& mb = mbs_[k];
    mb.t0 = k * T / M;
    mb.n = (k + 1) * T / M - mb.t0;
    mb.tokens.num_tokens = mb.n;
    mb.tokens.seq.assign(tokens.seq.begin() + mb.t0, tokens.seq.begin() + mb.t0 + mb.n);
    mb.tokens.position.assign(tokens.position.begin() + mb.t0,
                              tokens.position.begin() + mb.t0 + mb.n);
    mb.backend = nullptr;
  }
  // Pipeline: micro-batch k's attention of layer l runs while the others'
  // FFNs of layer l (or l - 1) are out.
  absl::Status st;
  for (int64_t l = 0; l < c.num_hidden_layers && st.ok(); ++l) {
    for (MicroBatch& mb : mbs_) {
      st = AwaitLayer(mb);
      if (!st.ok()) break;
      st = SubmitLayer(l, mb, cache);
      if (!st.ok()) break;
    }
  }
  for (MicroBatch& mb : mbs_) {
    if (st.ok()) {
      st = AwaitLayer(mb);
    } else if (mb.backend != nullptr) {
      mb.backend->Cancel(mb.ticket);
      mb.backend = nullptr;
    }
  }
  DMOE_RETURN_IF_ERROR(st);

  for (const SeqInput& in : batch) {
    cache.SetLength(in.seq, cache.Length(in.seq) + static_cast<int64_t>(in.tokens.size()));
  }

  StageClock head_clock(&stages_);
  const int64_t R = static_cast<int64_t>(logit_rows.size());
  last_.resize(R * H);
  for (int64_t r = 0; r < R; ++r) {
    RmsNorm(x_.data() + logit_rows[r] * H, final_norm_.data(), H, c.rms_norm_eps,
            last_.data() + r * H);
  }
  logits->resize(R * V);
  lm_head_.Forward(last_.data(), R, logits->data());
  head_clock.Lap(Stage::kLmHead);
  return absl::OkStatus();
}

absl::Status Model::SubmitLayer(int64_t l, MicroBatch& mb, KvCache& cache) {
  const ModelConfig& c = cfg_;
  const int64_t H = c.hidden_size, n = mb.n;
  float* x = x_.data() + mb.t0 * H;
  float* xn = xn_.data() + mb.t0 * H;
  float* tmp = tmp_.data() + mb.t0 * H;
  StageClock clock(&stages_);
  RmsNormRows(x, H, input_norm_[l].data(), n, H, c.rms_norm_eps, xn, H);
  clock.Lap(Stage::kNorm);
  attn_[l]->Forward(xn, mb.tokens, cache, tmp);
  for (int64_t i = 0; i < n * H; ++i) x[i] += tmp[i];
  clock.Lap(Stage::kAttention);
  RmsNormRows(x, H, post_norm_[l].data(), n, H, c.rms_norm_eps, xn, H);
  clock.Lap(Stage::kNorm);
  ExpertBatch b;
  ExpertBackend* backend;
  if (gates_[l]) {
    // gate -> dispatch plan -> expert compute (-> combine in AwaitLayer).
    mb.routing = gates_[l]->Route(xn, n);
    mb.plan = MakeDispatchPlan(mb.routing, c.n_shared_experts > 0);
    b = mb.plan.AsBatch(static_cast<int32_t>(l), xn, n, H);
    backend = experts_.get();
    clock.Lap(Stage::kGate);
  } else {
    b.layer = static_cast<int32_t>(l);
    b.num_tokens = n;
    b.hidden = H;
    b.x = xn;
    b.token_offsets = std::span<const int32_t>(dense_offsets_).first(n + 1);
    b.ffn_ids = std::span<const int32_t>(dense_ids_).first(n);
    b.weights = std::span<const float>(dense_weights_).first(n);
    backend = dense_.get();
  }
  absl::StatusOr<uint64_t> ticket = backend->Submit(b, tmp);
  clock.Lap(gates_[l] ? Stage::kExperts : Stage::kDenseFfn);
  if (!ticket.ok()) return Annotate(ticket.status(), mb);
  mb.backend = backend;
  mb.ticket = *ticket;
  mb.layer = l;
  return absl::OkStatus();
}

absl::Status Model::AwaitLayer(MicroBatch& mb) {
  if (mb.backend == nullptr) return absl::OkStatus();
  ExpertBackend* backend = mb.backend;
  mb.backend = nullptr;
  StageClock clock(&stages_);
  const absl::Status awaited = backend->Await(mb.ticket);
  clock.Lap(gates_[mb.layer] ? Stage::kExperts : Stage::kDenseFfn);
  DMOE_RETURN_IF_ERROR(Annotate(awaited, mb));
  const int64_t H = cfg_.hidden_size;
  AddToResidual(std::span<float>(x_).subspan(mb.t0 * H, mb.n * H),
                std::span<const float>(tmp_).subspan(mb.t0 * H, mb.n * H));
  if (gates_[mb.layer]) {
    CountExpertLoad(mb.routing, expert_load_[mb.layer]);
    if (on_route_) on_route_(mb.layer, mb.routing);
  }
  clock.Lap(Stage::kCombine);
  return absl::OkStatus();
}

absl::Status Model::Annotate(absl::Status st, const MicroBatch& mb) const {
  if (st.ok()) return st;
  const std::vector<int32_t> failed = FailedTokens(st);
  if (failed.empty()) return st;
  std::vector<int32_t> seqs;
  for (int32_t t : failed) {
    if (t >= 0 && t < mb.n) seqs.push_back(mb.tokens.seq[t]);
  }
  std::sort(seqs.begin(), seqs.end());
  seqs.erase(std::unique(seqs.begin(), seqs.end()), seqs.end());
  return WithFailedSequences(std::move(st), seqs);
}

namespace {
constexpr char kFailedSequencesUrl[] = "type.dmoe.dev/dmoe.FailedSequences";
}  // namespace

absl::Status WithFailedSequences(absl::Status status, std::span<const int32_t> seqs) {
  return WithInt32Payload(std::move(status), kFailedSequencesUrl, seqs);
}

std::vector<int32_t> FailedSequences(const absl::Status& status) {
  return Int32Payload(status, kFailedSequencesUrl);
}

}  // namespace dmoe::core
