#include "cache/redis/redis_tier.h"

#include <algorithm>
#include <charconv>
#include <cstring>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "core/hash.h"

namespace cachette::cache {
namespace {

using redis::Command;
using redis::Node;
using redis::Redirect;
using redis::ReplyPtr;

// Commands per SCAN page and per UNLINK pipeline in ClearNamespace.
constexpr int kScanCount = 1000;

ByteSpan AsBytes(const redisReply* r) {
  return ByteSpan(reinterpret_cast<const std::byte*>(r->str), r->len);
}

bool ParseUrl(std::string_view url, bool* cluster, std::string* host, int* port) {
  if (url.starts_with("redis+cluster://")) {
    *cluster = true;
    url.remove_prefix(16);
  } else if (url.starts_with("redis://")) {
    *cluster = false;
    url.remove_prefix(8);
  } else {
    return false;
  }
  while (!url.empty() && url.back() == '/') url.remove_suffix(1);
  size_t colon = url.rfind(':');
  *port = 6379;
  if (colon != std::string_view::npos) {
    std::string_view p = url.substr(colon + 1);
    if (std::from_chars(p.data(), p.data() + p.size(), *port).ec != std::errc() ||
        *port <= 0 || *port > 65535) {
      return false;
    }
    url = url.substr(0, colon);
  }
  *host = std::string(url);
  return !host->empty();
}

bool SplitAddress(const std::string& address, std::string* host, int* port) {
  size_t colon = address.rfind(':');
  if (colon == std::string::npos) return false;
  *host = address.substr(0, colon);
  std::string_view p(address.data() + colon + 1, address.size() - colon - 1);
  return std::from_chars(p.data(), p.data() + p.size(), *port).ec == std::errc() && *port > 0;
}

std::string_view ReplyText(const redisReply* r) { return {r->str, r->len}; }

bool IsOk(const redisReply* r) {
  return r != nullptr && r->type == REDIS_REPLY_STATUS && ReplyText(r) == "OK";
}

}  // namespace

RedisTier::RedisTier(const RedisTierOptions& options, bool cluster)
    : options_(options),
      limits_(RedisLimitsFor(options.max_record_bytes, options.split_bytes)),
      cluster_(cluster) {}

RedisTier::~RedisTier() = default;

Result<std::unique_ptr<RedisTier>> RedisTier::Open(const RedisTierOptions& options) {
  if (options.urls.empty()) return InvalidArgument("redis tier: no URL");
  if (options.split_bytes == 0 || options.split_bytes > kRedisMaxPartBytes) {
    return InvalidArgument("redis tier: split_bytes must be in (0, 256 MiB]");
  }
  if (options.max_record_bytes == 0) {
    return InvalidArgument("redis tier: max_record_bytes must be positive");
  }
  if (options.key_prefix.find_first_of("{}") != std::string::npos) {
    return InvalidArgument("redis tier: key_prefix must not contain '{' or '}'");
  }
  if (options.connect_timeout_ms <= 0 || options.command_timeout_ms <= 0 ||
      options.max_connections_per_node <= 0) {
    return InvalidArgument("redis tier: timeouts and pool size must be positive");
  }
  bool cluster = options.urls.size() > 1;
  std::vector<std::pair<std::string, int>> seeds;
  for (const std::string& url : options.urls) {
    bool url_cluster = false;
    std::string host;
    int port = 0;
    if (!ParseUrl(url, &url_cluster, &host, &port)) {
      return InvalidArgument("redis tier: bad URL '" + url +
                             "' (want redis://host:port or redis+cluster://host:port)");
    }
    cluster = cluster || url_cluster;
    seeds.emplace_back(host, port);
  }
  std::unique_ptr<RedisTier> tier(new RedisTier(options, cluster));
  tier->seeds_ = seeds;
  const Deadline deadline =
      Clock::now() + std::chrono::milliseconds(options.connect_timeout_ms +
                                               options.command_timeout_ms);
  if (!cluster) {
    const std::string address = seeds[0].first + ":" + std::to_string(seeds[0].second);
    Node* node = tier->NodeFor(address);
    {
      std::unique_lock lock(tier->topology_mu_);
      tier->slots_.fill(node);
    }
    auto replies = node->Pipeline({{"PING"}}, deadline);
    if (!replies.ok()) return replies.status().WithContext("redis tier: open");
    return tier;
  }
  CT_RETURN_IF_ERROR(tier->RefreshSlots(nullptr).WithContext("redis tier: open"));
  return tier;
}

std::string RedisTier::HeadKey(const Hash128& ns, const ChunkKey& key) const {
  return options_.key_prefix + ns.ToHex() + ":{" + key.ToHex() + "}";
}

std::string RedisTier::PartKey(const Hash128& ns, const ChunkKey& key, uint32_t part) const {
  return HeadKey(ns, key) + ":" + std::to_string(part);
}

std::string RedisTier::NamespacePattern(const Hash128& ns) const {
  std::string p;
  for (char c : options_.key_prefix) {
    if (c == '*' || c == '?' || c == '[' || c == ']' || c == '\\') p.push_back('\\');
    p.push_back(c);
  }
  return p + ns.ToHex() + ":{*";
}

Node* RedisTier::NodeFor(const std::string& address) {
  {
    std::shared_lock lock(topology_mu_);
    for (const auto& n : nodes_) {
      if (n->address() == address) return n.get();
    }
  }
  std::unique_lock lock(topology_mu_);
  for (const auto& n : nodes_) {
    if (n->address() == address) return n.get();
  }
  redis::NodeOptions o;
  if (!SplitAddress(address, &o.host, &o.port)) return nullptr;
  o.connect_timeout_ms = options_.connect_timeout_ms;
  o.command_timeout_ms = options_.command_timeout_ms;
  o.max_connections = options_.max_connections_per_node;
  o.backoff_initial_ms = options_.backoff_initial_ms;
  o.backoff_max_ms = options_.backoff_max_ms;
  nodes_.push_back(std::make_unique<Node>(std::move(o)));
  return nodes_.back().get();
}

Node* RedisTier::NodeForSlot(int slot) {
  std::shared_lock lock(topology_mu_);
  if (slots_[slot] != nullptr) return slots_[slot];
  // An unmapped slot (mid-resharding): any node will answer with MOVED.
  return nodes_.empty() ? nullptr : nodes_.front().get();
}

void RedisTier::TestOnlyRouteAllSlotsTo(const std::string& address) {
  Node* node = NodeFor(address);
  std::unique_lock lock(topology_mu_);
  slots_.fill(node);
}

Status RedisTier::RefreshSlots(Node* preferred) {
  std::vector<Node*> candidates;
  if (preferred != nullptr) candidates.push_back(preferred);
  {
    std::shared_lock lock(topology_mu_);
    for (const auto& n : nodes_) candidates.push_back(n.get());
  }
  for (const auto& [host, port] : seeds_) candidates.push_back(NodeFor(host + ":" +
                                                                       std::to_string(port)));
  Status last = Unavailable("no cluster node to ask for slots");
  for (Node* node : candidates) {
    if (node == nullptr) continue;
    Deadline deadline = Clock::now() + std::chrono::milliseconds(options_.command_timeout_ms);
    auto replies = node->Pipeline({{"CLUSTER", "SLOTS"}}, deadline);
    if (!replies.ok()) {
      last = replies.status();
      continue;
    }
    const redisReply* r = (*replies)[0].get();
    if (r->type != REDIS_REPLY_ARRAY || r->elements == 0) {
      last = Unavailable("CLUSTER SLOTS from " + node->address() + ": no slot ranges");
      continue;
    }
    // [start, end, [host, port, id, ...], replicas...] per range; masters come first.
    std::vector<std::pair<std::pair<int, int>, std::string>> ranges;
    bool bad = false;
    for (size_t i = 0; i < r->elements && !bad; ++i) {
      const redisReply* e = r->element[i];
      if (e->type != REDIS_REPLY_ARRAY || e->elements < 3 ||
          e->element[0]->type != REDIS_REPLY_INTEGER ||
          e->element[1]->type != REDIS_REPLY_INTEGER ||
          e->element[2]->type != REDIS_REPLY_ARRAY || e->element[2]->elements < 2 ||
          e->element[2]->element[1]->type != REDIS_REPLY_INTEGER) {
        bad = true;
        break;
      }
      int start = static_cast<int>(e->element[0]->integer);
      int end = static_cast<int>(e->element[1]->integer);
      const redisReply* master = e->element[2];
      std::string host = master->element[0]->type == REDIS_REPLY_STRING
                             ? std::string(ReplyText(master->element[0]))
                             : std::string();
      // An empty host means "the address you reached me at".
      if (host.empty() || host == "?") {
        std::string h;
        int p = 0;
        SplitAddress(node->address(), &h, &p);
        host = h;
      }
      if (start < 0 || end >= redis::kClusterSlots || start > end) {
        bad = true;
        break;
      }
      ranges.push_back({{start, end}, host + ":" + std::to_string(master->element[1]->integer)});
    }
    if (bad) {
      last = Unavailable("CLUSTER SLOTS from " + node->address() + ": malformed reply");
      continue;
    }
    std::vector<std::pair<std::pair<int, int>, Node*>> resolved;
    for (auto& [range, address] : ranges) resolved.push_back({range, NodeFor(address)});
    std::unique_lock lock(topology_mu_);
    slots_.fill(nullptr);
    for (auto& [range, n] : resolved) {
      for (int s = range.first; s <= range.second; ++s) slots_[s] = n;
    }
    counters_.slot_refreshes.fetch_add(1, std::memory_order_relaxed);
    return Status::Ok();
  }
  return last;
}

Result<std::vector<ReplyPtr>> RedisTier::Execute(int slot, const std::vector<Command>& commands,
                                                 bool transaction, Deadline deadline) {
  Node* node = NodeForSlot(slot);
  bool asking = false;
  std::vector<Command> wire;
  for (int hop = 0; hop <= options_.max_redirects; ++hop) {
    if (node == nullptr) return Unavailable("redis tier: no node serves slot " +
                                            std::to_string(slot));
    wire.clear();
    // ASKING lets the next command touch an importing slot. MULTI/EXEC cannot be used there:
    // EXEC on a slot being imported refuses several keys some of which are missing (TRYAGAIN),
    // which is every new record. Ordered pipelining keeps the publication rule instead: the
    // head is written after its parts, on the same connection.
    const bool use_multi = transaction && !asking;
    if (use_multi) {
      wire.push_back({"MULTI"});
      wire.insert(wire.end(), commands.begin(), commands.end());
      wire.push_back({"EXEC"});
    } else {
      for (const Command& c : commands) {
        if (asking) wire.push_back({"ASKING"});
        wire.push_back(c);
      }
    }
    CT_ASSIGN_OR_RETURN(std::vector<ReplyPtr> replies, node->Pipeline(wire, deadline));
    Redirect redirect;
    bool try_again = false;
    for (const ReplyPtr& r : replies) {
      redirect = redis::ParseRedirect(r.get());
      if (redirect.kind != Redirect::kNone) break;
      try_again = try_again || (r->type == REDIS_REPLY_ERROR &&
                                ReplyText(r.get()).starts_with("TRYAGAIN"));
    }
    if (redirect.kind == Redirect::kNone && try_again) {
      // A multi-key command met a slot mid-migration; it settles within milliseconds.
      if (Clock::now() + std::chrono::milliseconds(10) >= deadline) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
      continue;
    }
    if (redirect.kind == Redirect::kMoved) {
      counters_.moved.fetch_add(1, std::memory_order_relaxed);
      node = NodeFor(redirect.address);
      {
        std::unique_lock lock(topology_mu_);
        slots_[redirect.slot] = node;
      }
      // One MOVED usually means a resharding moved many slots: reload the whole map. A failed
      // reload is harmless; the slot itself is fixed above.
      (void)RefreshSlots(node);
      asking = false;
      continue;
    }
    if (redirect.kind == Redirect::kAsk) {
      counters_.ask.fetch_add(1, std::memory_order_relaxed);
      node = NodeFor(redirect.address);
      asking = true;
      continue;
    }
    if (use_multi) {
      ReplyPtr exec = std::move(replies.back());
      replies.clear();
      replies.push_back(std::move(exec));
    } else if (asking) {
      std::vector<ReplyPtr> kept;
      for (size_t i = 1; i < replies.size(); i += 2) kept.push_back(std::move(replies[i]));
      replies.swap(kept);
    }
    return replies;
  }
  return Unavailable("redis tier: slot " + std::to_string(slot) +
                     " still moving after " + std::to_string(options_.max_redirects) +
                     " redirects");
}

Status RedisTier::CountFailure(const Status& s) {
  counters_.errors.fetch_add(1, std::memory_order_relaxed);
  if (s.code() == StatusCode::kDeadlineExceeded) {
    counters_.deadline_misses.fetch_add(1, std::memory_order_relaxed);
  }
  return s;
}

Status RedisTier::Put(const ChunkKey& key, std::span<const std::byte> record,
                      uint32_t ttl_seconds) {
  return PutIn(Hash128{}, key, record, ttl_seconds);
}
Result<std::vector<std::byte>> RedisTier::Get(const ChunkKey& key, Deadline deadline) {
  return GetIn(Hash128{}, key, deadline);
}
std::vector<bool> RedisTier::ContainsMany(std::span<const ChunkKey> keys, Deadline deadline) {
  return ContainsManyIn(Hash128{}, keys, deadline);
}
Status RedisTier::Erase(const ChunkKey& key) { return EraseIn(Hash128{}, key); }

Status RedisTier::PutIn(const Hash128& ns, const ChunkKey& key,
                        std::span<const std::byte> record, uint32_t ttl_seconds) {
  if (record.size() > options_.max_record_bytes) {
    return InvalidArgument("redis tier: record of " + std::to_string(record.size()) +
                           " bytes above max_record_bytes " +
                           std::to_string(options_.max_record_bytes));
  }
  const uint32_t ttl = ttl_seconds != 0 ? ttl_seconds : options_.default_ttl_seconds;
  const std::string ttl_text = std::to_string(ttl);
  const std::string_view data(reinterpret_cast<const char*>(record.data()), record.size());
  const std::string head_key = HeadKey(ns, key);

  RedisHead h;
  const std::string head_value = EncodeRedisHead(record, options_.split_bytes, &h);

  std::vector<std::string> part_keys;
  part_keys.reserve(h.n_parts);
  std::vector<Command> commands;
  commands.reserve(h.n_parts + 1);
  auto add_set = [&](std::string_view k, std::string_view v) {
    if (ttl != 0) {
      commands.push_back({"SET", k, v, "EX", ttl_text});
    } else {
      commands.push_back({"SET", k, v});
    }
  };
  for (uint32_t i = 0; i < h.n_parts; ++i) part_keys.push_back(PartKey(ns, key, i));
  for (uint32_t i = 0; i < h.n_parts; ++i) {
    add_set(part_keys[i], data.substr(uint64_t{i} * h.part_bytes, h.part_bytes));
  }
  // WART: overwriting a record with one of fewer parts leaves the old extra parts behind until
  // their TTL; readers never see them (the head bounds the part count). Keys are content
  // addresses, so a key's record size rarely changes.
  add_set(head_key, head_value);

  auto replies = Execute(redis::KeySlot(head_key), commands, /*transaction=*/true,
                         NoDeadline());
  if (!replies.ok()) return CountFailure(replies.status().WithContext("redis put"));
  // EXEC's array of replies, or (after ASK, see Execute) one reply per SET.
  std::vector<const redisReply*> results;
  const redisReply* first = (*replies)[0].get();
  if (first->type == REDIS_REPLY_ARRAY) {
    for (size_t i = 0; i < first->elements; ++i) results.push_back(first->element[i]);
  } else if (replies->size() == commands.size()) {
    for (const ReplyPtr& r : *replies) results.push_back(r.get());
  }
  if (results.size() != commands.size()) {
    std::string why = first->type == REDIS_REPLY_ERROR ? std::string(ReplyText(first))
                                                       : "transaction aborted";
    return CountFailure(IOError("redis put: " + why));
  }
  for (const redisReply* r : results) {
    if (!IsOk(r)) {
      std::string why =
          r->type == REDIS_REPLY_ERROR ? std::string(ReplyText(r)) : "unexpected reply";
      return CountFailure(IOError("redis put: " + why));
    }
  }
  counters_.puts.fetch_add(1, std::memory_order_relaxed);
  counters_.bytes_in.fetch_add(record.size(), std::memory_order_relaxed);
  return Status::Ok();
}

Result<std::vector<std::byte>> RedisTier::GetIn(const Hash128& ns, const ChunkKey& key,
                                                Deadline deadline) {
  counters_.gets.fetch_add(1, std::memory_order_relaxed);
  auto miss = [this](std::atomic<uint64_t>* why_counter, std::string why) {
    counters_.misses.fetch_add(1, std::memory_order_relaxed);
    if (why_counter != nullptr) why_counter->fetch_add(1, std::memory_order_relaxed);
    return NotFound(std::move(why));
  };
  const std::string head_key = HeadKey(ns, key);
  const int slot = redis::KeySlot(head_key);
  auto head_replies = Execute(slot, {{"GET", head_key}}, false, deadline);
  if (!head_replies.ok()) return CountFailure(head_replies.status().WithContext("redis get"));
  const redisReply* hr = (*head_replies)[0].get();
  if (hr->type == REDIS_REPLY_NIL) return miss(nullptr, "redis get: no such key");
  if (hr->type != REDIS_REPLY_STRING) {
    return miss(&counters_.corruptions, "redis get: " + head_key + " is not a string");
  }
  // Nothing the head claims is used before ParseRedisHead checked it against limits_.
  Result<RedisHead> h = ParseRedisHead(AsBytes(hr), limits_);
  if (!h.ok()) {
    return miss(h.status().code() == StatusCode::kCorruption ? &counters_.corruptions : nullptr,
                "redis get " + head_key + ": " + std::string(h.status().message()));
  }
  Result<std::vector<std::byte>> out = Corruption("unset");
  if (h->n_parts == 0) {
    out = AssembleRedisRecord(*h, {});
  } else {
    std::vector<std::string> part_keys;
    std::vector<Command> commands;
    part_keys.reserve(h->n_parts);
    commands.reserve(h->n_parts);
    for (uint32_t i = 0; i < h->n_parts; ++i) part_keys.push_back(PartKey(ns, key, i));
    for (const std::string& k : part_keys) commands.push_back({"GET", k});
    head_replies->clear();  // free the head before holding all the parts
    auto parts = Execute(slot, commands, false, deadline);
    if (!parts.ok()) return CountFailure(parts.status().WithContext("redis get parts"));
    if (parts->size() != h->n_parts) {
      return CountFailure(IOError("redis get parts: " + std::to_string(parts->size()) +
                                  " replies to " + std::to_string(h->n_parts) + " commands"));
    }
    std::vector<ByteSpan> views;
    views.reserve(h->n_parts);
    for (uint32_t i = 0; i < h->n_parts; ++i) {
      const redisReply* pr = (*parts)[i].get();
      if (pr->type != REDIS_REPLY_STRING || pr->len != h->PartLength(i)) {
        // Expired, evicted or partly written by hand: the record is incomplete.
        return miss(&counters_.errors, "redis get: part " + std::to_string(i) + " of " +
                                           head_key + " missing or short");
      }
      views.push_back(AsBytes(pr));
    }
    out = AssembleRedisRecord(*h, views);
  }
  if (!out.ok()) {
    return miss(&counters_.corruptions,
                "redis get " + head_key + ": " + std::string(out.status().message()));
  }
  counters_.hits.fetch_add(1, std::memory_order_relaxed);
  counters_.bytes_out.fetch_add(out->size(), std::memory_order_relaxed);
  return out;
}

std::vector<bool> RedisTier::ContainsManyIn(const Hash128& ns, std::span<const ChunkKey> keys,
                                            Deadline deadline) {
  std::vector<bool> found(keys.size(), false);
  std::vector<std::string> head_keys;
  head_keys.reserve(keys.size());
  for (const ChunkKey& k : keys) head_keys.push_back(HeadKey(ns, k));
  // Group by owning node: one pipeline each.
  std::vector<std::pair<Node*, std::vector<size_t>>> groups;
  for (size_t i = 0; i < keys.size(); ++i) {
    Node* node = NodeForSlot(redis::KeySlot(head_keys[i]));
    auto it = std::find_if(groups.begin(), groups.end(),
                           [&](const auto& g) { return g.first == node; });
    if (it == groups.end()) {
      groups.push_back({node, {}});
      it = groups.end() - 1;
    }
    it->second.push_back(i);
  }
  auto fail = [&](const Status& s) {
    (void)CountFailure(s);
    return std::vector<bool>(keys.size(), false);
  };
  for (const auto& [node, indices] : groups) {
    if (node == nullptr) return fail(Unavailable("redis contains: no node"));
    std::vector<Command> commands;
    commands.reserve(indices.size());
    for (size_t i : indices) commands.push_back({"EXISTS", head_keys[i]});
    auto replies = node->Pipeline(commands, deadline);
    if (!replies.ok()) return fail(replies.status());
    for (size_t j = 0; j < indices.size(); ++j) {
      const size_t i = indices[j];
      const redisReply* r = (*replies)[j].get();
      if (r->type == REDIS_REPLY_INTEGER) {
        found[i] = r->integer == 1;
        continue;
      }
      // A redirect (the map is stale): ask again through the redirect-following path.
      auto one = Execute(redis::KeySlot(head_keys[i]), {{"EXISTS", head_keys[i]}}, false,
                         deadline);
      if (!one.ok()) return fail(one.status());
      const redisReply* o = (*one)[0].get();
      if (o->type != REDIS_REPLY_INTEGER) {
        return fail(IOError("redis contains: " + std::string(o->type == REDIS_REPLY_ERROR
                                                                  ? ReplyText(o)
                                                                  : "unexpected reply")));
      }
      found[i] = o->integer == 1;
    }
  }
  return found;
}

Status RedisTier::EraseIn(const Hash128& ns, const ChunkKey& key) {
  const std::string head_key = HeadKey(ns, key);
  const int slot = redis::KeySlot(head_key);
  auto head = Execute(slot, {{"GETRANGE", head_key, "0", std::to_string(kRedisHeadBytes - 1)}},
                      false, NoDeadline());
  if (!head.ok()) return CountFailure(head.status().WithContext("redis erase"));
  const redisReply* hr = (*head)[0].get();
  std::vector<std::string> keys = {head_key};
  // The part count comes from the head, checked like a reader's; a head that fails the checks
  // is still deleted, and its parts (unknowable) are left to their TTL or ClearNamespace.
  // Only the first 32 bytes were read, so an inline head parses as a split one with no parts.
  if (hr->type == REDIS_REPLY_STRING && hr->len == kRedisHeadBytes) {
    Result<RedisHead> h = ParseRedisHead(AsBytes(hr), limits_);
    if (h.ok()) {
      for (uint32_t i = 0; i < h->n_parts; ++i) keys.push_back(PartKey(ns, key, i));
    }
  }
  Command del = {"DEL"};
  for (const std::string& k : keys) del.push_back(k);
  auto replies = Execute(slot, {del}, false, NoDeadline());
  if (!replies.ok()) return CountFailure(replies.status().WithContext("redis erase"));
  if ((*replies)[0]->type != REDIS_REPLY_INTEGER) {
    return CountFailure(IOError("redis erase: " + std::string(ReplyText((*replies)[0].get()))));
  }
  return Status::Ok();
}

std::vector<Node*> RedisTier::Masters() {
  // A fresh slot map, so a master added since the last refresh is scanned too. A failed
  // refresh keeps the map we have.
  if (cluster_) (void)RefreshSlots(nullptr);
  std::vector<Node*> masters;
  std::shared_lock lock(topology_mu_);
  for (Node* n : slots_) {
    if (n != nullptr && std::find(masters.begin(), masters.end(), n) == masters.end()) {
      masters.push_back(n);
    }
  }
  return masters;
}

Status RedisTier::ClearNamespace(const Hash128& ns) {
  const std::string pattern = NamespacePattern(ns);
  const std::string count = std::to_string(kScanCount);
  Status result;
  for (Node* node : Masters()) {
    std::string cursor = "0";
    do {
      auto deadline = [&] {
        return Clock::now() + std::chrono::milliseconds(options_.command_timeout_ms);
      };
      auto page = node->Pipeline({{"SCAN", cursor, "MATCH", pattern, "COUNT", count}}, deadline());
      if (!page.ok()) {
        result = CountFailure(page.status().WithContext("redis clear " + node->address()));
        break;
      }
      const redisReply* r = (*page)[0].get();
      if (r->type != REDIS_REPLY_ARRAY || r->elements != 2 ||
          r->element[0]->type != REDIS_REPLY_STRING ||
          r->element[1]->type != REDIS_REPLY_ARRAY) {
        result = CountFailure(IOError("redis clear " + node->address() + ": SCAN replied " +
                                      (r->type == REDIS_REPLY_ERROR ? std::string(ReplyText(r))
                                                                    : "an unexpected shape")));
        break;
      }
      cursor = std::string(ReplyText(r->element[0]));
      const redisReply* keys = r->element[1];
      std::vector<Command> unlinks;
      unlinks.reserve(keys->elements);
      for (size_t i = 0; i < keys->elements; ++i) {
        if (keys->element[i]->type == REDIS_REPLY_STRING) {
          unlinks.push_back({"UNLINK", ReplyText(keys->element[i])});
        }
      }
      if (unlinks.empty()) continue;
      // One key per UNLINK: keys of different slots may not share a command in a cluster. A
      // key that moved away since the SCAN answers MOVED and is left for its new owner's pass.
      auto done = node->Pipeline(unlinks, deadline());
      if (!done.ok()) {
        result = CountFailure(done.status().WithContext("redis clear " + node->address()));
        break;
      }
    } while (cursor != "0");
  }
  return result;
}

TierStats RedisTier::Stats() const {
  TierStats s;
  auto get = [](const std::atomic<uint64_t>& a) { return a.load(std::memory_order_relaxed); };
  s.gets = get(counters_.gets);
  s.hits = get(counters_.hits);
  s.misses = get(counters_.misses);
  s.puts = get(counters_.puts);
  s.bytes_in = get(counters_.bytes_in);
  s.bytes_out = get(counters_.bytes_out);
  s.errors = get(counters_.errors);
  s.deadline_misses = get(counters_.deadline_misses);
  s.corruptions = get(counters_.corruptions);
  return s;
}

RedisTierStats RedisTier::RedisStats() const {
  RedisTierStats s;
  s.moved = counters_.moved.load(std::memory_order_relaxed);
  s.ask = counters_.ask.load(std::memory_order_relaxed);
  s.slot_refreshes = counters_.slot_refreshes.load(std::memory_order_relaxed);
  std::shared_lock lock(topology_mu_);
  for (const auto& n : nodes_) {
    redis::NodeCounters c = n->counters();
    s.connects += c.connects;
    s.connect_failures += c.connect_failures;
    s.timeouts += c.timeouts;
  }
  return s;
}

}  // namespace cachette::cache
