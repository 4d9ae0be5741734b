#include "engine/kv_cache.h"

#include <string>

#include "core/check.h"

namespace cachette {

ContiguousKv::ContiguousKv(const KvShape& shape, int64_t capacity)
    : shape_(shape), capacity_(capacity) {
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

void* ContiguousKv::KSlot(int layer, int64_t pos) {
  return k_[layer].get() + shape_.token_bytes() * pos;
}

void* ContiguousKv::VSlot(int layer, int64_t pos) {
  return v_[layer].get() + shape_.token_bytes() * pos;
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

}  // namespace cachette
