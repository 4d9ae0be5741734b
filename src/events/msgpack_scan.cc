#include "events/msgpack_scan.h"

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace cachette::events {

namespace {

// What one msgpack type byte says follows it.
struct Header {
  const char* kind = "";          // for messages: "array", "str", ...
  bool valid = true;              // false for 0xc1, the one byte msgpack never uses
  int length_bytes = 0;           // a big-endian count or length follows the type byte
  uint64_t count = 0;             // the count or length carried in the type byte itself (fix*)
  uint64_t fixed_body = 0;        // body bytes known from the type byte (ints, floats, fixext...)
  uint64_t values_per_count = 0;  // containers: values per counted entry (1 array, 2 map)
  uint64_t bytes_per_count = 0;   // str, bin, ext: body bytes per unit of length (1)
};

Header Scalar(const char* kind, uint64_t body) { return {kind, true, 0, 0, body, 0, 0}; }
Header Container(const char* kind, int length_bytes, uint64_t count, uint64_t per_count) {
  return {kind, true, length_bytes, count, 0, per_count, 0};
}
// `extra` counts the ext type byte, which precedes ext data.
Header Blob(const char* kind, int length_bytes, uint64_t count, uint64_t extra = 0) {
  return {kind, true, length_bytes, count, extra, 0, 1};
}

Header Classify(uint8_t type) {
  if (type <= 0x7f || type >= 0xe0) return Scalar("int", 0);  // positive / negative fixint
  if (type <= 0x8f) return Container("map", 0, type & 0x0f, 2);
  if (type <= 0x9f) return Container("array", 0, type & 0x0f, 1);
  if (type <= 0xbf) return Blob("str", 0, type & 0x1f);
  // clang-format off
  switch (type) {
    case 0xc0: return Scalar("nil", 0);
    case 0xc2: case 0xc3: return Scalar("bool", 0);
    case 0xc4: return Blob("bin", 1, 0);
    case 0xc5: return Blob("bin", 2, 0);
    case 0xc6: return Blob("bin", 4, 0);
    case 0xc7: return Blob("ext", 1, 0, 1);
    case 0xc8: return Blob("ext", 2, 0, 1);
    case 0xc9: return Blob("ext", 4, 0, 1);
    case 0xca: return Scalar("float32", 4);
    case 0xcb: return Scalar("float64", 8);
    case 0xcc: case 0xd0: return Scalar("int", 1);
    case 0xcd: case 0xd1: return Scalar("int", 2);
    case 0xce: case 0xd2: return Scalar("int", 4);
    case 0xcf: case 0xd3: return Scalar("int", 8);
    case 0xd4: return Scalar("ext", 1 + 1);  // fixext: the ext type byte, then the data
    case 0xd5: return Scalar("ext", 1 + 2);
    case 0xd6: return Scalar("ext", 1 + 4);
    case 0xd7: return Scalar("ext", 1 + 8);
    case 0xd8: return Scalar("ext", 1 + 16);
    case 0xd9: return Blob("str", 1, 0);
    case 0xda: return Blob("str", 2, 0);
    case 0xdb: return Blob("str", 4, 0);
    case 0xdc: return Container("array", 2, 0, 1);
    case 0xdd: return Container("array", 4, 0, 1);
    case 0xde: return Container("map", 2, 0, 2);
    case 0xdf: return Container("map", 4, 0, 2);
    default:
      break;
  }
  // clang-format on
  Header invalid;
  invalid.valid = false;
  return invalid;
}

Status Bad(std::string message) { return Corruption(std::move(message)); }

}  // namespace

Status ScanMsgpackValue(std::string_view bytes, int max_depth) {
  const auto* p = reinterpret_cast<const uint8_t*>(bytes.data());
  const uint64_t size = bytes.size();
  uint64_t pos = 0;
  // Values still to read in each open container, innermost last; the bottom entry is the one
  // top-level value. `pending` is their sum: every one of them needs at least one more byte.
  std::vector<uint64_t> open = {1};
  uint64_t pending = 1;
  while (!open.empty()) {
    if (open.back() == 0) {
      open.pop_back();
      continue;
    }
    --open.back();
    --pending;
    const uint64_t at = pos;
    if (pos >= size) return Bad("truncated: a value is missing at byte " + std::to_string(pos));
    const uint8_t type = p[pos++];
    const Header h = Classify(type);
    if (!h.valid) {
      char hex[8];
      snprintf(hex, sizeof(hex), "0x%02x", type);
      return Bad("byte " + std::string(hex) + " at byte " + std::to_string(at) +
                 " is not a msgpack type");
    }
    uint64_t count = h.count;
    if (h.length_bytes > 0) {
      if (size - pos < static_cast<uint64_t>(h.length_bytes)) {
        return Bad("truncated: the length of the " + std::string(h.kind) + " at byte " +
                   std::to_string(at) + " is cut off");
      }
      count = 0;
      for (int i = 0; i < h.length_bytes; ++i) count = (count << 8) | p[pos++];
    }
    if (h.values_per_count > 0) {
      // count < 2^32 and pending <= size: no overflow.
      const uint64_t values = count * h.values_per_count;
      if (values + pending > size - pos) {
        return Bad(std::string(h.kind) + " of " + std::to_string(count) + " elements at byte " +
                   std::to_string(at) + " cannot fit in the " + std::to_string(size - pos) +
                   " bytes left");
      }
      if (values == 0) continue;
      if (static_cast<int>(open.size()) > max_depth) {
        return Bad("nested deeper than " + std::to_string(max_depth) + " containers at byte " +
                   std::to_string(at));
      }
      open.push_back(values);
      pending += values;
      continue;
    }
    const uint64_t body = h.fixed_body + count * h.bytes_per_count;
    if (size - pos < body) {
      return Bad("truncated: the " + std::string(h.kind) + " at byte " + std::to_string(at) +
                 " needs " + std::to_string(body) + " bytes, only " + std::to_string(size - pos) +
                 " left");
    }
    pos += body;
  }
  if (pos != size) {
    return Bad(std::to_string(size - pos) + " trailing bytes after the value (which ends at byte " +
               std::to_string(pos) + ")");
  }
  return Status::Ok();
}

}  // namespace cachette::events
