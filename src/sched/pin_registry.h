// Named pins on cached prefixes: the pins taken by `cache_control`, by the admin API and by
// sessions, each a KvManager::Pin handle kept here until it is removed or its TTL passes.
//
// A session (session_id) holds at most one pin: each turn pins the whole conversation so far
// (prompt + reply) and then drops the previous turn's pin, so the shared prefix is never
// unpinned in between. Expiry only unpins (the radix index stops protecting the path when the
// TTL passes; Sweep() then drops the handle). WART: demotion of an expired session to the disk
// tier belongs here once the tiered store is wired in.
//
// Thread-safety: all methods are safe to call concurrently (one mutex); KvManager is
// synchronized on its own.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "kv/kv_manager.h"

namespace cachette::sched {

class PinRegistry {
 public:
  using ClockMs = std::function<int64_t()>;  // monotonic milliseconds
  explicit PinRegistry(KvManager& kv, ClockMs clock = nullptr);

  struct Info {
    uint64_t id = 0;
    std::string session;     // empty for plain pins
    std::string cache_salt;  // the tenant the pin belongs to (never shown: print ns)
    Hash128 ns;              // the namespace the pin holds pages in
    int64_t tokens = 0;      // tokens of the prefix actually cached and pinned
    int64_t expires_at_ms = 0;
  };

  // Pins the cached part of `tokens` in `ns` for ttl_ms (> 0). Returns the pin's info (id 0 and
  // tokens 0 when nothing of it is cached: nothing is then held).
  Info Add(const Hash128& ns, const std::string& cache_salt, std::span<const TokenId> tokens,
           int64_t ttl_ms);
  // Replaces the pin of `session` by one on `tokens` (the new one is taken first).
  Info SetSession(const std::string& session, const Hash128& ns, const std::string& cache_salt,
                  std::span<const TokenId> tokens, int64_t ttl_ms);

  // false when no such pin (or session) is held.
  bool Remove(uint64_t id);
  bool RemoveSession(const std::string& session);
  // Drops every pin of tenant `cache_salt`; returns how many.
  size_t RemoveTenant(const std::string& cache_salt);

  // Drops the handles whose TTL has passed. Returns how many.
  size_t Sweep();

  std::vector<Info> List();
  size_t sessions();

 private:
  struct Entry {
    Info info;
    KvManager::Pin pin;
  };
  int64_t Now() const { return clock_(); }

  KvManager& kv_;
  ClockMs clock_;
  std::mutex mu_;
  uint64_t next_id_ = 1;                            // GUARDED_BY(mu_)
  std::map<uint64_t, Entry> pins_;                  // GUARDED_BY(mu_)
  std::map<std::string, uint64_t> session_to_pin_;  // GUARDED_BY(mu_)
};

}  // namespace cachette::sched
