// Vocabulary types shared by every module.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>

namespace cachette {

// Token ids are plain int32 (as in GGUF and llama.cpp): they flow through tokenizers, arrays
// and the wire in bulk. WART: not a strong type, unlike the ids below.
using TokenId = int32_t;

// A strongly typed integer id: StrongId<struct SeqTag> cannot be passed where
// StrongId<struct PageTag> is expected.
template <typename Tag, typename Rep = uint32_t>
struct StrongId {
  Rep value{};
  constexpr StrongId() = default;
  constexpr explicit StrongId(Rep v) : value(v) {}
  constexpr auto operator<=>(const StrongId&) const = default;
};

using SeqId = StrongId<struct SeqIdTag, uint64_t>;
using PageId = StrongId<struct PageIdTag, uint32_t>;
using TierId = StrongId<struct TierIdTag, uint8_t>;

using ByteSpan = std::span<const std::byte>;
using Nanos = std::chrono::nanoseconds;

}  // namespace cachette

template <typename Tag, typename Rep>
struct std::hash<cachette::StrongId<Tag, Rep>> {
  size_t operator()(const cachette::StrongId<Tag, Rep>& id) const noexcept {
    return std::hash<Rep>()(id.value);
  }
};
