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

constexpr char kHeadMagic[4] = {'C', 'T', 'R', 'H'};
constexpr uint16_t kHeadVersion = 1;
constexpr size_t kHeadBytes = 32;
// Larger than any chunk cachette writes; a head claiming more is treated as corrupt rather
// than trusted with an allocation.
constexpr uint64_t kMaxRecordBytes = uint64_t{1} << 36;
// Redis's own default proto-max-bulk-len is 512 MiB; parts must stay below it.
constexpr uint64_t kMaxSplitBytes = uint64_t{256} << 20;

struct Head {
  uint32_t n_parts = 0;
  uint32_t part_bytes = 0;
  uint64_t total_bytes = 0;
  uint64_t checksum = 0;
};

template <typename T>
void PutLe(char* p, T v) {
  for (size_t i = 0; i < sizeof(T); ++i) p[i] = static_cast<char>((v >> (8 * i)) & 0xff);
}
template <typename T>
T GetLe(const char* p) {
  T v = 0;
  for (size_t i = 0; i < sizeof(T); ++i) v |= T(static_cast<uint8_t>(p[i])) << (8 * i);
  return v;
}

void EncodeHead(const Head& h, char* out) {
  std::memcpy(out, kHeadMagic, 4);
  PutLe<uint16_t>(out + 4, kHeadVersion);
  PutLe<uint16_t>(out + 6, 0);
  PutLe<uint32_t>(out + 8, h.n_parts);
  PutLe<uint32_t>(out + 12, h.part_bytes);
  PutLe<uint64_t>(out + 16, h.total_bytes);
  PutLe<uint64_t>(out + 24, h.checksum);
}

