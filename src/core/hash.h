// Deterministic hashing (no per-process seeds): the same bytes hash the same on every machine.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "cachette/types.h"

namespace cachette {

struct Hash128 {
  uint64_t lo = 0, hi = 0;
  auto operator<=>(const Hash128&) const = default;
  std::string ToHex() const;  // 32 lowercase hex digits, hi then lo
};

// Parses exactly 16 lowercase hex digits (as "%016llx" writes a value) into *value. False for
// any other text, *value then unchanged.
bool ParseHex64(std::string_view hex, uint64_t* value);

uint64_t Hash64(ByteSpan bytes, uint64_t seed = 0);
Hash128 Hash128Of(ByteSpan bytes, uint64_t seed = 0);

// Incremental XXH3-128 over several pieces.
class Hasher128 {
 public:
  Hasher128();
  ~Hasher128();
  Hasher128(const Hasher128&) = delete;
  Hasher128& operator=(const Hasher128&) = delete;
  void Update(ByteSpan bytes);
  void Update(const void* data, size_t size) {
    Update(ByteSpan(static_cast<const std::byte*>(data), size));
  }
  Hash128 Digest() const;

 private:
  void* state_;  // XXH3_state_t*
};

}  // namespace cachette
