#include "events/block_mirror.h"

#include <algorithm>
#include <map>

#include "core/check.h"
#include "events/kv_event_codec.h"

namespace cachette::events {

void KvBlockMirror::Apply(const KvEvent& event) {
  if (event.kind == KvEvent::Kind::kAllCleared) {  // every medium, whatever event.medium says
    Clear();
    return;
  }
  CT_CHECK(static_cast<size_t>(event.medium) < kKvMediums)
      << "KvEvent with medium " << static_cast<int>(event.medium);
  auto& blocks = blocks_[static_cast<size_t>(event.medium)];
  switch (event.kind) {
    case KvEvent::Kind::kStored:
      for (uint64_t hash : event.block_hashes) {
        auto it = blocks.find(hash);
        if (it != blocks.end()) {
          it->second = event.block_size;
        } else if (size_ >= max_blocks_) {
          ++truncated_;
        } else {
          blocks.emplace(hash, event.block_size);
          ++size_;
        }
      }
      return;
    case KvEvent::Kind::kRemoved:
      for (uint64_t hash : event.block_hashes) size_ -= blocks.erase(hash);
      return;
    case KvEvent::Kind::kAllCleared:
      return;  // handled above
  }
}

void KvBlockMirror::Clear() {
  for (auto& blocks : blocks_) blocks.clear();
  size_ = 0;
}

std::vector<KvEvent> KvBlockMirror::SnapshotEvents() const {
  std::vector<KvEvent> events(1);
  events[0].kind = KvEvent::Kind::kAllCleared;
  for (int m = 0; m < kKvMediums; ++m) {
    // block_size -> index of the event now collecting hashes of that size
    std::map<int32_t, size_t> open;
    for (const auto& [hash, block_size] : blocks_[m]) {
      auto it = open.find(block_size);
      if (it == open.end() || events[it->second].block_hashes.size() >= kMaxEventBlocks) {
        KvEvent e;
        e.kind = KvEvent::Kind::kStored;
        e.medium = static_cast<KvMedium>(m);
        e.block_size = block_size;
        events.push_back(std::move(e));
        it = open.insert_or_assign(block_size, events.size() - 1).first;
      }
      events[it->second].block_hashes.push_back(hash);
    }
  }
  return events;
}

bool KvBlockMirror::Contains(KvMedium medium, uint64_t hash) const {
  return blocks_[static_cast<size_t>(medium)].count(hash) > 0;
}

std::vector<KvBlockRef> KvBlockMirror::Blocks() const {
  std::vector<KvBlockRef> out;
  out.reserve(size_);
  for (int m = 0; m < kKvMediums; ++m) {
    for (const auto& [hash, block_size] : blocks_[m]) {
      out.push_back({static_cast<KvMedium>(m), hash, block_size});
    }
  }
  return out;
}

}  // namespace cachette::events
