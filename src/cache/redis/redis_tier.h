// The Redis tier: chunk records in Redis or Redis Cluster, shared by every cachette instance
// that points at the same servers.
//
// Keys, layout version 2 (prefix default "ct:"; <ns> and <chunk> are 32 hex digits each,
// Hash128::ToHex() of the namespace and of the ChunkKey):
//   <prefix><ns>:{<chunk>}        the head
//   <prefix><ns>:{<chunk>}:<n>    part n (0-based), only for records above split_bytes
// The braces are a cluster hash tag over the chunk key alone, so a record's head and parts
// share one slot (one node, one pipeline, one MULTI/EXEC) while a namespace spreads over all.
// The namespace in front makes a namespace findable without any index: ClearNamespace runs
// SCAN MATCH <prefix><ns>:{* on every master (standalone: the one server) and deletes what it
// finds, whichever process wrote it. The Tier methods without a namespace use the zero one.
//
// Head value (docs/formats/redis-record.md; parsed by redis_record.h, which trusts no length):
//   magic "CTRH", u16 version = 2, u16 flags = 0, u32 n_parts, u32 part_bytes,
//   u64 total_bytes, u64 XXH3-64 of the record, then the record itself when n_parts == 0.
// A reader checks the head against its limits (max_record_bytes, split_bytes) before it names a
// part key or allocates, then every part length, the total and the checksum, so a missing,
// short, expired, mixed-up (two writers of one key) or hostile value is a miss, never partial
// data and never an allocation of what the value claims.
//
// Publication: a Put sends its parts and then its head inside one MULTI/EXEC (legal in a
// cluster because all keys share the slot), so readers see the old record or the new one.
// While its slot is being imported (after ASK) MULTI is refused for new keys, so the parts and
// then the head go as an ordered pipeline: a reader still never finds a head before its parts.
// Every key of a record gets the same TTL (SET ... EX).
//
// Failures: a refused connection, a dead node or a node in reconnect backoff is kUnavailable;
// a timeout or a passed deadline is kDeadlineExceeded. Both are counted (TierStats::errors,
// deadline_misses) and never block past the deadline / the configured timeouts.
// Thread-safety: every method may be called concurrently.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <vector>

#include "cache/redis/redis_conn.h"
#include "cache/redis/redis_record.h"
#include "cache/tier.h"

namespace cachette::cache {

struct RedisTierOptions {
  // "redis://host:port" (standalone), or "redis+cluster://host:port" seeds (cluster). Several
  // URLs also mean cluster mode: they are seeds for CLUSTER SLOTS.
  std::vector<std::string> urls = {"redis://127.0.0.1:6379"};
  int connect_timeout_ms = 200;
  int command_timeout_ms = 1000;  // per socket read/write; Get's Deadline can only shorten it
  uint64_t split_bytes = 1 << 20;  // records above this are stored as parts of this size
  // Largest record Put stores and Get believes a head about; above it a head is corrupt. Also
  // bounds the part count a head may claim (ceil(max_record_bytes / split_bytes)).
  uint64_t max_record_bytes = uint64_t{256} << 20;
  uint32_t default_ttl_seconds = 0;  // used when Put's ttl is 0; 0 = no expiry
  std::string key_prefix = "ct:";  // must not contain '{' or '}' (the hash tag is ours)
  int max_connections_per_node = 8;
  int backoff_initial_ms = 20;
  int backoff_max_ms = 1000;
  int max_redirects = 5;
};

// Counters beyond TierStats, for tests and /metrics.
struct RedisTierStats {
  uint64_t moved = 0, ask = 0, slot_refreshes = 0;
  uint64_t connects = 0, connect_failures = 0, timeouts = 0;
};

class RedisTier final : public Tier {
 public:
  // Connects to the first reachable URL (and, in cluster mode, loads the slot map). Errors:
  // kInvalidArgument for a malformed URL or option; kUnavailable / kDeadlineExceeded when no
  // server answers.
  static Result<std::unique_ptr<RedisTier>> Open(const RedisTierOptions& options);
  ~RedisTier() override;

  std::string_view name() const override { return "redis"; }

