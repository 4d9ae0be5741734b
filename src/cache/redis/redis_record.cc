#include "cache/redis/redis_record.h"

#include <algorithm>
#include <cstring>

#include "core/hash.h"

namespace cachette::cache {
namespace {

constexpr char kHeadMagic[4] = {'C', 'T', 'R', 'H'};

template <typename T>
void PutLe(char* p, T v) {
  for (size_t i = 0; i < sizeof(T); ++i) p[i] = static_cast<char>((v >> (8 * i)) & 0xff);
}
template <typename T>
T GetLe(const std::byte* p) {
  T v = 0;
  for (size_t i = 0; i < sizeof(T); ++i) v |= T(static_cast<uint8_t>(p[i])) << (8 * i);
  return v;
}

}  // namespace

RedisRecordLimits RedisLimitsFor(uint64_t max_record_bytes, uint64_t split_bytes) {
  RedisRecordLimits l;
  l.max_record_bytes = max_record_bytes;
  l.max_part_bytes = std::min(kRedisMaxPartBytes, std::max<uint64_t>(split_bytes, 1));
  const uint64_t parts = split_bytes == 0 ? 1 : (max_record_bytes + split_bytes - 1) / split_bytes;
  l.max_parts = static_cast<uint32_t>(std::clamp<uint64_t>(parts, 1, UINT32_MAX));
  return l;
}

uint64_t RedisHead::PartLength(uint32_t i) const {
  const uint64_t offset = uint64_t{i} * part_bytes;
  return offset >= total_bytes ? 0 : std::min<uint64_t>(part_bytes, total_bytes - offset);
}

std::string EncodeRedisHead(ByteSpan record, uint64_t split_bytes, RedisHead* head) {
  RedisHead h;
  h.total_bytes = record.size();
  h.checksum = Hash64(record);
  if (record.size() > split_bytes) {
    h.part_bytes = static_cast<uint32_t>(split_bytes);
    h.n_parts = static_cast<uint32_t>((record.size() + split_bytes - 1) / split_bytes);
  }
  std::string out(kRedisHeadBytes, '\0');
  std::memcpy(out.data(), kHeadMagic, 4);
  PutLe<uint16_t>(out.data() + 4, kRedisHeadVersion);
  PutLe<uint16_t>(out.data() + 6, 0);
  PutLe<uint32_t>(out.data() + 8, h.n_parts);
  PutLe<uint32_t>(out.data() + 12, h.part_bytes);
  PutLe<uint64_t>(out.data() + 16, h.total_bytes);
  PutLe<uint64_t>(out.data() + 24, h.checksum);
  if (h.n_parts == 0) out.append(reinterpret_cast<const char*>(record.data()), record.size());
  if (head != nullptr) *head = h;
  return out;
}

Result<RedisHead> ParseRedisHead(ByteSpan value, const RedisRecordLimits& limits) {
  if (value.size() < kRedisHeadBytes) {
    return Corruption("redis head: " + std::to_string(value.size()) + " bytes, need " +
                      std::to_string(kRedisHeadBytes));
  }
  const std::byte* p = value.data();
  if (std::memcmp(p, kHeadMagic, 4) != 0) return Corruption("redis head: bad magic");
  const uint16_t version = GetLe<uint16_t>(p + 4);
  if (version != kRedisHeadVersion) {
    return NotFound("redis head: version " + std::to_string(version) + ", this reader knows " +
                    std::to_string(kRedisHeadVersion));
  }
  if (const uint16_t flags = GetLe<uint16_t>(p + 6); flags != 0) {
    return NotFound("redis head: unknown flags " + std::to_string(flags));
  }
  RedisHead h;
  h.n_parts = GetLe<uint32_t>(p + 8);
  h.part_bytes = GetLe<uint32_t>(p + 12);
  h.total_bytes = GetLe<uint64_t>(p + 16);
  h.checksum = GetLe<uint64_t>(p + 24);
  if (h.total_bytes > limits.max_record_bytes) {
    return Corruption("redis head: total_bytes " + std::to_string(h.total_bytes) +
                      " above the limit " + std::to_string(limits.max_record_bytes));
  }
  const uint64_t trailing = value.size() - kRedisHeadBytes;
  if (h.n_parts == 0) {
    if (h.part_bytes != 0) return Corruption("redis head: part_bytes set on an inline record");
    if (trailing != h.total_bytes) {
      return Corruption("redis head: inline record of " + std::to_string(trailing) +
                        " bytes, head says " + std::to_string(h.total_bytes));
    }
    h.inline_record = value.subspan(kRedisHeadBytes);
    return h;
  }
  if (trailing != 0) return Corruption("redis head: bytes after a split record's head");
  if (h.part_bytes == 0 || h.part_bytes > limits.max_part_bytes) {
    return Corruption("redis head: part_bytes " + std::to_string(h.part_bytes) + " not in 1.." +
                      std::to_string(limits.max_part_bytes));
  }
  if (h.n_parts > limits.max_parts) {
    return Corruption("redis head: " + std::to_string(h.n_parts) + " parts, limit " +
                      std::to_string(limits.max_parts));
  }
  const uint64_t want_parts = (h.total_bytes + h.part_bytes - 1) / h.part_bytes;
  if (h.n_parts != want_parts) {
    return Corruption("redis head: " + std::to_string(h.n_parts) + " parts of " +
                      std::to_string(h.part_bytes) + " bytes cannot hold " +
                      std::to_string(h.total_bytes) + " bytes");
  }
  return h;
}

Result<std::vector<std::byte>> AssembleRedisRecord(const RedisHead& head,
                                                   std::span<const ByteSpan> parts) {
  if (head.n_parts == 0) {
    if (!parts.empty()) return Corruption("redis record: parts given for an inline record");
    if (head.inline_record.size() != head.total_bytes) {
      return Corruption("redis record: inline record length differs from the head");
    }
  } else {
    if (parts.size() != head.n_parts) {
      return Corruption("redis record: " + std::to_string(parts.size()) + " parts, head says " +
                        std::to_string(head.n_parts));
    }
    for (uint32_t i = 0; i < head.n_parts; ++i) {
      if (parts[i].size() != head.PartLength(i)) {
        return Corruption("redis record: part " + std::to_string(i) + " has " +
                          std::to_string(parts[i].size()) + " bytes, head says " +
                          std::to_string(head.PartLength(i)));
      }
    }
  }
  // Every length checked: total_bytes is what the values really hold.
  std::vector<std::byte> out;
  if (head.n_parts == 0) {
    out.assign(head.inline_record.begin(), head.inline_record.end());
  } else {
    out.resize(head.total_bytes);
    uint64_t offset = 0;
    for (const ByteSpan& part : parts) {
      if (!part.empty()) std::memcpy(out.data() + offset, part.data(), part.size());
      offset += part.size();
    }
  }
  if (Hash64(out) != head.checksum) return Corruption("redis record: checksum mismatch");
  return out;
}

}  // namespace cachette::cache
