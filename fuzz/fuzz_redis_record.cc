// Feeds arbitrary bytes to the Redis record reader (docs/formats/redis-record.md): the first
// bytes are a head value, the rest is cut into the parts the head asks for. Whatever the head
// claims, the reader must neither crash nor allocate beyond the limits (ASan's allocation limit
// catches a trusted length), and a record it accepts must have exactly the head's length and
// re-encode to the same head.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cache/redis/redis_record.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace cachette::cache;
  if (size < 2) return 0;
  // Byte 0: how long the head value is; byte 1: the split size of the reader (1 KiB steps).
  const size_t head_len = std::min<size_t>(data[0], size - 2);
  const uint64_t split = (uint64_t{data[1]} + 1) << 10;
  const cachette::ByteSpan rest(reinterpret_cast<const std::byte*>(data + 2), size - 2);
  const RedisRecordLimits limits = RedisLimitsFor(uint64_t{4} << 20, split);
  auto head = ParseRedisHead(rest.first(head_len), limits);
  if (!head.ok()) return 0;
  if (head->n_parts > limits.max_parts || head->total_bytes > limits.max_record_bytes) {
    __builtin_trap();  // accepted past the limits
  }
  // The parts: the remaining bytes, cut at the lengths the head asks for (short when they run
  // out, so the length checks are exercised too).
  cachette::ByteSpan tail = rest.subspan(head_len);
  std::vector<cachette::ByteSpan> parts;
  for (uint32_t i = 0; i < head->n_parts; ++i) {
    const size_t n = std::min<uint64_t>(head->PartLength(i), tail.size());
    parts.push_back(tail.first(n));
    tail = tail.subspan(n);
  }
  auto record = AssembleRedisRecord(*head, parts);
  if (!record.ok()) return 0;
  if (record->size() != head->total_bytes) __builtin_trap();
  RedisHead again;
  const std::string value = EncodeRedisHead(*record, head->n_parts == 0 ? split : head->part_bytes,
                                            &again);
  if (again.checksum != head->checksum || again.total_bytes != head->total_bytes) {
    __builtin_trap();  // accepted a record whose checksum does not match it
  }
  return 0;
}
