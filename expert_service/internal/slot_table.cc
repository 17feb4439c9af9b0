#include "expert_service/internal/slot_table.h"

#include <algorithm>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace dmoe::expert::internal {

absl::StatusOr<std::unique_ptr<SlotTable>> SlotTable::Create(const core::ModelConfig& cfg,
                                                             int server_index, uint64_t version,
                                                             LayerSlots slots) {
  std::unique_ptr<SlotTable> t(new SlotTable(cfg, server_index));
  if (static_cast<int64_t>(slots.size()) != cfg.num_hidden_layers) {
    return absl::InvalidArgumentError(absl::StrCat("slot table: ", slots.size(),
                                                   " layers of slots for a model with ",
                                                   cfg.num_hidden_layers, " layers"));
  }
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    t->moe_layer_[l] = cfg.IsMoeLayer(l);
    auto& s = slots[l];
    std::sort(s.begin(), s.end());
    if (!t->moe_layer_[l] && !s.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("slot table: layer ", l, " is dense but has expert slots"));
    }
    for (size_t i = 0; i < s.size(); ++i) {
      if (s[i] < 0 || s[i] >= cfg.n_routed_experts) {
        return absl::InvalidArgumentError(absl::StrCat("slot table: layer ", l, " expert id ", s[i],
                                                       " out of range [0, ", cfg.n_routed_experts,
                                                       ")"));
      }
      if (i > 0 && s[i] == s[i - 1]) {
        return absl::InvalidArgumentError(
            absl::StrCat("slot table: layer ", l, " expert ", s[i], " listed twice"));
      }
    }
  }
  absl::MutexLock lock(&t->mu_);
  t->versions_.push_back({version, std::move(slots)});
  t->tokens_.assign(cfg.num_hidden_layers, {});
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    if (t->moe_layer_[l]) t->tokens_[l].assign(cfg.n_routed_experts, 0);
  }
  return t;
}

const SlotTable::Version* SlotTable::Find(uint64_t version) const {
  for (const auto& v : versions_) {
    if (v.version == version) return &v;
  }
  return nullptr;
}

std::string SlotTable::HeldList() const {
  std::vector<uint64_t> held;
  for (const auto& v : versions_) held.push_back(v.version);
  return absl::StrJoin(held, ", ");
}

absl::Status SlotTable::CheckHeld(uint64_t version, int32_t layer,
                                  std::span<const int32_t> experts) const {
  absl::ReaderMutexLock lock(&mu_);
  const Version* v = Find(version);
  if (v == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("placement version ", version, " not held (holding ", HeldList(), ")"));
  }
  if (layer < 0 || layer >= num_layers_ || !moe_layer_[layer]) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " is not a MoE layer"));
  }
  const auto& held = v->slots[layer];
  for (int32_t e : experts) {
    if (e < 0 || e >= num_experts_) {
      return absl::InvalidArgumentError(absl::StrCat("layer ", layer, ": expert id ", e,
                                                     " out of range [0, ", num_experts_, ")"));
    }
    if (!std::binary_search(held.begin(), held.end(), e)) {
      return absl::FailedPreconditionError(absl::StrCat("layer ", layer, " expert ", e,
                                                        " not held by server ", server_index_,
                                                        " in placement version ", version));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<LayerExpert>> SlotTable::CheckSlotList(
    const std::vector<std::pair<int64_t, std::vector<int32_t>>>& slots) const {
  std::vector<LayerExpert> out;
  for (const auto& [layer, experts] : slots) {
    if (layer < 0 || layer >= num_layers_ || !moe_layer_[layer]) {
      return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " is not a MoE layer"));
    }
    for (int32_t e : experts) {
      if (e < 0 || e >= num_experts_) {
        return absl::InvalidArgumentError(absl::StrCat("layer ", layer, ": expert id ", e,
                                                       " out of range [0, ", num_experts_, ")"));
      }
      LayerExpert le{static_cast<int32_t>(layer), e};
      if (std::find(out.begin(), out.end(), le) != out.end()) {
        return absl::InvalidArgumentError(
            absl::StrCat("layer ", layer, " expert ", e, " listed twice"));
      }
      out.push_back(le);
    }
  }
  return out;
}

