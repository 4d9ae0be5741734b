// Little-endian integers in byte buffers: how every cachette file and record format writes its
// fields (docs/formats/). Byte by byte, so any alignment and any host byte order.
#pragma once

#include <cstddef>
#include <cstdint>

namespace cachette {

template <typename T>
inline void PutLe(std::byte* p, T v) {
  for (size_t i = 0; i < sizeof(T); ++i) p[i] = static_cast<std::byte>(v >> (8 * i));
}
template <typename T>
inline T GetLe(const std::byte* p) {
  T v = 0;
  for (size_t i = 0; i < sizeof(T); ++i) v |= static_cast<T>(std::to_integer<T>(p[i]) << (8 * i));
  return v;
}

inline void PutLe16(std::byte* p, uint16_t v) { PutLe(p, v); }
inline void PutLe32(std::byte* p, uint32_t v) { PutLe(p, v); }
inline void PutLe64(std::byte* p, uint64_t v) { PutLe(p, v); }
inline uint16_t GetLe16(const std::byte* p) { return GetLe<uint16_t>(p); }
inline uint32_t GetLe32(const std::byte* p) { return GetLe<uint32_t>(p); }
inline uint64_t GetLe64(const std::byte* p) { return GetLe<uint64_t>(p); }

}  // namespace cachette
