// The bytes of a chunk record in Redis (docs/formats/redis-record.md): the head value and the
// assembly of split parts, as pure functions over bytes, so they are tested and fuzzed without
// a server. RedisTier does the I/O around them.
//
// Rule: nothing read from Redis is trusted. Every length in a head is checked against the
// reader's limits and against the other fields before anything is allocated or any part key is
// named, and a record is assembled only after every part had exactly the length the head says.
// A value that breaks a rule is kCorruption (or kNotFound for a version or flag this reader does
// not know), which RedisTier serves as a miss.
//
// Thread-safety: plain functions of their arguments.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "cachette/status.h"
#include "cachette/types.h"

namespace cachette::cache {

inline constexpr size_t kRedisHeadBytes = 32;
inline constexpr uint16_t kRedisHeadVersion = 2;
// Redis's default proto-max-bulk-len is 512 MiB: parts stay well below it.
inline constexpr uint64_t kRedisMaxPartBytes = uint64_t{256} << 20;

// What a reader accepts. RedisTier derives them from its options (RedisLimitsFor).
struct RedisRecordLimits {
  uint64_t max_record_bytes = uint64_t{256} << 20;  // total_bytes above this: corrupt
  uint64_t max_part_bytes = kRedisMaxPartBytes;     // part_bytes above this: corrupt
  uint32_t max_parts = 4096;                        // n_parts above this: corrupt
};

// The limits of a reader that writes records of at most `max_record_bytes` split into parts of
// `split_bytes`: at most ceil(max_record_bytes / split_bytes) parts (at least 1).
RedisRecordLimits RedisLimitsFor(uint64_t max_record_bytes, uint64_t split_bytes);

// A parsed head. `inline_record` points into the parsed value (n_parts == 0 only).
struct RedisHead {
  uint32_t n_parts = 0;     // 0: the record follows the head inline
  uint32_t part_bytes = 0;  // every part but the last holds exactly this many bytes
  uint64_t total_bytes = 0;
  uint64_t checksum = 0;    // XXH3-64 (core/hash.h Hash64) of the record
  ByteSpan inline_record;

  // The length part `i` (< n_parts) must have.
  uint64_t PartLength(uint32_t i) const;
};

// The head value of `record` split at `split_bytes` (0 < split_bytes <= kRedisMaxPartBytes):
// 32 bytes, followed by the record itself when it fits in one value (size <= split_bytes).
// `head` receives n_parts and part_bytes; the caller sends record bytes [i * part_bytes, ...)
// as part i.
std::string EncodeRedisHead(ByteSpan record, uint64_t split_bytes, RedisHead* head);

// Parses a head value. Checks, in order: at least 32 bytes; magic; version (kNotFound if not
// kRedisHeadVersion); flags (kNotFound if not 0); total_bytes <= max_record_bytes; then either
// inline (part_bytes == 0 and exactly total_bytes follow the head) or split (no bytes after the
// head, 0 < part_bytes <= max_part_bytes, n_parts <= max_parts, n_parts == ceil(total_bytes /
// part_bytes)). Anything else is kCorruption. Does not check the checksum (the parts are not
// read yet); allocates nothing.
Result<RedisHead> ParseRedisHead(ByteSpan value, const RedisRecordLimits& limits);

// The record of `head`: its inline bytes, or `parts` (head.n_parts of them) concatenated.
// kCorruption if the part count or any part's length differs from the head, or the checksum
// does not match. Allocates total_bytes only after every length checked out.
Result<std::vector<std::byte>> AssembleRedisRecord(const RedisHead& head,
                                                   std::span<const ByteSpan> parts);

}  // namespace cachette::cache
