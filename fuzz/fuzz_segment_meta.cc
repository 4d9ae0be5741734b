// Feeds arbitrary bytes to the segment metadata parser (sched/segment_tier.h: the aux bytes a
// segment's last chunk carries in the tiers). Whatever it accepts must re-encode to the same
// bytes (one encoding per metadata).
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "sched/segment_tier.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace cachette;
  const ByteSpan bytes(reinterpret_cast<const std::byte*>(data), size);
  auto m = sched::DecodeSegmentMeta(bytes);
  if (!m.ok()) return 0;
  SegmentKv seg;
  seg.tokens.resize(m->n_tokens);
  seg.base_pos = m->base_pos;
  seg.context = m->context;
  seg.cci = m->cci;
  seg.context_chunks = m->context_chunks;
  seg.inter = m->inter;
  const std::vector<std::byte> again = sched::EncodeSegmentMeta(seg);
  if (again.size() != size || std::memcmp(again.data(), data, size) != 0) {
    __builtin_trap();  // accepted but not canonical: the parser and writer disagree
  }
  return 0;
}