// Parses and sanity-checks a head (its first kHeadBytes; `len` is the whole value's length).
bool DecodeHead(const char* p, size_t len, Head* h) {
  if (len < kHeadBytes || std::memcmp(p, kHeadMagic, 4) != 0) return false;
  if (GetLe<uint16_t>(p + 4) != kHeadVersion) return false;
  h->n_parts = GetLe<uint32_t>(p + 8);
  h->part_bytes = GetLe<uint32_t>(p + 12);
  h->total_bytes = GetLe<uint64_t>(p + 16);
  h->checksum = GetLe<uint64_t>(p + 24);
  if (h->total_bytes > kMaxRecordBytes) return false;
  if (h->n_parts == 0) return true;
  return h->part_bytes > 0 &&
         h->n_parts == (h->total_bytes + h->part_bytes - 1) / h->part_bytes;
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
    : options_(options), cluster_(cluster) {}

RedisTier::~RedisTier() = default;

Result<std::unique_ptr<RedisTier>> RedisTier::Open(const RedisTierOptions& options) {
  if (options.urls.empty()) return InvalidArgument("redis tier: no URL");
  if (options.split_bytes == 0 || options.split_bytes > kMaxSplitBytes) {
    return InvalidArgument("redis tier: split_bytes must be in (0, 256 MiB]");
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

std::string RedisTier::HeadKey(const ChunkKey& key) const {
  return options_.key_prefix + "{" + key.ToHex() + "}";
}

std::string RedisTier::PartKey(const ChunkKey& key, uint32_t part) const {
  return HeadKey(key) + ":" + std::to_string(part);
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
  if (record.size() > kMaxRecordBytes) return InvalidArgument("redis tier: record too large");
  const uint32_t ttl = ttl_seconds != 0 ? ttl_seconds : options_.default_ttl_seconds;
  const std::string ttl_text = std::to_string(ttl);
  const std::string_view data(reinterpret_cast<const char*>(record.data()), record.size());
  const std::string head_key = HeadKey(key);

  Head h;
  h.total_bytes = record.size();
  h.checksum = Hash64(record);
  if (record.size() > options_.split_bytes) {
    h.part_bytes = static_cast<uint32_t>(options_.split_bytes);
    h.n_parts = static_cast<uint32_t>((record.size() + h.part_bytes - 1) / h.part_bytes);
  }
  std::string head_value(kHeadBytes, '\0');
  EncodeHead(h, head_value.data());
  if (h.n_parts == 0) head_value.append(data);

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
  for (uint32_t i = 0; i < h.n_parts; ++i) part_keys.push_back(PartKey(key, i));
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

Result<std::vector<std::byte>> RedisTier::Get(const ChunkKey& key, Deadline deadline) {
  counters_.gets.fetch_add(1, std::memory_order_relaxed);
  auto miss = [this](std::atomic<uint64_t>* why_counter, std::string why) {
    counters_.misses.fetch_add(1, std::memory_order_relaxed);
    if (why_counter != nullptr) why_counter->fetch_add(1, std::memory_order_relaxed);
    return NotFound(std::move(why));
  };
  const std::string head_key = HeadKey(key);
  const int slot = redis::KeySlot(head_key);
  auto head_replies = Execute(slot, {{"GET", head_key}}, false, deadline);
  if (!head_replies.ok()) return CountFailure(head_replies.status().WithContext("redis get"));
  const redisReply* hr = (*head_replies)[0].get();
  if (hr->type == REDIS_REPLY_NIL) return miss(nullptr, "redis get: no such key");
  Head h;
  if (hr->type != REDIS_REPLY_STRING || !DecodeHead(hr->str, hr->len, &h)) {
    return miss(&counters_.corruptions, "redis get: corrupt head " + head_key);
  }
  std::vector<std::byte> out;
  if (h.n_parts == 0) {
    if (hr->len - kHeadBytes != h.total_bytes) {
      return miss(&counters_.corruptions, "redis get: head length mismatch " + head_key);
    }
    out.resize(h.total_bytes);
    if (h.total_bytes > 0) std::memcpy(out.data(), hr->str + kHeadBytes, h.total_bytes);
  } else {
    std::vector<std::string> part_keys;
    std::vector<Command> commands;
    part_keys.reserve(h.n_parts);
    for (uint32_t i = 0; i < h.n_parts; ++i) part_keys.push_back(PartKey(key, i));
    for (const std::string& k : part_keys) commands.push_back({"GET", k});
    head_replies->clear();  // free the head before holding all the parts
    auto parts = Execute(slot, commands, false, deadline);
    if (!parts.ok()) return CountFailure(parts.status().WithContext("redis get parts"));
    out.resize(h.total_bytes);
    for (uint32_t i = 0; i < h.n_parts; ++i) {
      const redisReply* pr = (*parts)[i].get();
      const uint64_t offset = uint64_t{i} * h.part_bytes;
      const uint64_t want = std::min<uint64_t>(h.part_bytes, h.total_bytes - offset);
      if (pr->type != REDIS_REPLY_STRING || pr->len != want) {
        // Expired, evicted or partly written by hand: the record is incomplete.
        return miss(&counters_.errors, "redis get: part " + std::to_string(i) + " of " +
                                           head_key + " missing or short");
      }
      std::memcpy(out.data() + offset, pr->str, want);
    }
  }
  if (Hash64(out) != h.checksum) {
    return miss(&counters_.corruptions, "redis get: checksum mismatch " + head_key);
  }
  counters_.hits.fetch_add(1, std::memory_order_relaxed);
  counters_.bytes_out.fetch_add(out.size(), std::memory_order_relaxed);
  return out;
}

std::vector<bool> RedisTier::ContainsMany(std::span<const ChunkKey> keys, Deadline deadline) {
  std::vector<bool> found(keys.size(), false);
  std::vector<std::string> head_keys;
  head_keys.reserve(keys.size());
  for (const ChunkKey& k : keys) head_keys.push_back(HeadKey(k));
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

Status RedisTier::Erase(const ChunkKey& key) {
  const std::string head_key = HeadKey(key);
  const int slot = redis::KeySlot(head_key);
  auto head = Execute(slot, {{"GETRANGE", head_key, "0", std::to_string(kHeadBytes - 1)}}, false,
                      NoDeadline());
  if (!head.ok()) return CountFailure(head.status().WithContext("redis erase"));
  const redisReply* hr = (*head)[0].get();
  Head h;
  std::vector<std::string> keys = {head_key};
  // A corrupt head still gets deleted; its parts, unknowable, are left to their TTL.
  if (hr->type == REDIS_REPLY_STRING && hr->len == kHeadBytes &&
      DecodeHead(hr->str, hr->len, &h)) {
    for (uint32_t i = 0; i < h.n_parts; ++i) keys.push_back(PartKey(key, i));
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
