#include "engine/kv_budget.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>

#include "core/check.h"

namespace cachette {

// ---- AttentionStats ------------------------------------------------------------------------

void AttentionStats::Resize(int layers, int kv_heads, int64_t cap) {
  auto resize = [&](std::vector<std::vector<float>>& a) {
    std::vector<std::vector<float>> out(layers, std::vector<float>(kv_heads * cap, 0.0f));
    const int64_t keep = std::min(cap, capacity);
    for (int l = 0; l < std::min<int>(layers, static_cast<int>(a.size())); ++l) {
      for (int h = 0; h < std::min(kv_heads, n_kv_head); ++h) {
        std::copy_n(a[l].begin() + h * capacity, keep, out[l].begin() + h * cap);
      }
    }
    a = std::move(out);
  };
  resize(win_sum);
  resize(win_sq);
  resize(cum);
  win_rows.resize(layers, 0);
  n_layer = layers;
  n_kv_head = kv_heads;
  capacity = cap;
}

void AttentionStats::ClearWindow() {
  for (auto& a : win_sum) std::fill(a.begin(), a.end(), 0.0f);
  for (auto& a : win_sq) std::fill(a.begin(), a.end(), 0.0f);
  std::fill(win_rows.begin(), win_rows.end(), 0);
}

// ---- AccumulateAttention -------------------------------------------------------------------

namespace {

// The weight type whose rows are laid out as stored KV head vectors of `t`, if any: then a
// KV head's keys are a weight matrix (rows n_kv_head head vectors apart) and MatMul scores
// every query against them at the active ISA level.
bool KeysAsWeights(kernels::KvType t, kernels::WType* w) {
  switch (t) {
    case kernels::KvType::kF32:
      *w = kernels::WType::kF32;
      return true;
    case kernels::KvType::kF16:
      *w = kernels::WType::kF16;
      return true;
    case kernels::KvType::kQ8_0:
      *w = kernels::WType::kQ8_0;
      return true;
    case kernels::KvType::kQ4_0:
      *w = kernels::WType::kQ4_0;
      return true;
    default:
      return false;
  }
}

}  // namespace

void AccumulateAttention(const float* q, int n_head, const std::vector<int64_t>& rows,
                         int64_t rows_base, int64_t slot0, const kernels::KvView& view,
                         float scale, int layer, bool window, bool cumulative,
                         AttentionStats& stats, ThreadPool& pool) {
  if (rows.empty() || (!window && !cumulative)) return;
  const int hd = view.head_dim;
  const int n_kv = view.n_kv_head;
  const int group = n_head / n_kv;
  const size_t head_bytes = kernels::KvHeadBytes(view.type, hd);
  const int64_t n_keys = slot0 + (rows.back() - rows_base) + 1;  // rows are increasing
  CT_CHECK(n_keys <= view.n_tokens && n_keys <= stats.capacity)
      << n_keys << " keys, view " << view.n_tokens << ", stats " << stats.capacity;
  // The scores of every query are held at once: rows go in parts of at most kScoreBytes.
  constexpr size_t kScoreBytes = size_t{16} << 20;
  const size_t row_bytes = sizeof(float) * static_cast<size_t>(n_kv * group * n_keys);
  const size_t part = std::max<size_t>(1, kScoreBytes / row_bytes);
  if (rows.size() > part) {
    for (size_t i = 0; i < rows.size(); i += part) {
      const std::vector<int64_t> some(rows.begin() + i,
                                      rows.begin() + std::min(rows.size(), i + part));
      AccumulateAttention(q, n_head, some, rows_base, slot0, view, scale, layer, window,
                          cumulative, stats, pool);
    }
    return;
  }
  const int64_t m = static_cast<int64_t>(rows.size()) * group;  // queries per KV head
  // Scores [n_kv][m][n_keys], scaled below. Statistics, not the forward pass: the test
  // compares them with a double reference at 1e-5.
  const std::unique_ptr<float[]> scores(new float[static_cast<size_t>(n_kv * m * n_keys)]);
  kernels::WType wtype;
  if (KeysAsWeights(view.type, &wtype) && n_keys <= view.block_tokens) {
    // One block holds every key (a contiguous sequence): each KV head's keys are a weight
    // matrix, and one MatMul (parallel over `pool`) scores all the head's queries.
    std::vector<float> qg(static_cast<size_t>(m * hd));
    for (int g = 0; g < n_kv; ++g) {
      for (size_t i = 0; i < rows.size(); ++i) {
        std::memcpy(qg.data() + i * group * hd, q + (rows[i] * n_head + g * group) * hd,
                    sizeof(float) * group * hd);
      }
      kernels::WeightMatrix w;
      w.type = wtype;
      w.data = static_cast<const std::byte*>(view.k_blocks[0]) + g * head_bytes;
      w.rows = n_keys;
      w.cols = hd;
      w.row_bytes = n_kv * head_bytes;
      kernels::MatMul(qg.data(), m, w, scores.get() + g * m * n_keys, pool);
    }
  } else {
    // Any layout: each key widened to f32 once, then the attention kernel's dot product.
    pool.ParallelFor(n_kv, [&](int64_t begin, int64_t end, int) {
      std::vector<float> kf(static_cast<size_t>(n_keys * hd));
      for (int64_t g = begin; g < end; ++g) {
        for (int64_t s = 0; s < n_keys; ++s) {
          const auto* block =
              static_cast<const std::byte*>(view.k_blocks[s / view.block_tokens]);
          kernels::LoadKv(
              block + ((s % view.block_tokens) * n_kv + g) * static_cast<int64_t>(head_bytes), 1,
              hd, view.type, kf.data() + s * hd);
        }
        for (size_t i = 0; i < rows.size(); ++i) {
          const int64_t last = slot0 + (rows[i] - rows_base);
          for (int hq = 0; hq < group; ++hq) {
            const float* qv = q + (rows[i] * n_head + g * group + hq) * hd;
            float* p = scores.get() + (g * m + static_cast<int64_t>(i) * group + hq) * n_keys;
            for (int64_t s = 0; s <= last; ++s) {
              p[s] = kernels::KvDot(qv, kf.data() + s * hd, hd, kernels::KvType::kF32);
            }
          }
        }
      }
    });
  }
  // Each query's softmax over its causal range (the kernels' own, at the active ISA level),
  // summed into the head's statistics.
  pool.ParallelFor(n_kv, [&](int64_t begin, int64_t end, int) {
    for (int64_t g = begin; g < end; ++g) {
      float* wsum = stats.WinSum(layer, static_cast<int>(g));
      float* wsq = stats.WinSq(layer, static_cast<int>(g));
      float* csum = stats.Cum(layer, static_cast<int>(g));
      for (size_t i = 0; i < rows.size(); ++i) {
        const int64_t last = slot0 + (rows[i] - rows_base);  // the query's own slot
        for (int hq = 0; hq < group; ++hq) {
          float* p = scores.get() + (g * m + static_cast<int64_t>(i) * group + hq) * n_keys;
          for (int64_t s = 0; s <= last; ++s) p[s] *= scale;
          kernels::Softmax(p, last + 1);
          for (int64_t s = 0; s <= last; ++s) {
            const float pr = p[s];
            if (window) {
              wsum[s] += pr;
              wsq[s] += pr * pr;
            }
            if (cumulative) csum[s] += pr;
          }
        }
      }
    }
  });
  if (window) stats.win_rows[layer] += static_cast<int64_t>(rows.size()) * group;
}

// ---- KeepPlan ------------------------------------------------------------------------------

Status KeepPlan::Validate(const std::vector<int64_t>& layer_tokens, int n_kv_head) const {
  if (slots.size() != layer_tokens.size()) {
    return InvalidArgument("keep plan has " + std::to_string(slots.size()) + " layers, the KV " +
                           std::to_string(layer_tokens.size()));
  }
  if (!merge_into.empty() && merge_into.size() != slots.size()) {
    return InvalidArgument("keep plan merges over " + std::to_string(merge_into.size()) +
                           " layers, not " + std::to_string(slots.size()));
  }
  int64_t common = -1;
  for (size_t l = 0; l < slots.size(); ++l) {
    const std::string where = "keep plan layer " + std::to_string(l);
    if (static_cast<int>(slots[l].size()) != n_kv_head) {
      return InvalidArgument(where + ": " + std::to_string(slots[l].size()) + " heads, not " +
                             std::to_string(n_kv_head));
    }
    const int64_t n = layer_tokens[l];
    for (int h = 0; h < n_kv_head; ++h) {
      const auto& s = slots[l][h];
      if (s.size() != slots[l][0].size()) {
        return InvalidArgument(where + " head " + std::to_string(h) + ": keeps " +
                               std::to_string(s.size()) + " slots, head 0 keeps " +
                               std::to_string(slots[l][0].size()));
      }
      for (size_t i = 0; i < s.size(); ++i) {
        if (s[i] < 0 || s[i] >= n) {
          return InvalidArgument(where + " head " + std::to_string(h) + ": slot " +
                                 std::to_string(s[i]) + " outside [0, " + std::to_string(n) +
                                 ")");
        }
        if (i > 0 && s[i] <= s[i - 1]) {
          return InvalidArgument(where + " head " + std::to_string(h) +
                                 ": slots not strictly increasing at " + std::to_string(i));
        }
      }
      if (!merge_into.empty() && !merge_into[l].empty()) {
        if (static_cast<int>(merge_into[l].size()) != n_kv_head ||
            static_cast<int64_t>(merge_into[l][h].size()) != n) {
          return InvalidArgument(where + " head " + std::to_string(h) +
                                 ": merge list does not cover the layer's slots");
        }
        for (int64_t e = 0; e < n; ++e) {
          const int64_t t = merge_into[l][h][e];
          if (t < 0) continue;
          if (!std::binary_search(s.begin(), s.end(), t)) {
            return InvalidArgument(where + " head " + std::to_string(h) + ": slot " +
                                   std::to_string(e) + " merges into slot " + std::to_string(t) +
                                   ", which is not kept");
          }
        }
      }
    }
    if (reassign_positions) {
      if (common >= 0 && kept(static_cast<int>(l)) != common) {
        return InvalidArgument(where + ": reassigning positions needs the same count in every "
                               "layer");
      }
      common = kept(static_cast<int>(l));
    }
  }
  return Status::Ok();
}

// ---- KeepPlan and compaction ------------------------------------------------------------

int64_t KeepPlan::FirstChanged(const std::vector<int64_t>& layer_tokens) const {
  int64_t first = INT64_MAX;
  for (size_t l = 0; l < slots.size(); ++l) {
    for (size_t h = 0; h < slots[l].size(); ++h) {
      const auto& keep = slots[l][h];
      int64_t i = 0;
      const int64_t m = static_cast<int64_t>(keep.size());
      while (i < m && keep[i] == i) ++i;
      // Slots [0, i) stay; with every slot kept (i == n) nothing changes in this head.
      int64_t f = i < m || m < layer_tokens[l] ? i : INT64_MAX;
      if (!merge_into.empty() && !merge_into[l].empty()) {
        for (int64_t e = 0; e < layer_tokens[l]; ++e) {
          const int64_t t = merge_into[l][h][e];
          if (t >= 0 && !std::binary_search(keep.begin(), keep.end(), e)) {
            f = std::min(f, t);  // the anchor's bytes change (it stays in place when t < i)
          }
        }
      }
      first = std::min(first, f);
    }
  }
  return first;
}

Status CompactSlots(SequenceKv& kv, const KvShape& shape, std::vector<int64_t>& layer_n,
                    const KeepPlan& plan, const kernels::RopeParams& rope,
                    AttentionStats* stats, std::vector<std::vector<float>>& weight,
                    int64_t weight_stride) {
  CT_RETURN_IF_ERROR(CheckKvRewritable(shape, "a KV budget policy"));
  CT_RETURN_IF_ERROR(plan.Validate(layer_n, shape.n_kv_head));
  const int hd = shape.head_dim;
  const int n_kv = shape.n_kv_head;
  const size_t hb = kernels::KvHeadBytes(shape.type, hd);
  const bool with_stats = stats != nullptr && stats->n_layer == shape.n_layer &&
                          stats->capacity >= *std::max_element(layer_n.begin(), layer_n.end());
  std::vector<float> a(hd), b(hd);
  std::vector<int64_t> moved;   // slots whose keys moved to a new position, in one head
  std::vector<int32_t> shift;   // ... and by how much
  std::vector<float> rotated;   // [moved][hd]
  for (int l = 0; l < shape.n_layer; ++l) {
    const int64_t n = layer_n[l];
    const int64_t m = plan.kept(l);
    auto kp = [&](int64_t slot, int h) {
      return static_cast<std::byte*>(kv.KSlot(l, slot)) + hb * h;
    };
    auto vp = [&](int64_t slot, int h) {
      return static_cast<std::byte*>(kv.VSlot(l, slot)) + hb * h;
    };
    for (int h = 0; h < n_kv; ++h) {
      const std::vector<int64_t>& keep = plan.slots[l][h];
      float* w = weight[l].data() + h * weight_stride;
      // Merges are summed first, while every slot is still where it was (anchor = weighted
      // mean), and stored after the moves, in the anchor's new slot: the plan writes no slot
      // at or past its kept count (a paged sequence copies only the pages it writes).
      std::vector<std::vector<float>> ksum, vsum;  // per kept index, when merged into
      std::vector<float> wsum;
      if (!plan.merge_into.empty() && !plan.merge_into[l].empty()) {
        const std::vector<int64_t>& into = plan.merge_into[l][h];
        ksum.resize(m);
        vsum.resize(m);
        wsum.assign(m, 0.0f);
        for (int64_t e = 0; e < n; ++e) {
          const int64_t t = into[e];
          if (t < 0 || std::binary_search(keep.begin(), keep.end(), e)) continue;
          const int64_t ti = std::lower_bound(keep.begin(), keep.end(), t) - keep.begin();
          if (ksum[ti].empty()) {
            ksum[ti].resize(hd);
            vsum[ti].resize(hd);
            kernels::LoadKv(kp(t, h), 1, hd, shape.type, ksum[ti].data());
            kernels::LoadKv(vp(t, h), 1, hd, shape.type, vsum[ti].data());
            for (int d = 0; d < hd; ++d) {
              ksum[ti][d] *= w[t];
              vsum[ti][d] *= w[t];
            }
            wsum[ti] = w[t];
          }
          kernels::LoadKv(kp(e, h), 1, hd, shape.type, a.data());
          kernels::LoadKv(vp(e, h), 1, hd, shape.type, b.data());
          for (int d = 0; d < hd; ++d) {
            ksum[ti][d] += w[e] * a[d];
            vsum[ti][d] += w[e] * b[d];
          }
          wsum[ti] += w[e];
        }
      }
      // Move kept slots down in increasing order (destination <= source, so in place).
      for (int64_t i = 0; i < m; ++i) {
        const int64_t src = keep[i];
        if (src != i) {
          std::memmove(kp(i, h), kp(src, h), hb);
          std::memmove(vp(i, h), vp(src, h), hb);
          w[i] = w[src];
          if (with_stats) {
            stats->WinSum(l, h)[i] = stats->WinSum(l, h)[src];
            stats->WinSq(l, h)[i] = stats->WinSq(l, h)[src];
            stats->Cum(l, h)[i] = stats->Cum(l, h)[src];
          }
          if (plan.reassign_positions) {
            // Slot src held position src; its key moves to position i (rotated below).
            moved.push_back(i);
            shift.push_back(static_cast<int32_t>(i - src));
          }
        }
      }
      for (int64_t ti = 0; ti < static_cast<int64_t>(ksum.size()); ++ti) {
        if (ksum[ti].empty()) continue;
        for (int d = 0; d < hd; ++d) {
          ksum[ti][d] /= wsum[ti];
          vsum[ti][d] /= wsum[ti];
        }
        kernels::StoreKv(ksum[ti].data(), 1, hd, shape.type, kp(ti, h));
        kernels::StoreKv(vsum[ti].data(), 1, hd, shape.type, vp(ti, h));
        w[ti] = wsum[ti];
      }
      if (!moved.empty()) {
        // One Rope call over every moved key of the head: it computes a shift's angles once
        // for a run of keys with that shift (StreamingLLM moves them all by the same one), not
        // once per key, and gives each key the bits a call of its own would.
        rotated.resize(moved.size() * hd);
        for (size_t j = 0; j < moved.size(); ++j) {
          kernels::LoadKv(kp(moved[j], h), 1, hd, shape.type, rotated.data() + j * hd);
        }
        kernels::Rope(rotated.data(), static_cast<int64_t>(moved.size()), 1, shift.data(), rope);
        for (size_t j = 0; j < moved.size(); ++j) {
          kernels::StoreKv(rotated.data() + j * hd, 1, hd, shape.type, kp(moved[j], h));
        }
        moved.clear();
        shift.clear();
      }
      if (with_stats) {
        std::fill(stats->WinSum(l, h) + m, stats->WinSum(l, h) + stats->capacity, 0.0f);
        std::fill(stats->WinSq(l, h) + m, stats->WinSq(l, h) + stats->capacity, 0.0f);
        std::fill(stats->Cum(l, h) + m, stats->Cum(l, h) + stats->capacity, 0.0f);
      }
    }
    layer_n[l] = m;
  }
  return Status::Ok();
}

}  // namespace cachette
