// Small helpers over associative containers.
#pragma once

#include <algorithm>

namespace cachette {

// The entry of `m` (key -> struct) whose `field` is the smallest: the least recently used one
// when `field` is a last-use time or counter; m.end() for an empty map. Linear; for bounded
// maps that drop one entry when a new one would pass their cap.
template <typename Map, typename Field>
typename Map::iterator SmallestBy(Map& m, Field Map::mapped_type::*field) {
  return std::min_element(m.begin(), m.end(), [field](const auto& a, const auto& b) {
    return a.second.*field < b.second.*field;
  });
}

// Erases SmallestBy(m, field). No-op on an empty map.
template <typename Map, typename Field>
void EraseSmallest(Map& m, Field Map::mapped_type::*field) {
  auto it = SmallestBy(m, field);
  if (it != m.end()) m.erase(it);
}

}  // namespace cachette
