// A bounds check over raw msgpack bytes, run before msgpack-c parses them.
//
// Why: msgpack-c's unpacker allocates an array's or a map's element slots (24 or 48 bytes each)
// as soon as it reads the container's header, from the count the header declares. Five bytes
// (0xdd ff ff ff ff) would make it ask for ~96 GiB. This walk reads only headers and lengths,
// allocates nothing, and refuses any input where a declared count or length cannot fit in the
// bytes that are left (every element takes at least one byte), so what msgpack-c allocates
// afterwards is bounded by a small multiple of the input size.
#pragma once

#include <string_view>

#include "cachette/status.h"

namespace cachette::events {

// OK when `bytes` holds exactly one msgpack value, nested at most `max_depth` containers deep,
// whose every declared count and length fits in the input. Otherwise kCorruption naming the
// problem and its byte offset: "truncated: the str at byte 12 needs 40 bytes, only 3 left",
// "array of 4294967295 elements at byte 1 cannot fit in the 9 bytes left", "3 trailing bytes
// after the value (which ends at byte 20)", "byte 0xc1 at byte 7 is not a msgpack type",
// "nested deeper than 8 containers at byte 9". Pure function; safe to call concurrently.
Status ScanMsgpackValue(std::string_view bytes, int max_depth);

}  // namespace cachette::events
