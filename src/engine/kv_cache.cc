#include "engine/kv_cache.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "core/check.h"
#include "engine/kv_budget.h"

namespace cachette {

int64_t SlotBook::TotalSlots(int n_layer, int64_t n) const {
  if (!compacted) return n * n_layer;
  int64_t t = 0;
  for (int64_t x : layer_n) t += x;
  return t;
}

void SlotBook::Start(const KvShape& shape, int64_t stride, int64_t n) {
  if (compacted) return;
  layer_n.assign(shape.n_layer, n);
  weight.assign(shape.n_layer,
                std::vector<float>(static_cast<size_t>(shape.n_kv_head * stride), 1.0f));
  next_pos = seen = exact = n;
}

int64_t SlotBook::Append(int n_kv_head, int64_t stride, int64_t n, int64_t count) {
  if (!compacted) return n + count;
  for (size_t l = 0; l < layer_n.size(); ++l) {
    AppendLayer(n_kv_head, stride, static_cast<int>(l), count);
  }
  return AppendPositions(count);
}

int64_t SlotBook::AppendLayer(int n_kv_head, int64_t stride, int layer, int64_t count) {
  CT_CHECK(compacted);
  for (int h = 0; h < n_kv_head; ++h) {
    std::fill_n(weight[layer].begin() + h * stride + layer_n[layer], count, 1.0f);
  }
  layer_n[layer] += count;
  return *std::max_element(layer_n.begin(), layer_n.end());
}

int64_t SlotBook::AppendPositions(int64_t count) {
  CT_CHECK(compacted);
  next_pos += count;
  seen += count;
  return *std::max_element(layer_n.begin(), layer_n.end());
}

void SlotBook::Restride(int n_kv_head, int64_t old_stride, int64_t stride, int64_t n) {
  for (auto& lw : weight) {
    std::vector<float> w(static_cast<size_t>(n_kv_head * stride), 1.0f);
    for (int h = 0; h < n_kv_head; ++h) {
      std::copy_n(lw.begin() + h * old_stride, n, w.begin() + h * stride);
    }
    lw = std::move(w);
  }
}

Status CheckKvRewritable(const KvShape& shape, std::string_view what) {
  if (shape.type == kernels::KvType::kKivi4) {
    return InvalidArgument(std::string(what) +
                           " does not work with kivi4 KV (its keys are quantized by groups of 32 "
                           "tokens): use f16, q8_0, q4_0 or q4_1");
  }
  if (shape.windowed()) {
    return InvalidArgument(std::string(what) + " does not work with " +
                           std::string(kernels::KvTypeName(shape.type)) +
                           " KV with a recent f16 window (--kv-recent " +
                           std::to_string(shape.recent) + "): its newest tokens are not in slots");
  }
  return Status::Ok();
}

// ---- KvWindow ------------------------------------------------------------------------------

KvWindow::KvWindow(const KvShape& shape)
    : shape_(shape),
      row_(static_cast<size_t>(shape.n_kv_head) * shape.head_dim),
      k_(shape.n_layer),
      v_(shape.n_layer) {
  Resize(shape.recent + kernels::kKiviGroup);
}

void KvWindow::Resize(int64_t cap) {
  for (auto* rings : {&k_, &v_}) {
    for (auto& ring : *rings) {
      std::vector<uint16_t> fresh(static_cast<size_t>(cap) * row_);
      for (int64_t s = begin_; s < end_; ++s) {
        std::memcpy(fresh.data() + (s % cap) * row_, ring.data() + (s % cap_) * row_,
                    row_ * sizeof(uint16_t));
      }
      ring = std::move(fresh);
    }
  }
  cap_ = cap;
}

void KvWindow::Grow(int64_t need) {
  if (need <= cap_) return;
  Resize(std::max(need, 2 * cap_));
}

void* KvWindow::K(int layer, int64_t pos) {
  CT_CHECK(pos >= begin_) << "kivi4 write at " << pos << " before the window at " << begin_;
  Grow(pos + 1 - begin_);
  end_ = std::max(end_, pos + 1);
  return k_[layer].data() + (pos % cap_) * row_;
}

void* KvWindow::V(int layer, int64_t pos) {
  CT_CHECK(pos >= begin_) << "kivi4 write at " << pos << " before the window at " << begin_;
  Grow(pos + 1 - begin_);
  end_ = std::max(end_, pos + 1);
  return v_[layer].data() + (pos % cap_) * row_;
}

void KvWindow::Fill(int layer, kernels::KvView* view) const {
  view->tail_begin = begin_;
  view->tail_cap = cap_;
  view->tail_k = k_[layer].data();
  view->tail_v = v_[layer].data();
}

void KvWindow::Flush(SequenceKv& seq, int64_t n) {
  const int64_t G = kernels::kKiviGroup, recent = shape_.recent;
  if (begin_ + G + recent > n) return;
  Quantize(seq, begin_ + (n - recent - begin_) / G * G);
  // After a prefill chunk the ring goes back to its steady size.
  if (cap_ > 2 * (recent + G)) Resize(std::max(recent + G, end_ - begin_));
}

void KvWindow::Seal(SequenceKv& seq, int64_t n) {
  const int64_t G = kernels::kKiviGroup;
  Quantize(seq, shape_.type == kernels::KvType::kKivi4 ? n - n % G : n);
}

void KvWindow::Quantize(SequenceKv& seq, int64_t end) {
  const int64_t G = kernels::kKiviGroup;
  const bool kivi = shape_.type == kernels::KvType::kKivi4;
  std::vector<float> k(G * row_), v(G * row_);
  for (int64_t len; begin_ < end; begin_ += len) {
    len = std::min(G, end - begin_);
    CT_CHECK(!kivi || len == G) << "kivi4 quantizes whole key groups";
    for (int l = 0; l < shape_.n_layer; ++l) {
      for (int64_t t = 0; t < len; ++t) {
        const size_t at = ((begin_ + t) % cap_) * row_;
        kernels::LoadKv(k_[l].data() + at, shape_.n_kv_head, shape_.head_dim,
                        kernels::KvType::kF16, k.data() + t * row_);
        kernels::LoadKv(v_[l].data() + at, shape_.n_kv_head, shape_.head_dim,
                        kernels::KvType::kF16, v.data() + t * row_);
      }
      if (kivi) {
        // A group lies in one block of the sequence (its pages hold whole groups).
        kernels::StoreKiviGroup(k.data(), v.data(), shape_.n_kv_head, shape_.head_dim,
                                seq.KSlot(l, begin_), seq.VSlot(l, begin_), shape_.token_bytes());
        continue;
      }
      for (int64_t t = 0; t < len; ++t) {
        kernels::StoreKv(k.data() + t * row_, shape_.n_kv_head, shape_.head_dim, shape_.type,
                         seq.KSlot(l, begin_ + t));
        kernels::StoreKv(v.data() + t * row_, shape_.n_kv_head, shape_.head_dim, shape_.type,
                         seq.VSlot(l, begin_ + t));
      }
    }
  }
}

void KvWindow::Rebase(SequenceKv& seq, int64_t n) {
  const int64_t G = kernels::kKiviGroup;
  // Only kivi4 quantizes by aligned groups: other types restart the window at n itself.
  const int64_t g = shape_.type == kernels::KvType::kKivi4 ? n - n % G : n;
  begin_ = end_ = g;
  if (n == g) return;
  Grow(n - g);
  std::vector<float> k(G * row_), v(G * row_);
  for (int l = 0; l < shape_.n_layer; ++l) {
    kernels::LoadKiviGroup(seq.KSlot(l, g), seq.VSlot(l, g), shape_.token_bytes(),
                           shape_.n_kv_head, shape_.head_dim, k.data(), v.data());
    for (int64_t t = 0; t < n - g; ++t) {
      const size_t at = ((g + t) % cap_) * row_;
      kernels::StoreKv(k.data() + t * row_, shape_.n_kv_head, shape_.head_dim,
                       kernels::KvType::kF16, k_[l].data() + at);
      kernels::StoreKv(v.data() + t * row_, shape_.n_kv_head, shape_.head_dim,
                       kernels::KvType::kF16, v_[l].data() + at);
    }
  }
  end_ = n;
}

void KvWindow::Truncate(SequenceKv& seq, int64_t n) {
  if (n < begin_) {
    Rebase(seq, n);
  } else {
    end_ = std::min(end_, n);
  }
}

// ---- ContiguousKv --------------------------------------------------------------------------

namespace {
// A kivi4 sequence's one block holds whole key groups.
int64_t BlockCapacity(const KvShape& shape, int64_t capacity) {
  const int64_t G = kernels::kKiviGroup;
  return shape.type == kernels::KvType::kKivi4 ? (capacity + G - 1) / G * G : capacity;
}
}  // namespace

ContiguousKv::ContiguousKv(const KvShape& shape, int64_t capacity)
    : shape_(shape), capacity_(BlockCapacity(shape, capacity)) {
  CT_CHECK(capacity > 0) << "capacity " << capacity;
  capacity = capacity_;
  if (shape.windowed()) tail_ = std::make_unique<KvWindow>(shape);
  k_ptr_.resize(shape.n_layer);
  v_ptr_.resize(shape.n_layer);
  Allocate(capacity);
}

void ContiguousKv::Allocate(int64_t capacity) {
  // One buffer for every layer's K and V, so that it starts on a huge page and is huge pages
  // through (a layer's K alone is under 2 MiB up to 8K tokens of a 0.5B model).
  layer_bytes_ = shape_.token_bytes() * static_cast<size_t>(capacity);
  mem_ = ZeroedBuffer(2 * layer_bytes_ * static_cast<size_t>(shape_.n_layer));
  for (int l = 0; l < shape_.n_layer; ++l) {
    k_ptr_[l] = K(l);
    v_ptr_[l] = V(l);
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
  return K(layer) + shape_.token_bytes() * slot;
}

void* ContiguousKv::VSlot(int layer, int64_t slot) {
  return V(layer) + shape_.token_bytes() * slot;
}

void* ContiguousKv::KWrite(int layer, int64_t pos) {
  return tail_ ? tail_->K(layer, pos) : KSlot(layer, pos);
}

void* ContiguousKv::VWrite(int layer, int64_t pos) {
  return tail_ ? tail_->V(layer, pos) : VSlot(layer, pos);
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
  if (tail_) tail_->Fill(layer, &v);
  return v;
}

void ContiguousKv::SetTokens(int64_t n) {
  if (n == 0) {  // a restart, compacted or not
    n_max_ = 0;
    book_.Clear();
    if (tail_) tail_->Truncate(*this, 0);
    return;
  }
  CT_CHECK(!book_.compacted && n <= capacity_) << "SetTokens(" << n << ") on a compacted sequence";
  if (tail_ && n > n_max_) tail_->Rebase(*this, n);
  if (tail_ && n < n_max_) tail_->Truncate(*this, n);
  n_max_ = n;
}

void ContiguousKv::Append(int64_t count) {
  n_max_ = book_.Append(shape_.n_kv_head, capacity_, n_max_, count);
  if (tail_) tail_->Flush(*this, n_max_);
}

Status ContiguousKv::ReserveLayer(int layer, int64_t count) {
  CT_RETURN_IF_ERROR(CheckKvRewritable(shape_, "reading a layer at a time"));
  if (!book_.compacted) {
    book_.Start(shape_, capacity_, n_max_);
    book_.compacted = true;
  }
  if (book_.layer_n[layer] + count > capacity_) {
    return ResourceExhausted("layer " + std::to_string(layer) + " needs " +
                             std::to_string(book_.layer_n[layer] + count) +
                             " slots of KV but the sequence holds " + std::to_string(capacity_));
  }
  return Status::Ok();
}

void ContiguousKv::AppendLayer(int layer, int64_t count) {
  n_max_ = book_.AppendLayer(shape_.n_kv_head, capacity_, layer, count);
}

void ContiguousKv::AppendPositions(int64_t count) { n_max_ = book_.AppendPositions(count); }

Status ContiguousKv::Compact(const KeepPlan& plan, const kernels::RopeParams& rope,
                             AttentionStats* stats) {
  CT_RETURN_IF_ERROR(CheckKvRewritable(shape_, "a KV budget policy"));
  SlotBook book = book_;  // on error nothing changes
  book.Start(shape_, capacity_, n_max_);
  const bool matching = stats != nullptr && stats->capacity == capacity_;
  const int64_t first = plan.FirstChanged(book.layer_n);
  CT_RETURN_IF_ERROR(CompactSlots(*this, shape_, book.layer_n, plan, rope,
                                  matching ? stats : nullptr, book.weight, capacity_));
  book.compacted = true;
  n_max_ = *std::max_element(book.layer_n.begin(), book.layer_n.end());
  if (plan.reassign_positions) book.next_pos = n_max_;
  book.exact = std::min(book.exact, first);
  book_ = std::move(book);
  return Status::Ok();
}

void ContiguousKv::Grow(int64_t capacity) {
  capacity = BlockCapacity(shape_, capacity);
  if (capacity <= capacity_) return;
  const size_t tb = shape_.token_bytes();
  ZeroedBuffer old = std::move(mem_);
  const size_t old_layer_bytes = layer_bytes_;
  Allocate(capacity);
  for (int l = 0; l < shape_.n_layer; ++l) {
    std::memcpy(K(l), old.get() + 2 * l * old_layer_bytes, tb * n_max_);
    std::memcpy(V(l), old.get() + (2 * l + 1) * old_layer_bytes, tb * n_max_);
  }
  book_.Restride(shape_.n_kv_head, capacity_, capacity, n_max_);
  capacity_ = capacity;
}

Status ContiguousKv::CopyFrom(const SequenceKv& src, int64_t n) {
  if (n_max_ != 0) return InvalidArgument("CopyFrom into a sequence that is not empty");
  CT_RETURN_IF_ERROR(CheckKvRewritable(shape_, "copying a sequence"));
  if (n > capacity_) return ResourceExhausted("CopyFrom of " + std::to_string(n) + " tokens");
  const size_t tb = shape_.token_bytes();
  for (int l = 0; l < shape_.n_layer; ++l) {
    if (src.layer_tokens(l) < n) return InvalidArgument("CopyFrom source is shorter");
    const kernels::KvView view = src.View(l, n);
    for (int64_t s = 0; s < n; ++s) {
      const int64_t off = static_cast<int64_t>(tb) * (s % view.block_tokens);
      std::memcpy(K(l) + tb * s,
                  static_cast<const std::byte*>(view.k_blocks[s / view.block_tokens]) + off, tb);
      std::memcpy(V(l) + tb * s,
                  static_cast<const std::byte*>(view.v_blocks[s / view.block_tokens]) + off, tb);
    }
  }
  n_max_ = n;
  // Positions continue where the source's do (a source whose positions were reassigned).
  const int64_t pos = src.next_position() - src.n_tokens() + n;
  if (pos != n) {
    book_.Start(shape_, capacity_, n);
    book_.compacted = true;
    book_.next_pos = book_.seen = pos;
  }
  return Status::Ok();
}

}  // namespace cachette