absl::Status SlotTable::CheckAddVersion(uint64_t version) const {
  absl::ReaderMutexLock lock(&mu_);
  const uint64_t newest = versions_.back().version;
  if (version < newest) {
    return absl::FailedPreconditionError(absl::StrCat(
        "placement version ", version, " is older than the newest held version ", newest));
  }
  return absl::OkStatus();
}

absl::Status SlotTable::AddSlots(uint64_t version, std::span<const LayerExpert> add) {
  absl::MutexLock lock(&mu_);
  const uint64_t newest = versions_.back().version;
  if (version < newest) {
    return absl::FailedPreconditionError(absl::StrCat(
        "placement version ", version, " is older than the newest held version ", newest));
  }
  if (version > newest) {
    Version next{version, versions_.back().slots};
    if (versions_.size() > 1) versions_.erase(versions_.begin());
    versions_.push_back(std::move(next));
  }
  LayerSlots& slots = versions_.back().slots;
  for (const LayerExpert& le : add) {
    auto& s = slots[le.layer];
    auto it = std::lower_bound(s.begin(), s.end(), le.expert);
    if (it == s.end() || *it != le.expert) s.insert(it, le.expert);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<LayerExpert>> SlotTable::RemoveSlots(
    uint64_t version, std::span<const LayerExpert> remove) {
  absl::MutexLock lock(&mu_);
  const uint64_t newest = versions_.back().version;
  if (version != newest) {
    return absl::FailedPreconditionError(absl::StrCat("placement version ", version,
                                                      " is not the newest held version (holding ",
                                                      HeldList(), ")"));
  }
  LayerSlots slots = versions_.back().slots;
  for (const LayerExpert& le : remove) {
    auto& s = slots[le.layer];
    auto it = std::lower_bound(s.begin(), s.end(), le.expert);
    if (it == s.end() || *it != le.expert) {
      return absl::NotFoundError(absl::StrCat("layer ", le.layer, " expert ", le.expert,
                                              " is not a slot of placement version ", version));
    }
    s.erase(it);
  }
  // Everything some dropped version or the removed slots held, minus what
  // stays.
  std::vector<LayerExpert> gone;
  for (const Version& v : versions_) {
    for (size_t l = 0; l < v.slots.size(); ++l) {
      for (int32_t e : v.slots[l]) {
        const auto& keep = slots[l];
        LayerExpert le{static_cast<int32_t>(l), e};
        if (!std::binary_search(keep.begin(), keep.end(), e) &&
            std::find(gone.begin(), gone.end(), le) == gone.end()) {
          gone.push_back(le);
        }
      }
    }
  }
  versions_.clear();
  versions_.push_back({version, std::move(slots)});
  return gone;
}

bool SlotTable::Referenced(int32_t layer, int32_t expert) const {
  absl::ReaderMutexLock lock(&mu_);
  for (const Version& v : versions_) {
    const auto& s = v.slots[layer];
    if (std::binary_search(s.begin(), s.end(), expert)) return true;
  }
  return false;
}

void SlotTable::CountTokens(std::span<const std::pair<LayerExpert, uint64_t>> counts) {
  absl::MutexLock lock(&mu_);
  for (const auto& [le, n] : counts) tokens_[le.layer][le.expert] += n;
}

SlotTable::Snapshot SlotTable::Get() const {
  absl::ReaderMutexLock lock(&mu_);
  Snapshot s;
  s.version = versions_.back().version;
  for (const auto& v : versions_) s.held_versions.push_back(v.version);
  s.slots = versions_.back().slots;
  for (size_t l = 0; l < s.slots.size(); ++l) {
    for (int32_t e : s.slots[l]) {
      s.tokens_computed.push_back(tokens_[l][e]);
      ++s.num_slots;
    }
  }
  return s;
}

uint64_t SlotTable::newest_version() const {
  absl::ReaderMutexLock lock(&mu_);
  return versions_.back().version;
}

}  // namespace dmoe::expert::internal
