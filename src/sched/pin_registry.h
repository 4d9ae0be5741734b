// Named pins on cached prefixes: the pins taken by `cache_control`, by the admin API and by
// sessions, each a KvManager::Pin handle kept here until it is removed or its TTL passes.
// One pin model: a pin protects the prefix's pages in the page pool AND its chunks in every
// tier of the PrefixSource (RAM and disk of the chunk store); removal and expiry release both.
//
// Bounds (Limits): TTLs are cut to max_ttl_ms; at most max_pins plain pins (more are refused)
// and max_sessions sessions (a new one replaces the session that expires first); pinned pages
// never exceed max_pinned_fraction of the pool (of each pool, with --session-kv-type): a pin
// that would pass it is refused (the prefix stays cached, just not protected). A refused pin
// has id 0 and a non-OK status.
//
// A session (session_id) holds at most one pin: each turn pins the whole conversation so far
// (prompt + reply) and then drops the previous turn's pin, so the shared prefix is never
// unpinned in between. Expiry only unpins (the radix index stops protecting the path when the
// TTL passes; Sweep() then drops the handle). Demotion of an expired session to the disk
// tier happens through the chunk store: a session's chunks are written behind when its turn
// finishes, so an expired session is restored from RAM or disk on its next turn.
//
// Sessions outlive the process when a journal is attached (AttachJournal; the server does so
// when it has a disk tier): every session pin taken is written to the journal (digest,
// namespace, the conversation's tokens, expiry) and every session that ends (removed, expired,
// replaced past the cap, its tenant cleared) is erased from it; shutting down erases nothing.
// At start-up the journal's live sessions are registered again with only their chunk-store
// pin (their pages went with the old process) for the TTL they had left, so their chunks are
// not evicted before the next turn restores them; that turn's SetSession, found by the
// session id's digest, replaces the restored entry as usual. Internal keys (those starting
// with '\x01', the scheduler's program pins) are never journaled.
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

#include "cache/session_journal.h"
#include "cachette/status.h"
#include "kv/kv_manager.h"

namespace cachette::sched {

class PrefixSource;

struct PinLimits {
  double max_pinned_fraction = 0.5;
  int64_t max_ttl_ms = 3600000;
  size_t max_sessions = 10000;
  size_t max_pins = 10000;
};

class PinRegistry {
 public:
  using ClockMs = std::function<int64_t()>;  // monotonic milliseconds
  using Limits = PinLimits;
  // The page pool that holds a namespace's pages (a server with --session-kv-type has two).
  using PoolFn = std::function<KvManager&(const Hash128& ns)>;
  // `source` (may be null) receives the tier side of every pin; it must outlive the registry.
  explicit PinRegistry(KvManager& kv, Limits limits = {}, ClockMs clock = nullptr,
                       PrefixSource* source = nullptr);
  // Pins in the pool `pools` names per namespace; max_pinned_fraction is of that pool.
  explicit PinRegistry(PoolFn pools, Limits limits = {}, ClockMs clock = nullptr,
                       PrefixSource* source = nullptr);

  struct Info {
    uint64_t id = 0;
    std::string session;     // the session key; empty for plain pins and restored sessions
    uint64_t digest = 0;     // sessions: cache::SessionDigest64 of the key; 0 for plain pins
    bool restored = false;   // registered from the journal at start-up, no turn since
    std::string cache_salt;  // the tenant the pin belongs to (never shown: print ns)
    Hash128 ns;              // the namespace the pin holds pages in
    int64_t tokens = 0;      // tokens of the prefix actually cached and pinned
    int64_t expires_at_ms = 0;
    Status status;           // why nothing was pinned, when id == 0 (kResourceExhausted: a cap)
  };

  // Pins the cached part of `tokens` in `ns` for ttl_ms (> 0). Returns the pin's info (id 0 and
  // tokens 0 when nothing of it is cached: nothing is then held). `pool`: the pool holding the
  // pages, when the caller knows it (a request's own); null: the one the PoolFn names.
  Info Add(const Hash128& ns, const std::string& cache_salt, std::span<const TokenId> tokens,
           int64_t ttl_ms, KvManager* pool = nullptr);
  // Replaces the pin of `session` by one on `tokens` (the new one is taken first).
  Info SetSession(const std::string& session, const Hash128& ns, const std::string& cache_salt,
                  std::span<const TokenId> tokens, int64_t ttl_ms, KvManager* pool = nullptr);

  // false when no such pin (or session) is held.
  bool Remove(uint64_t id);
  bool RemoveSession(const std::string& session);
  // Drops every pin of tenant `cache_salt`, and the restored sessions of its namespace `ns`
  // (their salt is not known); returns how many.
  size_t RemoveTenant(const std::string& cache_salt, const Hash128& ns);

  struct RestoreReport {
    size_t sessions = 0;  // registered again
    size_t expired = 0;   // past their TTL (their records are erased)
    size_t dropped = 0;   // beyond max_sessions (erased)
    int64_t tokens = 0;   // tokens of the sessions registered
  };
  // Journals sessions in `journal` from now on (it must outlive the registry; null detaches),
  // after registering the live sessions of `found` (what journal->Scan() returned) as
  // described above. `now_unix_ms` is the wall clock (records keep wall-clock expiry).
  RestoreReport AttachJournal(cache::SessionJournal* journal,
                              const std::vector<cache::SessionRecord>& found,
                              int64_t now_unix_ms);
  // The namespaces of the sessions restored and not yet resumed (ClearAll reaches them).
  std::vector<Hash128> RestoredNamespaces();

  // Drops the handles whose TTL has passed. Returns how many.
  size_t Sweep();

  std::vector<Info> List();
  size_t sessions();

 private:
  struct Entry {
    Info info;
    KvManager::Pin pin;
    uint64_t source_pin = 0;  // the chunk store's pin, 0 = none
  };
  // What a removed entry still holds; released outside the lock (the store has its own).
  struct Released {
    std::vector<KvManager::Pin> pins;
    std::vector<uint64_t> source_pins;
    std::vector<uint64_t> journaled;  // digests of the journaled sessions that ended
  };
  int64_t Now() const { return clock_(); }
  // Add; a session's pin does not count against max_pins (sessions have their own cap).
  Info AddPin(KvManager* pool, const Hash128& ns, const std::string& cache_salt,
              std::span<const TokenId> tokens, int64_t ttl_ms, bool session);
  // Takes entry `it` out of the maps into `out`. REQUIRES(mu_).
  std::map<uint64_t, Entry>::iterator Take(std::map<uint64_t, Entry>::iterator it,
                                           Released* out);
  void Release(Released& r);

  PoolFn pools_;
  Limits limits_;
  ClockMs clock_;
  PrefixSource* source_;
  cache::SessionJournal* journal_ = nullptr;  // set once, before serving (AttachJournal)
  std::mutex mu_;
  uint64_t next_id_ = 1;                            // GUARDED_BY(mu_)
  std::map<uint64_t, Entry> pins_;                  // GUARDED_BY(mu_)
  std::map<uint64_t, uint64_t> session_to_pin_;     // GUARDED_BY(mu_): digest -> pin id
};

}  // namespace cachette::sched
