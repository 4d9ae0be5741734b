// Tests of the Redis tier against real servers (no mocks): the standalone server and the
// 3-master cluster of scripts/redis.sh, named by CACHETTE_REDIS_URL and
// CACHETTE_REDIS_CLUSTER_URL. When those are unset (plain `ctest`), the test leases the servers
// itself through `scripts/redis.sh acquire|release`, so the last test process stops them.
// Tests that kill or pause a server start their own on a private port.
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cache/redis/redis_conn.h"
#include "cache/redis/redis_record.h"
#include "cache/redis/redis_tier.h"
#include "core/hash.h"

// The largest single C++ allocation since the last reset: hostile heads must not make the reader
// allocate what they claim. (hiredis's own buffers hold only bytes the server really sent.)
// GCC sees free() of memory from the replaced operator new as a mismatch (it is not): silence it.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
static std::atomic<size_t> g_largest_alloc{0};
void* operator new(size_t n) {
  size_t seen = g_largest_alloc.load(std::memory_order_relaxed);
  while (n > seen && !g_largest_alloc.compare_exchange_weak(seen, n)) {
  }
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, size_t) noexcept { std::free(p); }

namespace cachette::cache {
namespace {

using redis::ReplyPtr;
using namespace std::chrono_literals;

std::string g_url;          // redis://host:port
std::string g_cluster_url;  // redis+cluster://host:port

class RedisServers : public ::testing::Environment {
 public:
  void SetUp() override {
    const char* url = std::getenv("CACHETTE_REDIS_URL");
    const char* cluster = std::getenv("CACHETTE_REDIS_CLUSTER_URL");
    if (url != nullptr && cluster != nullptr && *url != '\0' && *cluster != '\0') {
      g_url = url;
      g_cluster_url = cluster;
      return;
    }
    std::string cmd = "bash '" CACHETTE_SOURCE_DIR "/scripts/redis.sh' acquire";
    ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
    leased_ = true;
    g_url = "redis://127.0.0.1:6390";
    g_cluster_url = "redis+cluster://127.0.0.1:7001";
  }
  void TearDown() override {
    if (!leased_) return;
    std::string cmd = "bash '" CACHETTE_SOURCE_DIR "/scripts/redis.sh' release";
    EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
  }

