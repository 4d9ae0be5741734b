// Feeds arbitrary bytes to the KV event batch reader (docs/formats/kv-events.md).
//   1. The bounds check (events/msgpack_scan.h) agrees with msgpack-c: a value it passes,
//      msgpack-c parses whole. (What it refuses msgpack-c never sees: that is how a declared
//      count never becomes an allocation, which ASan's allocation limit would catch.)
//   2. DecodeBatch never crashes, and refuses only with kCorruption.
//   3. A batch it accepts re-encodes to bytes that decode to the same batch, and re-encoding
//      that gives the same bytes again.
#include <msgpack.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "events/kv_event_codec.h"
#include "events/msgpack_scan.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace cachette::events;
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);

  if (ScanMsgpackValue(bytes, kMaxBatchDepth).ok()) {
    msgpack_unpacked unpacked;
    msgpack_unpacked_init(&unpacked);
    size_t offset = 0;
    const msgpack_unpack_return r = msgpack_unpack_next(&unpacked, bytes.data(), size, &offset);
    msgpack_unpacked_destroy(&unpacked);
    if (r != MSGPACK_UNPACK_SUCCESS || offset != size) {
      __builtin_trap();  // the scan passed what msgpack-c cannot parse (or parses differently)
    }
  }

  cachette::Result<KvEventBatch> first = DecodeBatch(bytes);
  if (!first.ok()) {
    if (first.status().code() != cachette::StatusCode::kCorruption) __builtin_trap();
    return 0;
  }
  const std::string encoded = EncodeBatch(*first);
  cachette::Result<KvEventBatch> second = DecodeBatch(encoded);
  if (!second.ok()) __builtin_trap();                  // the writer wrote what its reader refuses
  if (!SameOnWire(*first, *second)) __builtin_trap();  // the round trip changed the batch
  if (EncodeBatch(*second) != encoded) __builtin_trap();
  return 0;
}
