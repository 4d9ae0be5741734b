// Feeds arbitrary bytes to the chunk record parser (docs/formats/chunk.md). Whatever it
// accepts must re-encode to the same bytes (the format has one encoding per record), and every
// byte of the payload view must be readable (ASan catches a view past the input).
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "cache/record.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace cachette::cache;
  const cachette::ByteSpan bytes(reinterpret_cast<const std::byte*>(data), size);
  // The header-only path, over a prefix as the disk tier's recovery reads it.
  const uint64_t need = RecordHeaderBytesNeeded(bytes);
  (void)DecodeRecordHeader(bytes.first(std::min<size_t>(size, need)), size);
  auto v = DecodeRecord(bytes);
  if (!v.ok()) return 0;
  volatile uint8_t sum = 0;  // volatile: the reads are not optimized away
  for (std::byte b : v->payload) sum = sum ^ static_cast<uint8_t>(b);
  auto again = EncodeRecord(v->header.meta, v->header.tokens, v->payload);
  if (!again.ok() || again->size() != size || std::memcmp(again->data(), data, size) != 0) {
    __builtin_trap();  // accepted but not canonical: the parser and writer disagree
  }
  return 0;
}