 private:
  bool leased_ = false;
};
[[maybe_unused]] const auto* const kServers =
    ::testing::AddGlobalTestEnvironment(new RedisServers);

std::pair<std::string, int> HostPort(std::string url) {
  url = url.substr(url.find("://") + 3);
  size_t colon = url.rfind(':');
  return {url.substr(0, colon), std::stoi(url.substr(colon + 1))};
}

// One command on a fresh connection, outside the tier.
ReplyPtr RawAt(const std::string& host, int port, const std::vector<std::string>& args) {
  redisContext* c = redisConnectWithTimeout(host.c_str(), port, timeval{2, 0});
  if (c == nullptr || c->err != 0) {
    if (c != nullptr) redisFree(c);
    return nullptr;
  }
  std::vector<const char*> argv;
  std::vector<size_t> len;
  for (const std::string& a : args) {
    argv.push_back(a.data());
    len.push_back(a.size());
  }
  void* r = redisCommandArgv(c, static_cast<int>(argv.size()), argv.data(), len.data());
  redisFree(c);
  return ReplyPtr(static_cast<redisReply*>(r));
}

// One command on the server that owns its key (follows a MOVED once).
ReplyPtr Raw(bool cluster, const std::vector<std::string>& args) {
  auto [host, port] = HostPort(cluster ? g_cluster_url : g_url);
  ReplyPtr r = RawAt(host, port, args);
  redis::Redirect red = redis::ParseRedirect(r.get());
  if (red.kind == redis::Redirect::kMoved) {
    size_t colon = red.address.rfind(':');
    r = RawAt(red.address.substr(0, colon), std::stoi(red.address.substr(colon + 1)), args);
  }
  return r;
}

// "host:port" of each master, from CLUSTER SLOTS.
std::vector<std::string> ClusterMasters() {
  auto [host, port] = HostPort(g_cluster_url);
  ReplyPtr r = RawAt(host, port, {"CLUSTER", "SLOTS"});
  std::vector<std::string> masters;
  if (r == nullptr || r->type != REDIS_REPLY_ARRAY) return masters;
  for (size_t i = 0; i < r->elements; ++i) {
    const redisReply* m = r->element[i]->element[2];
    std::string a = std::string(m->element[0]->str, m->element[0]->len) + ":" +
                    std::to_string(m->element[1]->integer);
    if (std::find(masters.begin(), masters.end(), a) == masters.end()) masters.push_back(a);
  }
  return masters;
}

ChunkKey RandomKey() {
  static std::atomic<uint64_t> counter{0};
  static const uint64_t base =
      std::random_device{}() ^ (uint64_t(getpid()) << 32) ^
      uint64_t(std::chrono::steady_clock::now().time_since_epoch().count());
  uint64_t n = counter.fetch_add(1);
  return Hash128Of(ByteSpan(reinterpret_cast<const std::byte*>(&n), sizeof n), base);
}

std::vector<std::byte> MakeRecord(size_t size, uint64_t seed) {
  std::vector<std::byte> v(size);
  std::mt19937_64 rng(seed);
  for (size_t i = 0; i < size; i += 8) {
    uint64_t x = rng();
    for (size_t j = 0; j < 8 && i + j < size; ++j) v[i + j] = std::byte(x >> (8 * j));
  }
  return v;
}

Deadline In(std::chrono::milliseconds ms) { return Clock::now() + ms; }

RedisTierOptions Options(bool cluster) {
  RedisTierOptions o;
  o.urls = {cluster ? g_cluster_url : g_url};
  o.connect_timeout_ms = 500;
  o.command_timeout_ms = 2000;
  return o;
}

std::unique_ptr<RedisTier> OpenOrDie(const RedisTierOptions& o) {
  auto t = RedisTier::Open(o);
  EXPECT_TRUE(t.ok()) << t.status().ToString();
  return t.ok() ? std::move(*t) : nullptr;
}

// A redis-server of our own on `port`, for the tests that kill or pause one.
class OwnServer {
 public:
  explicit OwnServer(int port) : port_(port) {
    dir_ = std::filesystem::temp_directory_path() /
           ("cachette-redis-test-" + std::to_string(getpid()) + "-" + std::to_string(port));
    std::filesystem::create_directories(dir_);
  }
  ~OwnServer() {
    Resume();
    Stop();
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  bool Start() {
    std::string cmd = "redis-server --port " + std::to_string(port_) +
                      " --bind 127.0.0.1 --daemonize yes --save '' --appendonly no --dir '" +
                      dir_.string() + "' --pidfile '" + (dir_ / "redis.pid").string() +
                      "' --logfile '" + (dir_ / "redis.log").string() + "'";
    if (std::system(cmd.c_str()) != 0) return false;
    for (int i = 0; i < 200; ++i) {
      ReplyPtr r = RawAt("127.0.0.1", port_, {"PING"});
      if (r != nullptr && r->type == REDIS_REPLY_STATUS) {
        std::ifstream in(dir_ / "redis.pid");
        in >> pid_;
        return pid_ > 0;
      }
      std::this_thread::sleep_for(10ms);
    }
    return false;
  }
  void Stop() {
    if (pid_ <= 0) return;
    kill(pid_, SIGKILL);
    // Not our child (daemonized), so it may linger as a zombie; wait for the port instead.
    for (int i = 0; i < 200 && RawAt("127.0.0.1", port_, {"PING"}) != nullptr; ++i) {
      std::this_thread::sleep_for(10ms);
    }
    pid_ = 0;
    std::error_code ec;
    std::filesystem::remove(dir_ / "redis.pid", ec);
  }
  void Pause() {
    if (pid_ > 0) kill(pid_, SIGSTOP);
  }
  void Resume() {
    if (pid_ > 0) kill(pid_, SIGCONT);
  }
  std::string url() const { return "redis://127.0.0.1:" + std::to_string(port_); }

 private:
  int port_;
  pid_t pid_ = 0;
  std::filesystem::path dir_;
};

TEST(RedisSlotTest, MatchesRedisClusterSpec) {
  EXPECT_EQ(redis::Crc16("123456789"), 0x31C3);  // the XMODEM check value
  EXPECT_EQ(redis::KeySlot("foo"), 12182);
  EXPECT_EQ(redis::KeySlot("{user1000}.following"), redis::KeySlot("{user1000}.followers"));
  EXPECT_EQ(redis::KeySlot("foo{}{bar}"), redis::Crc16("foo{}{bar}") & 16383);
  EXPECT_EQ(redis::KeySlot("foo{{bar}}zap"), redis::Crc16("{bar") & 16383);
  EXPECT_EQ(redis::KeySlot("foo{bar}{zap}"), redis::KeySlot("bar"));
  // And against the server's own CLUSTER KEYSLOT.
  auto [host, port] = HostPort(g_cluster_url);
  for (int i = 0; i < 20; ++i) {
    std::string key = "ct:{" + RandomKey().ToHex() + "}:" + std::to_string(i);
    ReplyPtr r = RawAt(host, port, {"CLUSTER", "KEYSLOT", key});
    ASSERT_NE(r, nullptr);
    ASSERT_EQ(r->type, REDIS_REPLY_INTEGER);
    EXPECT_EQ(redis::KeySlot(key), r->integer) << key;
  }
}

TEST(RedisOpenTest, RejectsBadOptions) {
  RedisTierOptions o;
  o.urls = {"http://x:1"};
  EXPECT_EQ(RedisTier::Open(o).status().code(), StatusCode::kInvalidArgument);
  o.urls = {g_url};
  o.key_prefix = "a{b";
  EXPECT_EQ(RedisTier::Open(o).status().code(), StatusCode::kInvalidArgument);
}


// ---- The head parser and part assembly, without a server ----------------------------------

// A head value with every field chosen by the test.
std::string HeadBytes(uint32_t n_parts, uint32_t part_bytes, uint64_t total, uint64_t checksum,
                      uint16_t version = kRedisHeadVersion, uint16_t flags = 0,
                      std::string magic = "CTRH") {
  std::string v = magic.substr(0, 4);
  auto put = [&](uint64_t x, int n) {
    for (int i = 0; i < n; ++i) v.push_back(static_cast<char>((x >> (8 * i)) & 0xff));
  };
  put(version, 2);
  put(flags, 2);
  put(n_parts, 4);
  put(part_bytes, 4);
  put(total, 8);
  put(checksum, 8);
  return v;
}

ByteSpan Span(const std::string& s) {
  return ByteSpan(reinterpret_cast<const std::byte*>(s.data()), s.size());
}

struct HostileHead {
  const char* name;
  std::string value;
  StatusCode code;
};

std::vector<HostileHead> HostileHeads() {
  constexpr uint64_t kHuge = uint64_t{1} << 40;
  return {
      {"billions_of_parts", HeadBytes(4000000000u, 1, 4000000000u, 0), StatusCode::kCorruption},
      {"billions_of_parts_of_1mib", HeadBytes(4000000000u, 1 << 20, kHuge, 0),
       StatusCode::kCorruption},
      {"parts_over_the_limit", HeadBytes(100000, 64, 6400000, 0), StatusCode::kCorruption},
      {"huge_total_inline", HeadBytes(0, 0, kHuge, 0), StatusCode::kCorruption},
      {"max_total", HeadBytes(2, 1 << 20, UINT64_MAX, 0), StatusCode::kCorruption},
      {"total_mismatch", HeadBytes(3, 1000, 5000, 0), StatusCode::kCorruption},
      {"total_zero_with_parts", HeadBytes(3, 1000, 0, 0), StatusCode::kCorruption},
      {"part_bytes_zero", HeadBytes(5, 0, 5000, 0), StatusCode::kCorruption},
      {"part_bytes_over_split", HeadBytes(2, 1 << 30, (uint64_t{1} << 30) + 1, 0),
       StatusCode::kCorruption},
      {"inline_part_bytes", HeadBytes(0, 7, 0, 0), StatusCode::kCorruption},
      {"inline_longer_than_head_says", HeadBytes(0, 0, 3, 0) + "abcd", StatusCode::kCorruption},
      {"inline_shorter_than_head_says", HeadBytes(0, 0, 30, 0) + "abcd",
       StatusCode::kCorruption},
      {"bytes_after_split_head", HeadBytes(2, 1 << 20, 3 << 19, 0) + "x",
       StatusCode::kCorruption},
      {"truncated", HeadBytes(2, 1 << 20, 3 << 19, 0).substr(0, 20), StatusCode::kCorruption},
      {"empty", "", StatusCode::kCorruption},
      {"bad_magic", HeadBytes(0, 0, 0, 0, kRedisHeadVersion, 0, "XTRH"), StatusCode::kCorruption},
      {"old_version", HeadBytes(0, 0, 0, 0, 1), StatusCode::kNotFound},
      {"future_version", HeadBytes(0, 0, 0, 0, 0xffff), StatusCode::kNotFound},
      {"unknown_flags", HeadBytes(0, 0, 0, 0, kRedisHeadVersion, 4), StatusCode::kNotFound},
  };
}

// A reader of records up to 64 MiB in parts of 1 MiB: at most 64 parts.
RedisRecordLimits TestLimits() { return RedisLimitsFor(uint64_t{64} << 20, 1 << 20); }

TEST(RedisRecordTest, LimitsFollowFromRecordAndSplitSize) {
  RedisRecordLimits l = TestLimits();
  EXPECT_EQ(l.max_parts, 64u);
  EXPECT_EQ(l.max_part_bytes, uint64_t{1} << 20);
  EXPECT_EQ(RedisLimitsFor(1000, 300).max_parts, 4u);
  EXPECT_EQ(RedisLimitsFor(10, 300).max_parts, 1u);
}

TEST(RedisRecordTest, HostileHeadsAreRejectedBeforeAnyAllocation) {
  for (const HostileHead& h : HostileHeads()) {
    SCOPED_TRACE(h.name);
    g_largest_alloc = 0;
    Result<RedisHead> got = ParseRedisHead(Span(h.value), TestLimits());
    const size_t largest = g_largest_alloc.load();
    ASSERT_FALSE(got.ok());
    EXPECT_EQ(got.status().code(), h.code) << got.status().ToString();
    EXPECT_LT(largest, size_t{4096}) << "a rejected head allocated " << largest << " bytes";
  }
}

TEST(RedisRecordTest, EncodeParseAssembleRoundTrip) {
  for (size_t size : {size_t{0}, size_t{1}, size_t{1000}, size_t{1024}, size_t{1025},
                      size_t{3 * 1024 + 7}}) {
    SCOPED_TRACE(size);
    std::vector<std::byte> rec = MakeRecord(size, size + 1);
    RedisHead written;
    const std::string value = EncodeRedisHead(rec, 1024, &written);
    Result<RedisHead> h = ParseRedisHead(Span(value), RedisLimitsFor(1 << 20, 1024));
    ASSERT_TRUE(h.ok()) << h.status().ToString();
    EXPECT_EQ(h->n_parts, written.n_parts);
    EXPECT_EQ(h->n_parts, size > 1024 ? (size + 1023) / 1024 : 0u);
    EXPECT_EQ(h->total_bytes, size);
    std::vector<ByteSpan> parts;
    for (uint32_t i = 0; i < h->n_parts; ++i) {
      parts.push_back(ByteSpan(rec).subspan(uint64_t{i} * 1024, h->PartLength(i)));
    }
    auto out = AssembleRedisRecord(*h, parts);
    ASSERT_TRUE(out.ok()) << out.status().ToString();
    EXPECT_EQ(*out, rec);
  }
}

TEST(RedisRecordTest, PartsThatDisagreeWithTheHeadAreCorrupt) {
  std::vector<std::byte> rec = MakeRecord(2500, 5);
  const std::string value = EncodeRedisHead(rec, 1000, nullptr);
  Result<RedisHead> h = ParseRedisHead(Span(value), RedisLimitsFor(1 << 20, 1000));
  ASSERT_TRUE(h.ok());
  ASSERT_EQ(h->n_parts, 3u);
  const ByteSpan all(rec);
  std::vector<std::byte> flipped(rec.begin() + 2000, rec.end());
  flipped[7] ^= std::byte{1};
  const std::vector<std::pair<const char*, std::vector<ByteSpan>>> cases = {
      {"too_few", {all.subspan(0, 1000), all.subspan(1000, 1000)}},
      {"too_many", {all.subspan(0, 1000), all.subspan(1000, 1000), all.subspan(2000),
                    all.subspan(0, 1)}},
      {"short_part", {all.subspan(0, 999), all.subspan(1000, 1000), all.subspan(2000)}},
      {"long_last_part", {all.subspan(0, 1000), all.subspan(1000, 1000), all.subspan(1500)}},
      {"other_bytes", {all.subspan(0, 1000), all.subspan(1000, 1000), ByteSpan(flipped)}},
  };
  for (const auto& [name, parts] : cases) {
    SCOPED_TRACE(name);
    auto out = AssembleRedisRecord(*h, parts);
    EXPECT_EQ(out.status().code(), StatusCode::kCorruption);
  }
}

class RedisModeTest : public ::testing::TestWithParam<bool> {
 protected:
  bool cluster() const { return GetParam(); }
};

TEST_P(RedisModeTest, PutGetContainsErase) {
  auto tier = OpenOrDie(Options(cluster()));
  ASSERT_NE(tier, nullptr);
  EXPECT_EQ(tier->cluster_mode(), cluster());
  for (size_t size : {size_t{0}, size_t{1}, size_t{1000}, size_t{100000}}) {
    SCOPED_TRACE(size);
    ChunkKey key = RandomKey(), absent = RandomKey();
    std::vector<std::byte> rec = MakeRecord(size, size + 7);
    EXPECT_EQ(tier->Get(key, In(1000ms)).status().code(), StatusCode::kNotFound);
    ASSERT_TRUE(tier->Put(key, rec).ok());
    auto got = tier->Get(key, In(1000ms));
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    EXPECT_EQ(*got, rec);
    std::vector<ChunkKey> keys = {key, absent, key};
    EXPECT_EQ(tier->ContainsMany(keys, In(1000ms)), (std::vector<bool>{true, false, true}));
    ASSERT_TRUE(tier->Erase(key).ok());
    ASSERT_TRUE(tier->Erase(absent).ok());
    EXPECT_EQ(tier->Get(key, In(1000ms)).status().code(), StatusCode::kNotFound);
    EXPECT_EQ(tier->ContainsMany(keys, In(1000ms)), (std::vector<bool>{false, false, false}));
  }
  TierStats s = tier->Stats();
  EXPECT_EQ(s.puts, 4u);
  EXPECT_EQ(s.hits, 4u);
  EXPECT_EQ(s.misses, 8u);
  EXPECT_EQ(s.errors, 0u);
  EXPECT_EQ(s.bytes_in, 101001u);
  EXPECT_EQ(s.bytes_out, 101001u);
}

TEST_P(RedisModeTest, SplitValuesShareOneSlotAndReadBackExactly) {
  RedisTierOptions o = Options(cluster());
  o.split_bytes = 64 << 10;
  auto tier = OpenOrDie(o);
  ASSERT_NE(tier, nullptr);
  for (size_t size : {size_t{64 << 10}, size_t{(64 << 10) + 1}, size_t{3 * (64 << 10) + 123}}) {
    SCOPED_TRACE(size);
    ChunkKey key = RandomKey();
    std::vector<std::byte> rec = MakeRecord(size, size);
    ASSERT_TRUE(tier->Put(key, rec).ok());
    const uint32_t n_parts = size > o.split_bytes ? (size + o.split_bytes - 1) / o.split_bytes : 0;
    const int slot = redis::KeySlot(tier->HeadKey(key));
    // The node that owns the head must hold every part (no MOVED for any of them).
    for (uint32_t i = 0; i < n_parts + 1; ++i) {
      std::string k = i < n_parts ? tier->PartKey(key, i) : tier->HeadKey(key);
      EXPECT_EQ(redis::KeySlot(k), slot);
      ReplyPtr r = Raw(cluster(), {"STRLEN", k});
      ASSERT_NE(r, nullptr);
      ASSERT_EQ(r->type, REDIS_REPLY_INTEGER);
      EXPECT_GT(r->integer, 0);
    }
    ReplyPtr extra = Raw(cluster(), {"EXISTS", tier->PartKey(key, n_parts)});
    EXPECT_EQ(extra->integer, 0);
    auto got = tier->Get(key, In(2000ms));
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    EXPECT_TRUE(*got == rec);
    ASSERT_TRUE(tier->Erase(key).ok());
    for (uint32_t i = 0; i < n_parts; ++i) {
      EXPECT_EQ(Raw(cluster(), {"EXISTS", tier->PartKey(key, i)})->integer, 0);
    }
  }
}

TEST_P(RedisModeTest, DamagedRecordIsAMissNeverGarbage) {
  RedisTierOptions o = Options(cluster());
  o.split_bytes = 4096;
  auto tier = OpenOrDie(o);
  ASSERT_NE(tier, nullptr);
  std::vector<std::byte> rec = MakeRecord(4096 * 3 + 10, 1);
  auto put_fresh = [&] {
    ChunkKey key = RandomKey();
    EXPECT_TRUE(tier->Put(key, rec).ok());
    return key;
  };
  // A missing part.
  ChunkKey k1 = put_fresh();
  ASSERT_EQ(Raw(cluster(), {"DEL", tier->PartKey(k1, 1)})->integer, 1);
  EXPECT_EQ(tier->Get(k1, In(1000ms)).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(tier->Stats().errors, 1u);
  // A short part.
  ChunkKey k2 = put_fresh();
  ASSERT_NE(Raw(cluster(), {"SET", tier->PartKey(k2, 0), "short"}), nullptr);
  EXPECT_EQ(tier->Get(k2, In(1000ms)).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(tier->Stats().errors, 2u);
  // A part of the right length with other bytes (e.g. from another writer): checksum.
  ChunkKey k3 = put_fresh();
  ASSERT_NE(Raw(cluster(), {"SETRANGE", tier->PartKey(k3, 2), "100", "X"}), nullptr);
  EXPECT_EQ(tier->Get(k3, In(1000ms)).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(tier->Stats().corruptions, 1u);
  // A truncated head and a head claiming a huge length.
  ChunkKey k4 = put_fresh();
  ASSERT_NE(Raw(cluster(), {"SET", tier->HeadKey(k4), "CTRH\x01"}), nullptr);
  EXPECT_EQ(tier->Get(k4, In(1000ms)).status().code(), StatusCode::kNotFound);
  ChunkKey k5 = put_fresh();
  ASSERT_NE(Raw(cluster(), {"SETRANGE", tier->HeadKey(k5), "16", std::string(8, '\xff')}),
            nullptr);
  EXPECT_EQ(tier->Get(k5, In(1000ms)).status().code(), StatusCode::kNotFound);
  // A small inline record cut short.
  ChunkKey k6 = RandomKey();
  ASSERT_TRUE(tier->Put(k6, MakeRecord(100, 2)).ok());
  ASSERT_NE(Raw(cluster(), {"SETRANGE", tier->HeadKey(k6), "131", "\x01\x02"}), nullptr);
  EXPECT_EQ(tier->Get(k6, In(1000ms)).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(tier->Stats().corruptions, 4u);
  EXPECT_EQ(tier->Stats().hits, 0u);
  for (ChunkKey k : {k1, k2, k3, k4, k5, k6}) EXPECT_TRUE(tier->Erase(k).ok());
}

TEST_P(RedisModeTest, TtlExpiresEveryPart) {
  RedisTierOptions o = Options(cluster());
  o.split_bytes = 1024;
  o.default_ttl_seconds = 100;
  auto tier = OpenOrDie(o);
  ASSERT_NE(tier, nullptr);
  ChunkKey key = RandomKey(), lasting = RandomKey();
  std::vector<std::byte> rec = MakeRecord(3000, 3);
  ASSERT_TRUE(tier->Put(key, rec, /*ttl_seconds=*/1).ok());
  ASSERT_TRUE(tier->Put(lasting, rec).ok());
  for (uint32_t i = 0; i < 3; ++i) {
    long long pttl = Raw(cluster(), {"PTTL", tier->PartKey(key, i)})->integer;
    EXPECT_GT(pttl, 0);
    EXPECT_LE(pttl, 1000);
  }
  EXPECT_GT(Raw(cluster(), {"TTL", tier->HeadKey(lasting)})->integer, 90);
  EXPECT_GT(Raw(cluster(), {"TTL", tier->PartKey(lasting, 0)})->integer, 90);
  ASSERT_TRUE(tier->Get(key, In(1000ms)).ok());
  auto start = Clock::now();
  while (tier->Get(key, In(1000ms)).ok() && Clock::now() - start < 3s) {
    std::this_thread::sleep_for(50ms);
  }
  EXPECT_EQ(tier->Get(key, In(1000ms)).status().code(), StatusCode::kNotFound);
  EXPECT_LT(Clock::now() - start, 2500ms);
  EXPECT_EQ(Raw(cluster(), {"EXISTS", tier->PartKey(key, 0)})->integer, 0);
  EXPECT_TRUE(tier->Get(lasting, In(1000ms)).ok());
  EXPECT_TRUE(tier->Erase(lasting).ok());
}

// 4 threads x 200 mixed operations over a small shared key set; every hit must be exact.
TEST_P(RedisModeTest, ConcurrentCallers) {
  RedisTierOptions o = Options(cluster());
  o.split_bytes = 4096;
  o.max_connections_per_node = 3;  // fewer connections than threads: callers wait their turn
  auto tier = OpenOrDie(o);
  ASSERT_NE(tier, nullptr);
  constexpr int kKeys = 16;
  std::vector<ChunkKey> keys;
  std::vector<std::vector<std::byte>> recs;
  for (int i = 0; i < kKeys; ++i) {
    keys.push_back(RandomKey());
    recs.push_back(MakeRecord(100 + i * 997, i));
  }
  std::atomic<int> wrong{0}, failures{0}, hits{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      for (int n = 0; n < 200; ++n) {
        int i = rng() % kKeys;
        switch (rng() % 4) {
          case 0:
            if (!tier->Put(keys[i], recs[i]).ok()) ++failures;
            break;
          case 1: {
            auto got = tier->Get(keys[i], In(2000ms));
            if (got.ok()) {
              ++hits;
              if (*got != recs[i]) ++wrong;
            } else if (got.status().code() != StatusCode::kNotFound) {
              ++failures;
            }
            break;
          }
          case 2: {
            std::vector<ChunkKey> some = {keys[i], keys[(i + 1) % kKeys]};
            (void)tier->ContainsMany(some, In(2000ms));
            break;
          }
          default:
            if (n % 8 == 0 && !tier->Erase(keys[i]).ok()) ++failures;
            break;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(failures.load(), 0);
  EXPECT_GT(hits.load(), 0);
  EXPECT_EQ(tier->Stats().corruptions, 0u);
  for (const ChunkKey& k : keys) EXPECT_TRUE(tier->Erase(k).ok());
}

// Not a timed test: prints loopback throughput for 1 MiB records (split default 1 MiB, so one
// inline value each) and for 8 MiB records (8 parts, one MULTI/EXEC per put).
TEST_P(RedisModeTest, ThroughputLog) {
  auto tier = OpenOrDie(Options(cluster()));
  ASSERT_NE(tier, nullptr);
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  const int scale = 8;  // instrumented copies are ~10x slower; keep the test short
#else
  const int scale = 1;
#endif
  for (size_t mib : {size_t{1}, size_t{8}}) {
    const int n = (mib == 1 ? 64 : 8) / scale;
    std::vector<std::byte> rec = MakeRecord(mib << 20, 9);
    std::vector<ChunkKey> keys;
    for (int i = 0; i < n; ++i) keys.push_back(RandomKey());
    auto t0 = Clock::now();
    for (const ChunkKey& k : keys) ASSERT_TRUE(tier->Put(k, rec).ok());
    auto t1 = Clock::now();
    for (const ChunkKey& k : keys) {
      auto got = tier->Get(k, In(5000ms));
      ASSERT_TRUE(got.ok()) << got.status().ToString();
      ASSERT_EQ(got->size(), rec.size());
    }
    auto t2 = Clock::now();
    const double mb = double(n) * double(mib << 20) / 1e6;
    std::printf("redis %s %zu MiB records x%d: put %.0f MB/s, get %.0f MB/s\n",
                cluster() ? "cluster" : "standalone", mib, n,
                mb / std::chrono::duration<double>(t1 - t0).count(),
                mb / std::chrono::duration<double>(t2 - t1).count());
    for (const ChunkKey& k : keys) ASSERT_TRUE(tier->Erase(k).ok());
  }
}

// Every hostile head of the table above, stored where a record's head lives: a miss, counted,
// and no allocation of what it claims, in both modes.
TEST_P(RedisModeTest, HostileValuesAreMissesWithoutBigAllocations) {
  RedisTierOptions o = Options(cluster());
  o.max_record_bytes = uint64_t{64} << 20;
  auto tier = OpenOrDie(o);
  ASSERT_NE(tier, nullptr);
  const Hash128 ns{7, RandomKey().lo};
  for (const HostileHead& h : HostileHeads()) {
    SCOPED_TRACE(h.name);
    const ChunkKey key = RandomKey();
    ASSERT_NE(Raw(cluster(), {"SET", tier->HeadKey(ns, key), h.value}), nullptr);
    g_largest_alloc = 0;
    auto got = tier->GetIn(ns, key, In(2000ms));
    EXPECT_EQ(got.status().code(), StatusCode::kNotFound) << got.status().ToString();
    EXPECT_LT(g_largest_alloc.load(), size_t{1} << 20);
    EXPECT_TRUE(tier->EraseIn(ns, key).ok());
    EXPECT_EQ(Raw(cluster(), {"EXISTS", tier->HeadKey(ns, key)})->integer, 0);
  }
  // A valid head whose parts are another length than it says.
  const ChunkKey key = RandomKey();
  std::vector<std::byte> rec = MakeRecord(3 << 20, 11);
  ASSERT_TRUE(tier->PutIn(ns, key, rec, 0).ok());
  ASSERT_NE(Raw(cluster(), {"SET", tier->PartKey(ns, key, 1), std::string(100, 'x')}), nullptr);
  g_largest_alloc = 0;
  EXPECT_EQ(tier->GetIn(ns, key, In(2000ms)).status().code(), StatusCode::kNotFound);
  EXPECT_LT(g_largest_alloc.load(), size_t{1} << 20);
  EXPECT_EQ(tier->Stats().hits, 0u);
  EXPECT_GE(tier->Stats().corruptions, 10u);
  EXPECT_TRUE(tier->EraseIn(ns, key).ok());
}

// Every key of the SCAN pattern of `ns`, over every master.
size_t CountNamespaceKeys(bool cluster, const RedisTier& tier, const Hash128& ns) {
  std::vector<std::string> nodes;
  if (cluster) {
    nodes = ClusterMasters();
  } else {
    auto [host, port] = HostPort(g_url);
    nodes = {host + ":" + std::to_string(port)};
  }
  size_t n = 0;
  for (const std::string& a : nodes) {
    const size_t colon = a.rfind(':');
    std::string cursor = "0";
    do {
      ReplyPtr r = RawAt(a.substr(0, colon), std::stoi(a.substr(colon + 1)),
                         {"SCAN", cursor, "MATCH", tier.NamespacePattern(ns), "COUNT", "1000"});
      if (r == nullptr || r->type != REDIS_REPLY_ARRAY) return SIZE_MAX;
      cursor = std::string(r->element[0]->str, r->element[0]->len);
      n += r->element[1]->elements;
    } while (cursor != "0");
  }
  return n;
}

// Two tiers (two processes' worth) sharing one Redis: A writes namespaces X and Y, B clears X.
TEST_P(RedisModeTest, ClearNamespaceRemovesEveryWritersKeys) {
  RedisTierOptions o = Options(cluster());
  o.split_bytes = 4096;
  auto a = OpenOrDie(o);
  auto b = OpenOrDie(o);
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  const Hash128 x{1, RandomKey().lo}, y{2, RandomKey().lo};
  std::vector<ChunkKey> keys;
  for (int i = 0; i < 20; ++i) keys.push_back(RandomKey());
  const std::vector<std::byte> small = MakeRecord(100, 1), split = MakeRecord(3 * 4096 + 5, 2);
  for (size_t i = 0; i < keys.size(); ++i) {
    const auto& rec = i % 2 == 0 ? small : split;
    ASSERT_TRUE(a->PutIn(x, keys[i], rec, 0).ok());
    ASSERT_TRUE(a->PutIn(y, keys[i], rec, 0).ok());  // same chunk keys, another namespace
  }
  EXPECT_EQ(CountNamespaceKeys(cluster(), *a, x), 10u + 10u * 5u);  // heads + 4 parts each
  ASSERT_TRUE(b->ClearNamespace(x).ok());
  EXPECT_EQ(CountNamespaceKeys(cluster(), *a, x), 0u);
  for (const ChunkKey& k : keys) {
    EXPECT_EQ(a->GetIn(x, k, In(2000ms)).status().code(), StatusCode::kNotFound);
    EXPECT_EQ(b->GetIn(x, k, In(2000ms)).status().code(), StatusCode::kNotFound);
    EXPECT_TRUE(b->GetIn(y, k, In(2000ms)).ok());
  }
  EXPECT_EQ(a->ContainsManyIn(x, keys, In(2000ms)), std::vector<bool>(keys.size(), false));
  EXPECT_EQ(a->ContainsManyIn(y, keys, In(2000ms)), std::vector<bool>(keys.size(), true));
  // An empty namespace clears fine; then Y goes too.
  EXPECT_TRUE(b->ClearNamespace(x).ok());
  ASSERT_TRUE(a->ClearNamespace(y).ok());
  EXPECT_EQ(CountNamespaceKeys(cluster(), *a, y), 0u);
}

TEST(RedisKeysTest, NamespaceIsInEveryKeyAndGlobsAreEscaped) {
  RedisTierOptions o = Options(false);
  o.key_prefix = "t*[x]?:";
  auto tier = OpenOrDie(o);
  ASSERT_NE(tier, nullptr);
  const Hash128 ns{0x1111, 0x2222};
  const ChunkKey k{3, 4};
  EXPECT_EQ(tier->HeadKey(ns, k), "t*[x]?:" + ns.ToHex() + ":{" + k.ToHex() + "}");
  EXPECT_EQ(tier->PartKey(ns, k, 2), tier->HeadKey(ns, k) + ":2");
  EXPECT_EQ(tier->NamespacePattern(ns), "t\\*\\[x\\]\\?:" + ns.ToHex() + ":{*");
  EXPECT_EQ(redis::KeySlot(tier->HeadKey(ns, k)), redis::KeySlot(tier->PartKey(ns, k, 9)));
  EXPECT_EQ(redis::KeySlot(tier->HeadKey(ns, k)), redis::KeySlot(tier->HeadKey(Hash128{}, k)));
}

INSTANTIATE_TEST_SUITE_P(Modes, RedisModeTest, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "Cluster" : "Standalone"; });

TEST(RedisClusterTest, KeysSpreadOverAllMasters) {
  auto tier = OpenOrDie(Options(true));
  ASSERT_NE(tier, nullptr);
  std::vector<std::string> masters = ClusterMasters();
  ASSERT_EQ(masters.size(), 3u);
  std::vector<ChunkKey> keys;
  for (int i = 0; i < 60; ++i) {
    keys.push_back(RandomKey());
    ASSERT_TRUE(tier->Put(keys.back(), MakeRecord(64, i)).ok());
  }
  for (const std::string& m : masters) {
    size_t colon = m.rfind(':');
    int held = 0;
    for (const ChunkKey& k : keys) {
      ReplyPtr r = RawAt(m.substr(0, colon), std::stoi(m.substr(colon + 1)),
                         {"EXISTS", tier->HeadKey(k)});
      if (r != nullptr && r->type == REDIS_REPLY_INTEGER && r->integer == 1) ++held;
    }
    EXPECT_GT(held, 0) << m;
  }
  // ContainsMany spans all three nodes in one call.
  std::vector<bool> all = tier->ContainsMany(keys, In(2000ms));
  EXPECT_EQ(std::count(all.begin(), all.end(), true), 60);
  for (const ChunkKey& k : keys) EXPECT_TRUE(tier->Erase(k).ok());
}

TEST(RedisClusterTest, StaleSlotMapFollowsMovedAndRefreshes) {
  RedisTierOptions o = Options(true);
  o.split_bytes = 1000;
  auto tier = OpenOrDie(o);
  ASSERT_NE(tier, nullptr);
  std::vector<std::string> masters = ClusterMasters();
  ASSERT_FALSE(masters.empty());
  const uint64_t refreshes = tier->RedisStats().slot_refreshes;
  tier->TestOnlyRouteAllSlotsTo(masters[0]);
  std::vector<ChunkKey> keys;
  std::vector<std::byte> rec = MakeRecord(2500, 4);
  for (int i = 0; i < 30; ++i) {
    keys.push_back(RandomKey());
    ASSERT_TRUE(tier->Put(keys.back(), rec).ok());
  }
  RedisTierStats s = tier->RedisStats();
  EXPECT_GT(s.moved, 0u);
  EXPECT_GT(s.slot_refreshes, refreshes);
  // The map is repaired: no further redirects.
  for (const ChunkKey& k : keys) {
    auto got = tier->Get(k, In(1000ms));
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    EXPECT_EQ(*got, rec);
  }
  EXPECT_EQ(tier->ContainsMany(keys, In(1000ms)), std::vector<bool>(keys.size(), true));
  EXPECT_EQ(tier->RedisStats().moved, s.moved);
  // ContainsMany on a stale map answers through redirects too.
  tier->TestOnlyRouteAllSlotsTo(masters[0]);
  EXPECT_EQ(tier->ContainsMany(keys, In(1000ms)), std::vector<bool>(keys.size(), true));
  for (const ChunkKey& k : keys) EXPECT_TRUE(tier->Erase(k).ok());
}

std::string NodeId(const std::string& address) {
  size_t colon = address.rfind(':');
  ReplyPtr r = RawAt(address.substr(0, colon), std::stoi(address.substr(colon + 1)),
                     {"CLUSTER", "MYID"});
  return r != nullptr && r->type == REDIS_REPLY_STRING ? std::string(r->str, r->len) : "";
}

ReplyPtr RawAtAddress(const std::string& address, const std::vector<std::string>& args) {
  size_t colon = address.rfind(':');
  return RawAt(address.substr(0, colon), std::stoi(address.substr(colon + 1)), args);
}

// A real slot migration: ASK while the slot is migrating, MOVED after it moved, then back.
TEST(RedisClusterTest, FollowsAskAndMovedDuringSlotMigration) {
  RedisTierOptions o = Options(true);
  o.split_bytes = 1000;
  auto tier = OpenOrDie(o);
  ASSERT_NE(tier, nullptr);
  std::vector<std::string> masters = ClusterMasters();
  ASSERT_EQ(masters.size(), 3u);
  ChunkKey key = RandomKey();
  const std::string slot = std::to_string(redis::KeySlot(tier->HeadKey(key)));
  // The owner, from the server's point of view.
  std::string src;
  for (const std::string& m : masters) {
    ReplyPtr r = RawAtAddress(m, {"CLUSTER", "COUNTKEYSINSLOT", slot});
    ReplyPtr e = RawAtAddress(m, {"EXISTS", tier->HeadKey(key)});
    if (e != nullptr && e->type == REDIS_REPLY_INTEGER) src = m;
  }
  ASSERT_FALSE(src.empty());
  std::string dst = masters[0] == src ? masters[1] : masters[0];
  const std::string src_id = NodeId(src), dst_id = NodeId(dst);
  auto setslot = [&](const std::string& at, std::vector<std::string> args) {
    args.insert(args.begin(), {"CLUSTER", "SETSLOT", slot});
    ReplyPtr r = RawAtAddress(at, args);
    ASSERT_NE(r, nullptr);
    ASSERT_EQ(r->type, REDIS_REPLY_STATUS) << (r->str ? r->str : "");
  };
  // Moves every key of the slot from `from` to `to`, then hands the slot over.
  auto migrate = [&](const std::string& from, const std::string& from_id, const std::string& to,
                     const std::string& to_id) {
    setslot(to, {"IMPORTING", from_id});
    setslot(from, {"MIGRATING", to_id});
    ReplyPtr ks = RawAtAddress(from, {"CLUSTER", "GETKEYSINSLOT", slot, "1000"});
    if (ks != nullptr && ks->type == REDIS_REPLY_ARRAY && ks->elements > 0) {
      size_t colon = to.rfind(':');
      std::vector<std::string> args = {"MIGRATE", to.substr(0, colon), to.substr(colon + 1), "",
                                       "0", "5000", "KEYS"};
      for (size_t i = 0; i < ks->elements; ++i) {
        args.emplace_back(ks->element[i]->str, ks->element[i]->len);
      }
      ReplyPtr m = RawAtAddress(from, args);
      ASSERT_NE(m, nullptr);
      ASSERT_EQ(m->type, REDIS_REPLY_STATUS) << (m->str ? m->str : "");
    }
    for (const std::string& m : masters) setslot(m, {"NODE", to_id});
  };

  // 1. Migrating: the key is new, so the source answers ASK and the write lands on the target.
  setslot(dst, {"IMPORTING", src_id});
  setslot(src, {"MIGRATING", dst_id});
  std::vector<std::byte> rec = MakeRecord(2500, 5);  // 3 parts + head, all in the slot
  Status put = tier->Put(key, rec);
  auto got = tier->Get(key, In(1000ms));
  const uint64_t asks = tier->RedisStats().ask;
  // 2. Finish the move; the tier's map still says `src`, so it must follow MOVED.
  migrate(src, src_id, dst, dst_id);
  auto got_moved = tier->Get(key, In(1000ms));
  const uint64_t moved = tier->RedisStats().moved;
  // 3. Move the slot back home before asserting, so a failure leaves the cluster as it was.
  migrate(dst, dst_id, src, src_id);
  ASSERT_TRUE(put.ok()) << put.ToString();
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_EQ(*got, rec);
  EXPECT_GT(asks, 0u);
  ASSERT_TRUE(got_moved.ok()) << got_moved.status().ToString();
  EXPECT_EQ(*got_moved, rec);
  EXPECT_GT(moved, 0u);
  auto got_back = tier->Get(key, In(1000ms));
  ASSERT_TRUE(got_back.ok()) << got_back.status().ToString();
  EXPECT_EQ(*got_back, rec);
  EXPECT_TRUE(tier->Erase(key).ok());
}

TEST(RedisFailureTest, UnusedPortIsUnavailableFast) {
  RedisTierOptions o;
  o.urls = {"redis://127.0.0.1:6399"};
  o.connect_timeout_ms = 200;
  o.command_timeout_ms = 200;
  auto start = Clock::now();
  auto t = RedisTier::Open(o);
  EXPECT_LT(Clock::now() - start, 2s);
  EXPECT_EQ(t.status().code(), StatusCode::kUnavailable) << t.status().ToString();
  o.urls = {"redis+cluster://127.0.0.1:6399"};
  EXPECT_EQ(RedisTier::Open(o).status().code(), StatusCode::kUnavailable);
}

TEST(RedisFailureTest, DeadNodeIsUnavailableFastThenReconnects) {
  OwnServer server(6391);
  ASSERT_TRUE(server.Start());
  RedisTierOptions o;
  o.urls = {server.url()};
  o.connect_timeout_ms = 200;
  o.command_timeout_ms = 200;
  o.backoff_max_ms = 200;
  auto tier = OpenOrDie(o);
  ASSERT_NE(tier, nullptr);
  ChunkKey key = RandomKey();
  std::vector<std::byte> rec = MakeRecord(5000, 6);
  ASSERT_TRUE(tier->Put(key, rec).ok());
  ASSERT_TRUE(tier->Get(key, In(500ms)).ok());

  server.Stop();
  auto start = Clock::now();
  for (int i = 0; i < 10; ++i) {
    auto t0 = Clock::now();
    auto got = tier->Get(key, In(200ms));
    EXPECT_EQ(got.status().code(), StatusCode::kUnavailable) << got.status().ToString();
    EXPECT_LT(Clock::now() - t0, 2s);
    EXPECT_EQ(tier->Put(key, rec).code(), StatusCode::kUnavailable);
    std::vector<ChunkKey> keys = {key};
    EXPECT_EQ(tier->ContainsMany(keys, In(200ms)), std::vector<bool>{false});
  }
  EXPECT_LT(Clock::now() - start, 2s);
  EXPECT_GE(tier->Stats().errors, 30u);
  EXPECT_GT(tier->RedisStats().connect_failures, 0u);

  ASSERT_TRUE(server.Start());  // an empty server: the old record is gone
  start = Clock::now();
  Status put = Unavailable("not tried");
  while (Clock::now() - start < 5s) {
    put = tier->Put(key, rec);
    if (put.ok()) break;
    std::this_thread::sleep_for(20ms);
  }
  ASSERT_TRUE(put.ok()) << put.ToString();
  auto got = tier->Get(key, In(500ms));
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_EQ(*got, rec);
}

TEST(RedisFailureTest, HungNodeMeetsTheDeadline) {
  OwnServer server(6392);
  ASSERT_TRUE(server.Start());
  RedisTierOptions o;
  o.urls = {server.url()};
  o.connect_timeout_ms = 200;
  o.command_timeout_ms = 1000;
  auto tier = OpenOrDie(o);
  ASSERT_NE(tier, nullptr);
  ChunkKey key = RandomKey();
  ASSERT_TRUE(tier->Put(key, MakeRecord(100, 7)).ok());
  server.Pause();  // accepts TCP (the kernel does) but never answers
  auto t0 = Clock::now();
  auto got = tier->Get(key, In(200ms));
  auto elapsed = Clock::now() - t0;
  EXPECT_EQ(got.status().code(), StatusCode::kDeadlineExceeded) << got.status().ToString();
  EXPECT_LT(elapsed, 2s);
  EXPECT_GE(elapsed, 150ms);
  // Without a deadline the command timeout still bounds the call.
  t0 = Clock::now();
  EXPECT_EQ(tier->Put(key, MakeRecord(100, 7)).code(), StatusCode::kDeadlineExceeded);
  EXPECT_LT(Clock::now() - t0, 3s);
  EXPECT_GE(tier->Stats().deadline_misses, 2u);
  server.Resume();
  got = tier->Get(key, In(1000ms));
  EXPECT_TRUE(got.ok()) << got.status().ToString();
}

}  // namespace
}  // namespace cachette::cache
