// Feeds arbitrary bytes to the session record parser (docs/formats/session.md). Whatever it
// accepts must re-encode to the same bytes (one encoding per record).
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "cache/session_journal.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace cachette::cache;
  const cachette::ByteSpan bytes(reinterpret_cast<const std::byte*>(data), size);
  auto r = DecodeSessionRecord(bytes);
  if (!r.ok()) return 0;
  const std::vector<std::byte> again = EncodeSessionRecord(*r);
  if (again.size() != size || std::memcmp(again.data(), data, size) != 0) {
    __builtin_trap();  // accepted but not canonical: the parser and writer disagree
  }
  return 0;
}
