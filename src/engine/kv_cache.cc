#include "engine/kv_cache.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "core/check.h"
#include "engine/kv_budget.h"

namespace cachette {

ContiguousKv::ContiguousKv(const KvShape& shape, int64_t capacity)
    : shape_(shape), capacity_(capacity), layer_n_(shape.n_layer, 0) {
  CT_CHECK(capacity > 0) << "capacity " << capacity;
  const size_t bytes = shape.token_bytes() * capacity;
  for (int l = 0; l < shape.n_layer; ++l) {
    k_.push_back(std::make_unique<std::byte[]>(bytes));
    v_.push_back(std::make_unique<std::byte[]>(bytes));
    k_ptr_.push_back(k_.back().get());
    v_ptr_.push_back(v_.back().get());
  }
}

Status ContiguousKv::Reserve(int64_t n) {
  if (n > capacity_) {
    return ResourceExhausted("sequence needs " + std::to_string(n) +
                             " tokens of KV but its context holds " + std::to_string(capacity_));
  }
  return Status::Ok();
}

void* ContiguousKv::KSlot(int layer, int64_t slot) {
  return k_[layer].get() + shape_.token_bytes() * slot;
}

void* ContiguousKv::VSlot(int layer, int64_t slot) {
  return v_[layer].get() + shape_.token_bytes() * slot;
}

kernels::KvView ContiguousKv::View(int layer, int64_t n) const {
  kernels::KvView v;
  v.type = shape_.type;
  v.n_kv_head = shape_.n_kv_head;
  v.head_dim = shape_.head_dim;
  v.block_tokens = static_cast<int>(capacity_);
  v.k_blocks = &k_ptr_[layer];
  v.v_blocks = &v_ptr_[layer];
  v.n_tokens = n;
  return v;
}

void ContiguousKv::SetTokens(int64_t n) {
  if (n == 0) {
    std::fill(layer_n_.begin(), layer_n_.end(), 0);
    n_max_ = next_pos_ = seen_ = 0;
    compacted_ = false;
    weight_.clear();
    return;
  }
  CT_CHECK(!compacted_ && n <= capacity_) << "SetTokens(" << n << ") on a compacted sequence";
  std::fill(layer_n_.begin(), layer_n_.end(), n);
  n_max_ = next_pos_ = seen_ = n;
}

void ContiguousKv::Append(int64_t count) {
  for (int l = 0; l < shape_.n_layer; ++l) {
    if (!weight_.empty()) {
      for (int h = 0; h < shape_.n_kv_head; ++h) {
        std::fill_n(weight_[l].begin() + h * capacity_ + layer_n_[l], count, 1.0f);
      }
    }
    layer_n_[l] += count;
  }
  n_max_ = *std::max_element(layer_n_.begin(), layer_n_.end());
  next_pos_ += count;
  seen_ += count;
}

int64_t ContiguousKv::total_slots() const {
  int64_t t = 0;
  for (int64_t n : layer_n_) t += n;
  return t;
}

Status ContiguousKv::Compact(const KeepPlan& plan, const kernels::RopeParams& rope,
                             AttentionStats* stats) {
  if (weight_.empty()) {
    weight_.assign(shape_.n_layer, std::vector<float>(shape_.n_kv_head * capacity_, 1.0f));
  }
  const bool matching = stats != nullptr && stats->capacity == capacity_;
  CT_RETURN_IF_ERROR(CompactSlots(*this, shape_, layer_n_, plan, rope, matching ? stats : nullptr,
                                  weight_, capacity_));
  n_max_ = *std::max_element(layer_n_.begin(), layer_n_.end());
  if (plan.reassign_positions) next_pos_ = n_max_;
  compacted_ = true;
  return Status::Ok();
}

void ContiguousKv::Grow(int64_t capacity) {
  if (capacity <= capacity_) return;
  const size_t tb = shape_.token_bytes();
  for (int l = 0; l < shape_.n_layer; ++l) {
    auto k = std::make_unique<std::byte[]>(tb * capacity);
    auto v = std::make_unique<std::byte[]>(tb * capacity);
    std::memcpy(k.get(), k_[l].get(), tb * n_max_);
    std::memcpy(v.get(), v_[l].get(), tb * n_max_);
    k_[l] = std::move(k);
    v_[l] = std::move(v);
    k_ptr_[l] = k_[l].get();
    v_ptr_[l] = v_[l].get();
    if (!weight_.empty()) {
      std::vector<float> w(static_cast<size_t>(shape_.n_kv_head * capacity), 1.0f);
      for (int h = 0; h < shape_.n_kv_head; ++h) {
        std::copy_n(weight_[l].begin() + h * capacity_, n_max_, w.begin() + h * capacity);
      }
      weight_[l] = std::move(w);
    }
  }
  capacity_ = capacity;
}

Status ContiguousKv::CopyFrom(const SequenceKv& src, int64_t n) {
  if (n_max_ != 0) return InvalidArgument("CopyFrom into a sequence that is not empty");
  if (n > capacity_) return ResourceExhausted("CopyFrom of " + std::to_string(n) + " tokens");
  const size_t tb = shape_.token_bytes();
  for (int l = 0; l < shape_.n_layer; ++l) {
    if (src.layer_tokens(l) < n) return InvalidArgument("CopyFrom source is shorter");
    const kernels::KvView view = src.View(l, n);
    for (int64_t s = 0; s < n; ++s) {
      const int64_t off = static_cast<int64_t>(tb) * (s % view.block_tokens);
      std::memcpy(k_[l].get() + tb * s,
                  static_cast<const std::byte*>(view.k_blocks[s / view.block_tokens]) + off, tb);
      std::memcpy(v_[l].get() + tb * s,
                  static_cast<const std::byte*>(view.v_blocks[s / view.block_tokens]) + off, tb);
    }
  }
  std::fill(layer_n_.begin(), layer_n_.end(), n);
  n_max_ = n;
  next_pos_ = seen_ = src.next_position() - src.n_tokens() + n;
  return Status::Ok();
}

}  // namespace cachette
