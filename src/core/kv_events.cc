#include "core/kv_events.h"

namespace cachette {

std::string_view KvMediumName(KvMedium m) {
  switch (m) {
    case KvMedium::kMemory: return "memory";
    case KvMedium::kRam: return "ram";
    case KvMedium::kDisk: return "disk";
    case KvMedium::kRedis: return "redis";
  }
  return "memory";
}

}  // namespace cachette