  // ttl_seconds = 0 means options.default_ttl_seconds. Errors: kUnavailable,
  // kDeadlineExceeded, kIOError (a server error reply, e.g. OOM under maxmemory).
  Status Put(const ChunkKey& key, std::span<const std::byte> record,
             uint32_t ttl_seconds = 0) override;
  // kNotFound on a miss, including an incomplete or inconsistent record (also counted in
  // errors / corruptions).
  Result<std::vector<std::byte>> Get(const ChunkKey& key, Deadline deadline) override;
  // One pipeline per node.
  std::vector<bool> ContainsMany(std::span<const ChunkKey> keys, Deadline deadline) override;
  Status Erase(const ChunkKey& key) override;

  // The same in namespace `ns` (the forms above use the zero namespace). Same errors.
  Status PutIn(const Hash128& ns, const ChunkKey& key, std::span<const std::byte> record,
               uint32_t ttl_seconds) override;
  Result<std::vector<std::byte>> GetIn(const Hash128& ns, const ChunkKey& key,
                                       Deadline deadline) override;
  std::vector<bool> ContainsManyIn(const Hash128& ns, std::span<const ChunkKey> keys,
                                   Deadline deadline) override;
  Status EraseIn(const Hash128& ns, const ChunkKey& key) override;
  // Deletes every key of `ns` on every master (SCAN MATCH, then UNLINK), including records
  // other processes wrote. A record being written while it runs may survive. Errors:
  // kUnavailable / kDeadlineExceeded when a master does not answer (the others are still
  // cleared); kIOError for an error reply.
  Status ClearNamespace(const Hash128& ns) override;
  // entries / bytes_used stay 0: the server owns them (and maxmemory is its capacity).
  // bytes_in counts record bytes stored, bytes_out record bytes returned by Get.
  TierStats Stats() const override;

  RedisTierStats RedisStats() const;
  bool cluster_mode() const { return cluster_; }

  // The key names of a record (see the header comment); without `ns`, the zero namespace.
  std::string HeadKey(const Hash128& ns, const ChunkKey& key) const;
  std::string PartKey(const Hash128& ns, const ChunkKey& key, uint32_t part) const;
  std::string HeadKey(const ChunkKey& key) const { return HeadKey(Hash128{}, key); }
  std::string PartKey(const ChunkKey& key, uint32_t part) const {
    return PartKey(Hash128{}, key, part);
  }
  // The SCAN MATCH pattern of every key of `ns` (glob characters of the prefix escaped).
  std::string NamespacePattern(const Hash128& ns) const;

  // Test hook: route every slot to the node at `address` ("host:port"), as a stale slot map
  // would after a resharding; the next MOVED must repair it.
  void TestOnlyRouteAllSlotsTo(const std::string& address);

 private:
  RedisTier(const RedisTierOptions& options, bool cluster);

  redis::Node* NodeFor(const std::string& address);
  redis::Node* NodeForSlot(int slot);
  Status RefreshSlots(redis::Node* preferred);
  // Runs `commands` on the owner of `slot`, following MOVED (with a slot map refresh), ASK and
  // TRYAGAIN. `transaction` wraps them in MULTI/EXEC and the result is EXEC's one reply,
  // except on an importing node after ASK, where they run as an ordered pipeline and the
  // result has one reply per command.
  Result<std::vector<redis::ReplyPtr>> Execute(int slot,
                                               const std::vector<redis::Command>& commands,
                                               bool transaction, Deadline deadline);
  Status CountFailure(const Status& s);
  // Every master node the slot map names (standalone: the one server).
  std::vector<redis::Node*> Masters();

  const RedisTierOptions options_;
  const RedisRecordLimits limits_;
  const bool cluster_;
  std::vector<std::pair<std::string, int>> seeds_;

  mutable std::shared_mutex topology_mu_;
  // Nodes are created on first sight and never destroyed before the tier, so a Node* taken
  // under the lock stays valid after it is released.
  std::vector<std::unique_ptr<redis::Node>> nodes_;  // GUARDED_BY(topology_mu_)
  std::array<redis::Node*, redis::kClusterSlots> slots_{};  // GUARDED_BY(topology_mu_)

  struct Counters {
    std::atomic<uint64_t> gets{0}, hits{0}, misses{0}, puts{0}, bytes_in{0}, bytes_out{0};
    std::atomic<uint64_t> errors{0}, deadline_misses{0}, corruptions{0};
    std::atomic<uint64_t> moved{0}, ask{0}, slot_refreshes{0};
  };
  mutable Counters counters_;
};

}  // namespace cachette::cache
