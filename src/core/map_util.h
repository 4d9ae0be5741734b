// Small helpers over associative containers.
#pragma once

#include <algorithm>

namespace cachette {

// Erases the entry of `m` (key -> struct) whose `field` is the smallest: the least recently used
// one when `field` is a last-use time or counter. Linear; for bounded maps that drop one entry
// when a new one would pass their cap. No-op on an empty map.
template <typename Map, typename Field>
void EraseSmallest(Map& m, Field Map::mapped_type::*field) {
  auto it = std::min_element(m.begin(), m.end(), [field](const auto& a, const auto& b) {
    return a.second.*field < b.second.*field;
  });
  if (it != m.end()) m.erase(it);
}

}  // namespace cachette
