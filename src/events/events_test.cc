// KV events: the codec against hand-built vLLM payloads and hostile bytes, the mirror against a
// naive set, and the publisher with the subscriber over real TCP sockets.
#include <gtest/gtest.h>
#include <msgpack.h>
#include <zmq.h>

#include <chrono>
#include <cmath>
#include <functional>
#include <limits>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "events/block_mirror.h"
#include "events/events_test_util.h"
#include "events/kv_event_codec.h"
#include "events/msgpack_scan.h"
#include "events/publisher.h"
#include "events/subscriber.h"
#include "events/wire.h"

namespace cachette::events {
namespace {

using std::chrono::milliseconds;
using namespace std::string_literals;
using BlockSet = std::set<std::pair<int, uint64_t>>;  // (medium, hash)
using test::Cleared;
using test::Removed;
using test::Stored;

// ---- Helpers --------------------------------------------------------------------------------

// msgpack-c's packer writing into a std::string, for payloads built by hand.
class Packer {
 public:
  Packer() { msgpack_packer_init(&pk_, &bytes_, &Packer::Write); }
  msgpack_packer* pk() { return &pk_; }
  Packer& Array(size_t n) {
    msgpack_pack_array(&pk_, n);
    return *this;
  }
  Packer& Map(size_t n) {
    msgpack_pack_map(&pk_, n);
    return *this;
  }
  Packer& Str(std::string_view s) {
    msgpack_pack_str_with_body(&pk_, s.data(), s.size());
    return *this;
  }
  Packer& Bin(std::string_view s) {
    msgpack_pack_bin_with_body(&pk_, s.data(), s.size());
    return *this;
  }
  Packer& U64(uint64_t v) {
    msgpack_pack_uint64(&pk_, v);
    return *this;
  }
  Packer& I64(int64_t v) {
    msgpack_pack_int64(&pk_, v);
    return *this;
  }
  Packer& F64(double v) {
    msgpack_pack_double(&pk_, v);
    return *this;
  }
  Packer& F32(float v) {
    msgpack_pack_float(&pk_, v);
    return *this;
  }
  Packer& Nil() {
    msgpack_pack_nil(&pk_);
    return *this;
  }
  Packer& Raw(std::string_view s) {
    bytes_.append(s);
    return *this;
  }
  const std::string& bytes() const { return bytes_; }

 private:
  static int Write(void* data, const char* buf, size_t len) {
    static_cast<std::string*>(data)->append(buf, len);
    return 0;
  }
  std::string bytes_;
  msgpack_packer pk_;
};

std::string Hex(std::string_view bytes) {
  static const char* kDigits = "0123456789abcdef";
  std::string out;
  for (unsigned char c : bytes) {
    out += kDigits[c >> 4];
    out += kDigits[c & 15];
  }
  return out;
}

// Fresh seed each run; printed by SCOPED_TRACE when a check fails.
uint64_t FreshSeed() { return (uint64_t{std::random_device{}()} << 32) | std::random_device{}(); }

KvEventBatch RandomBatch(std::mt19937_64& rng) {
  std::uniform_int_distribution<int> kind(0, 9), medium(0, kKvMediums - 1), small(0, 6);
  KvEventBatch b;
  b.ts = std::ldexp(static_cast<double>(rng() >> 11), -20);  // any finite value, seconds-ish
  if (rng() % 2) b.dp_rank = static_cast<int64_t>(rng());
  const int n = small(rng);
  for (int i = 0; i < n; ++i) {
    const int k = kind(rng);
    std::vector<uint64_t> hashes(small(rng));
    for (auto& h : hashes) h = rng() >> (rng() % 64);  // all magnitudes
    if (k == 0) {
      b.events.push_back(Cleared());
    } else if (k <= 3) {
      b.events.push_back(Removed(static_cast<KvMedium>(medium(rng)), hashes));
    } else {
      std::vector<int32_t> tokens(rng() % 2 ? 0 : hashes.size() * 3);
      for (auto& t : tokens) t = static_cast<int32_t>(rng());
      std::optional<uint64_t> parent;
      if (rng() % 2) parent = rng();
      const int32_t block_size = static_cast<int32_t>(rng() % (kMaxBlockSize + 1));
      b.events.push_back(
          Stored(static_cast<KvMedium>(medium(rng)), hashes, parent, block_size, tokens));
    }
  }
  return b;
}

bool WaitFor(const std::function<bool()>& done, milliseconds timeout = milliseconds(5000)) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!done()) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(milliseconds(2));
  }
  return true;
}

BlockSet ToSet(const std::vector<KvBlockRef>& blocks) {
  BlockSet out;
  for (const KvBlockRef& b : blocks) out.insert({static_cast<int>(b.medium), b.hash});
  return out;
}

// ---- Codec ----------------------------------------------------------------------------------

TEST(KvEventCodec, RoundTripsRandomBatches) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (int i = 0; i < 500; ++i) {
    const KvEventBatch batch = RandomBatch(rng);
    const std::string bytes = EncodeBatch(batch);
    Result<KvEventBatch> decoded = DecodeBatch(bytes);
    ASSERT_TRUE(decoded.ok()) << decoded.status().ToString();
    ASSERT_TRUE(SameOnWire(batch, *decoded)) << "batch " << i;
    ASSERT_EQ(EncodeBatch(*decoded), bytes) << "batch " << i;
  }
}

// The worked example of docs/formats/kv-events.md, byte for byte.
TEST(KvEventCodec, EncodesTheDocumentedExample) {
  KvEventBatch batch;
  batch.ts = 1700000000.5;
  batch.events.push_back(
      Stored(KvMedium::kMemory, {0x1234, 0x5678}, std::nullopt, 2, {1, 2, 3, 4}));
  batch.events.push_back(Removed(KvMedium::kDisk, {7}));
  batch.events.push_back(Cleared());
  EXPECT_EQ(Hex(EncodeBatch(batch)),
            "92"                                    // [ts, events]
            "cb41d954fc40200000"                    // ts = 1700000000.5
            "93"                                    // 3 events
            "97ab426c6f636b53746f726564"            // ["BlockStored",
            "92cd1234cd5678"                        //  [0x1234, 0x5678],
            "c0"                                    //  parent nil,
            "9401020304"                            //  [1, 2, 3, 4],
            "02c0a66d656d6f7279"                    //  2, nil, "memory"]
            "93ac426c6f636b52656d6f766564"          // ["BlockRemoved",
            "9107a46469736b"                        //  [7], "disk"]
            "91b0416c6c426c6f636b73436c6561726564"  // ["AllBlocksCleared"]
  );
}

// What vLLM's msgspec encoder writes, built by hand: "GPU"/"CPU"/"DISK" mediums, nil parents,
// events of older vLLM (no medium) and newer vLLM (a trailing lora_name), a negative hash from
// Python's hash(), a float32 ts and a dp_rank.
TEST(KvEventCodec, ReadsVllmShapedPayloads) {
  Packer p;
  p.Array(3).F32(1.5f).Array(8);
  p.Array(7)
      .Str("BlockStored")
      .Array(2)
      .U64(11)
      .U64(UINT64_MAX)
      .Nil()
      .Array(2)
      .I64(5)
      .I64(6)
      .I64(1)
      .Nil()
      .Str("GPU");
  p.Array(7).Str("BlockStored").Array(1).U64(13).U64(12).Array(0).I64(16).I64(3).Str("CPU");
  p.Array(6).Str("BlockStored").Array(1).I64(-5).Nil().Array(0).I64(16).Nil();  // no medium
  p.Array(8)
      .Str("BlockStored")
      .Array(1)
      .U64(14)
      .Nil()
      .Array(0)
      .I64(16)
      .Nil()
      .Str("DISK")
      .Str("my-adapter");
  p.Array(3).Str("BlockRemoved").Array(1).U64(11).Str("GPU");
  p.Array(2).Str("BlockRemoved").Array(1).U64(13);  // no medium
  p.Array(3).Str("BlockRemoved").Array(0).Nil();
  p.Array(1).Str("AllBlocksCleared");
  p.I64(0);  // dp_rank

  Result<KvEventBatch> batch = DecodeBatch(p.bytes());
  ASSERT_TRUE(batch.ok()) << batch.status().ToString();
  EXPECT_EQ(batch->ts, 1.5);
  EXPECT_EQ(batch->dp_rank, std::optional<int64_t>(0));
  ASSERT_EQ(batch->events.size(), 8u);
  const auto& e = batch->events;
  EXPECT_TRUE(
      SameOnWire(e[0], Stored(KvMedium::kMemory, {11, UINT64_MAX}, std::nullopt, 1, {5, 6})));
  EXPECT_TRUE(SameOnWire(e[1], Stored(KvMedium::kRam, {13}, 12, 16)));
  EXPECT_TRUE(
      SameOnWire(e[2], Stored(KvMedium::kMemory, {static_cast<uint64_t>(-5)}, std::nullopt, 16)));
  EXPECT_TRUE(SameOnWire(e[3], Stored(KvMedium::kDisk, {14}, std::nullopt, 16)));
  EXPECT_TRUE(SameOnWire(e[4], Removed(KvMedium::kMemory, {11})));
  EXPECT_TRUE(SameOnWire(e[5], Removed(KvMedium::kMemory, {13})));
  EXPECT_TRUE(SameOnWire(e[6], Removed(KvMedium::kMemory, {})));
  EXPECT_EQ(e[7].kind, KvEvent::Kind::kAllCleared);

  // A nil dp_rank is no rank, as an absent one is.
  Packer q;
  q.Array(3).F64(2.0).Array(0).Nil();
  Result<KvEventBatch> no_rank = DecodeBatch(q.bytes());
  ASSERT_TRUE(no_rank.ok()) << no_rank.status().ToString();
  EXPECT_FALSE(no_rank->dp_rank.has_value());
}

TEST(KvEventCodec, ParsesEveryMediumName) {
  const std::pair<std::string_view, KvMedium> cases[] = {
      {"memory", KvMedium::kMemory}, {"GPU", KvMedium::kMemory}, {"ram", KvMedium::kRam},
      {"CPU", KvMedium::kRam},       {"disk", KvMedium::kDisk},  {"DISK", KvMedium::kDisk},
      {"redis", KvMedium::kRedis}};
  for (const auto& [name, medium] : cases) EXPECT_EQ(ParseKvMedium(name), medium) << name;
  for (int m = 0; m < kKvMediums; ++m) {
    EXPECT_EQ(ParseKvMedium(KvMediumName(static_cast<KvMedium>(m))), static_cast<KvMedium>(m));
  }
  EXPECT_FALSE(ParseKvMedium("gpu").has_value());
  EXPECT_FALSE(ParseKvMedium("").has_value());
}

// A batch around one event, for the table below.
std::string OneEvent(const std::function<void(Packer&)>& event) {
  Packer p;
  p.Array(2).F64(1.0).Array(1);
  event(p);
  return p.bytes();
}

TEST(KvEventCodec, RefusesMalformedInputsNamingTheProblem) {
  const std::string valid = EncodeBatch(
      {1.0, {Stored(KvMedium::kMemory, {1, 2}, 3, 16, {}), Removed(KvMedium::kRam, {4})}, 7});
  const std::string deep = std::string(20, '\x91') + '\x00';
  struct Case {
    const char* name;
    std::string bytes;
    const char* message;  // a substring of the error
  };
  const Case cases[] = {
      {"empty", "", "empty payload"},
      {"truncated", valid.substr(0, valid.size() - 3), "truncated: the str at byte 54"},
      {"truncated inside a float", valid.substr(0, 5),
       "truncated: the float64 at byte 1 needs 8 bytes, only 3 left"},
      {"trailing bytes", valid + "\x01\x02", "2 trailing bytes after the value"},
      {"not an array", Packer().Map(0).bytes(), "the batch is a map, not an array"},
      {"not msgpack", "\xc1", "byte 0xc1 at byte 0 is not a msgpack type"},
      {"huge declared array", "\x92\xcb\0\0\0\0\0\0\0\0\xdd\xff\xff\xff\xff\x90"s,
       "array of 4294967295 elements at byte 10 cannot fit in the 1 bytes left"},
      {"huge declared map", "\xdf\xff\xff\xff\xff", "map of 4294967295 elements"},
      {"huge declared str",
       "\xdb\x7f\xff\xff\xff"
       "abc",
       "truncated: the str at byte 0 needs 2147483647 bytes, only 3 left"},
      {"huge declared bin", "\xc6\xff\xff\xff\xff", "truncated: the bin at byte 0"},
      {"cut length", "\xdd\x00"s, "truncated: the length of the array at byte 0 is cut off"},
      {"too deep", deep, "nested deeper than 8 containers"},
      {"one element", Packer().Array(1).F64(1).bytes(),
       "the batch has 1 elements, expected 2 or 3"},
      {"ts a string", Packer().Array(2).Str("now").Array(0).bytes(), "ts is a string, not a float"},
      {"ts an integer", Packer().Array(2).I64(5).Array(0).bytes(), "ts is an integer, not a float"},
      {"ts nan", Packer().Array(2).F64(std::nan("")).Array(0).bytes(), "ts is not a finite number"},
      {"events a map", Packer().Array(2).F64(1).Map(0).bytes(), "events is a map, not an array"},
      {"dp_rank a string", Packer().Array(3).F64(1).Array(0).Str("0").bytes(),
       "dp_rank is a string, not an integer"},
      {"dp_rank too big", Packer().Array(3).F64(1).Array(0).U64(UINT64_MAX).bytes(),
       "dp_rank is 18446744073709551615, beyond int64"},
      {"event an integer", OneEvent([](Packer& p) { p.I64(3); }),
       "event 0 is an integer, not an array"},
      {"event empty", OneEvent([](Packer& p) { p.Array(0); }),
       "event 0: is an empty array (no tag)"},
      {"tag an integer", OneEvent([](Packer& p) { p.Array(1).I64(1); }),
       "event 0: the tag is an integer, not a string"},
      {"unknown tag", OneEvent([](Packer& p) { p.Array(1).Str("BlockMoved\n"); }),
       "event 0: unknown tag \"BlockMoved\\x0a\""},
      {"stored too short",
       OneEvent([](Packer& p) { p.Array(5).Str("BlockStored").Array(0).Nil().Array(0).I64(16); }),
       "event 0 (BlockStored): has 5 elements, expected 6 to 8"},
      {"stored too long", OneEvent([](Packer& p) {
         p.Array(9).Str("BlockStored").Array(0).Nil().Array(0).I64(16).Nil().Nil().Nil().Nil();
       }),
       "has 9 elements"},
      {"block_size a string", OneEvent([](Packer& p) {
         p.Array(7).Str("BlockStored").Array(0).Nil().Array(0).Str("16").Nil().Nil();
       }),
       "event 0 (BlockStored): block_size is a string, not an integer"},
      {"block_size negative", OneEvent([](Packer& p) {
         p.Array(7).Str("BlockStored").Array(0).Nil().Array(0).I64(-1).Nil().Nil();
       }),
       "block_size is -1, outside 0..1048576"},
      {"block_size huge", OneEvent([](Packer& p) {
         p.Array(7).Str("BlockStored").Array(0).Nil().Array(0).I64(1 << 21).Nil().Nil();
       }),
       "block_size is 2097152, outside 0..1048576"},
      {"hash a float", OneEvent([](Packer& p) {
         p.Array(7).Str("BlockStored").Array(2).U64(1).F64(2).Nil().Array(0).I64(16).Nil().Nil();
       }),
       "block_hashes[1] is a float, not an integer"},
      {"hash as bytes",
       OneEvent([](Packer& p) { p.Array(3).Str("BlockRemoved").Array(1).Bin("12345678").Nil(); }),
       "event 0 (BlockRemoved): block_hashes[0] is bytes"},
      {"hashes a map", OneEvent([](Packer& p) { p.Array(2).Str("BlockRemoved").Map(0); }),
       "block_hashes is a map, not an array"},
      {"parent a string", OneEvent([](Packer& p) {
         p.Array(7).Str("BlockStored").Array(0).Str("x").Array(0).I64(16).Nil().Nil();
       }),
       "parent_block_hash is a string, not an integer"},
      {"tokens nil", OneEvent([](Packer& p) {
         p.Array(7).Str("BlockStored").Array(0).Nil().Nil().I64(16).Nil().Nil();
       }),
       "token_ids is nil, not an array"},
      {"token beyond int32", OneEvent([](Packer& p) {
         p.Array(7)
             .Str("BlockStored")
             .Array(0)
             .Nil()
             .Array(1)
             .I64(int64_t{1} << 32)
             .I64(16)
             .Nil()
             .Nil();
       }),
       "token_ids[0] is 4294967296, beyond int32"},
      {"lora_id a string", OneEvent([](Packer& p) {
         p.Array(7).Str("BlockStored").Array(0).Nil().Array(0).I64(16).Str("a").Nil();
       }),
       "lora_id is a string, not an integer or nil"},
      {"lora_name an integer", OneEvent([](Packer& p) {
         p.Array(8).Str("BlockStored").Array(0).Nil().Array(0).I64(16).Nil().Nil().I64(1);
       }),
       "lora_name is an integer, not a string or nil"},
      {"unknown medium",
       OneEvent([](Packer& p) { p.Array(3).Str("BlockRemoved").Array(0).Str("HBM"); }),
       "event 0 (BlockRemoved): unknown medium \"HBM\""},
      {"medium an integer",
       OneEvent([](Packer& p) { p.Array(3).Str("BlockRemoved").Array(0).I64(0); }),
       "medium is an integer, not a string or nil"},
      {"removed too long",
       OneEvent([](Packer& p) { p.Array(4).Str("BlockRemoved").Array(0).Nil().Nil(); }),
       "has 4 elements, expected 2 or 3"},
      {"cleared with fields", OneEvent([](Packer& p) { p.Array(2).Str("AllBlocksCleared").Nil(); }),
       "event 0 (AllBlocksCleared): has 2 elements, expected 1"},
  };
  for (const Case& c : cases) {
    Result<KvEventBatch> r = DecodeBatch(c.bytes);
    ASSERT_FALSE(r.ok()) << c.name;
    EXPECT_EQ(r.status().code(), StatusCode::kCorruption) << c.name;
    EXPECT_EQ(r.status().message().rfind("kv event batch: ", 0), 0u)
        << c.name << ": " << r.status().message();
    EXPECT_NE(r.status().message().find(c.message), std::string::npos)
        << c.name << ": " << r.status().message();
  }
  // Every proper prefix of a valid batch is refused.
  for (size_t n = 0; n < valid.size(); ++n) {
    EXPECT_FALSE(DecodeBatch(valid.substr(0, n)).ok()) << "prefix of " << n << " bytes";
  }
}

TEST(KvEventCodec, RefusesMoreEventsOrBlocksThanTheLimits) {
  // Real elements (one byte each), so the bounds check passes and the limit is what refuses.
  Packer events;
  events.Array(2).F64(1).Array(kMaxBatchEvents + 1);
  events.Raw(std::string(kMaxBatchEvents + 1, '\x90'));
  Result<KvEventBatch> r = DecodeBatch(events.bytes());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("events has 1000001 events, more than 1000000"),
            std::string::npos)
      << r.status().message();

  Packer blocks;
  blocks.Array(2).F64(1).Array(1).Array(2).Str("BlockRemoved").Array(kMaxEventBlocks + 1);
  blocks.Raw(std::string(kMaxEventBlocks + 1, '\x01'));
  r = DecodeBatch(blocks.bytes());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("block_hashes has 1000001 blocks, more than 1000000"),
            std::string::npos)
      << r.status().message();
}

// A small in-test fuzzer: mutated valid batches never crash, and what is accepted re-encodes to
// something that decodes the same.
TEST(KvEventCodec, MutatedBatchesNeverCrash) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  int accepted = 0;
  for (int i = 0; i < 3000; ++i) {
    std::string bytes = EncodeBatch(RandomBatch(rng));
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int k = 0; k < edits && !bytes.empty(); ++k) {
      const size_t at = rng() % bytes.size();
      switch (rng() % 3) {
        case 0:
          bytes[at] = static_cast<char>(rng());
          break;
        case 1:
          bytes.erase(at, 1 + rng() % 4);
          break;
        default:
          bytes.insert(at, 1, static_cast<char>(rng()));
          break;
      }
    }
    Result<KvEventBatch> r = DecodeBatch(bytes);
    if (!r.ok()) continue;
    ++accepted;
    Result<KvEventBatch> again = DecodeBatch(EncodeBatch(*r));
    ASSERT_TRUE(again.ok()) << again.status().ToString();
    ASSERT_TRUE(SameOnWire(*r, *again));
  }
  RecordProperty("accepted", accepted);
}

TEST(MsgpackScan, AcceptsExactlyOneValue) {
  EXPECT_TRUE(ScanMsgpackValue("\x90", 8).ok());
  EXPECT_TRUE(ScanMsgpackValue(std::string("\x92\xc0\x81\xa1k\x00", 6), 8).ok());
  EXPECT_TRUE(ScanMsgpackValue("\xd6\xff\x01\x02\x03\x04", 8).ok());  // fixext 4
  EXPECT_TRUE(ScanMsgpackValue(std::string(8, '\x91') + '\x00', 8).ok());
  EXPECT_FALSE(ScanMsgpackValue(std::string(9, '\x91') + '\x00', 8).ok());
  EXPECT_FALSE(ScanMsgpackValue("", 8).ok());
  EXPECT_FALSE(ScanMsgpackValue("\x00\x00"s, 8).ok());
}

// ---- Mirror ---------------------------------------------------------------------------------

// The mirror against a std::set on random events; then a snapshot rebuilds it exactly.
TEST(KvBlockMirror, MatchesANaiveSetAndItsSnapshotRebuildsIt) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  KvBlockMirror mirror;
  BlockSet naive;
  for (int i = 0; i < 5000; ++i) {
    const auto medium = static_cast<KvMedium>(rng() % kKvMediums);
    std::vector<uint64_t> hashes(rng() % 5);
    for (auto& h : hashes) h = rng() % 500;  // small range: stores and removes collide
    const int k = static_cast<int>(rng() % 100);
    if (k == 0) {
      mirror.Apply(Cleared());
      naive.clear();
    } else if (k < 45) {
      mirror.Apply(Removed(medium, hashes));
      for (uint64_t h : hashes) naive.erase({static_cast<int>(medium), h});
    } else {
      mirror.Apply(Stored(medium, hashes, std::nullopt, 16 << (rng() % 2)));
      for (uint64_t h : hashes) naive.insert({static_cast<int>(medium), h});
    }
    ASSERT_EQ(mirror.size(), naive.size());
  }
  EXPECT_EQ(ToSet(mirror.Blocks()), naive);
  for (const auto& [m, h] : naive) EXPECT_TRUE(mirror.Contains(static_cast<KvMedium>(m), h));

  const std::vector<KvEvent> snapshot = mirror.SnapshotEvents();
  ASSERT_FALSE(snapshot.empty());
  EXPECT_EQ(snapshot[0].kind, KvEvent::Kind::kAllCleared);
  KvBlockMirror rebuilt;
  rebuilt.Apply(Stored(KvMedium::kRam, {123456789}, std::nullopt, 16));  // wiped by the snapshot
  for (const KvEvent& e : snapshot) rebuilt.Apply(e);
  EXPECT_EQ(ToSet(rebuilt.Blocks()), naive);
  // Block sizes survive too.
  std::map<std::pair<int, uint64_t>, int32_t> sizes, rebuilt_sizes;
  for (const KvBlockRef& b : mirror.Blocks())
    sizes[{static_cast<int>(b.medium), b.hash}] = b.block_size;
  for (const KvBlockRef& b : rebuilt.Blocks()) {
    rebuilt_sizes[{static_cast<int>(b.medium), b.hash}] = b.block_size;
  }
  EXPECT_EQ(sizes, rebuilt_sizes);
}

TEST(KvBlockMirror, StopsAtItsCapAndCountsWhatItDidNotKeep) {
  KvBlockMirror mirror(3);
  mirror.Apply(Stored(KvMedium::kMemory, {1, 2}, std::nullopt, 16));
  mirror.Apply(Stored(KvMedium::kDisk, {3, 4, 5}, std::nullopt, 256));
  EXPECT_EQ(mirror.size(), 3u);
  EXPECT_EQ(mirror.truncated(), 2u);
  mirror.Apply(Stored(KvMedium::kMemory, {1}, std::nullopt, 16));  // already held: no change
  EXPECT_EQ(mirror.truncated(), 2u);
  mirror.Apply(Removed(KvMedium::kMemory, {1}));
  mirror.Apply(Stored(KvMedium::kRedis, {9}, std::nullopt, 256));
  EXPECT_TRUE(mirror.Contains(KvMedium::kRedis, 9));
  EXPECT_EQ(mirror.size(), 3u);
}

// ---- Publisher and subscriber ---------------------------------------------------------------

// What a subscriber's callback rebuilds, checked against the publisher's mirror.
class SubscriberState {
 public:
  KvEventCallback Callback() {
    return [this](const KvEventBatch& batch, bool reset) {
      std::lock_guard<std::mutex> lock(mu_);
      if (reset) mirror_.Clear();
      for (const KvEvent& e : batch.events) mirror_.Apply(e);
    };
  }
  BlockSet Blocks() const {
    std::lock_guard<std::mutex> lock(mu_);
    return ToSet(mirror_.Blocks());
  }

 private:
  mutable std::mutex mu_;
  KvBlockMirror mirror_;
};

KvEventPublisherOptions LocalPublisher() {
  KvEventPublisherOptions o;
  o.endpoint = "tcp://127.0.0.1:0";
  o.replay_endpoint = "tcp://127.0.0.1:0";
  o.flush_interval_ms = 1;
  return o;
}

KvEventSubscriberOptions SubscriberFor(const KvEventPublisher& pub) {
  KvEventSubscriberOptions o;
  o.endpoint = pub.endpoint();
  o.replay_endpoint = pub.replay_endpoint();
  o.idle_probe_ms = 100;  // finds a lost last batch quickly
  return o;
}

// Emits random stores and removes, one Flush (one batch) per round.
class Workload {
 public:
  explicit Workload(uint64_t seed) : rng_(seed) {}

  void Round(KvEventPublisher& pub) {
    const int n = 1 + static_cast<int>(rng_() % 4);
    for (int i = 0; i < n; ++i) {
      const auto medium = static_cast<KvMedium>(rng_() % kKvMediums);
      auto& held = held_[static_cast<int>(medium)];
      if (!held.empty() && rng_() % 3 == 0) {
        std::vector<uint64_t> gone;
        for (auto it = held.begin(); it != held.end() && gone.size() < 3; ++it) gone.push_back(*it);
        for (uint64_t h : gone) held.erase(h);
        pub.Emit(Removed(medium, gone));
      } else {
        std::vector<uint64_t> hashes(1 + rng_() % 4);
        for (auto& h : hashes) {
          h = rng_();
          held.insert(h);
        }
        pub.Emit(Stored(medium, hashes, std::nullopt, 16, {}));
      }
      ++emitted_;
    }
    pub.Flush();
  }
  uint64_t emitted() const { return emitted_; }

 private:
  std::mt19937_64 rng_;
  std::set<uint64_t> held_[kKvMediums];
  uint64_t emitted_ = 0;
};

// Waits until the subscriber has applied the publisher's last batch and holds its blocks.
::testing::AssertionResult CaughtUp(const KvEventPublisher& pub, const KvEventSubscriber& sub,
                                    const SubscriberState& state) {
  const bool ok = WaitFor([&] {
    return sub.synced() && sub.stats().last_seq == pub.stats().last_seq &&
           state.Blocks() == ToSet(pub.MirrorBlocks());
  });
  if (ok) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "subscriber at seq " << sub.stats().last_seq << " (synced " << sub.synced() << ", "
         << state.Blocks().size() << " blocks), publisher at " << pub.stats().last_seq << " ("
         << pub.MirrorBlocks().size() << " blocks)";
}

TEST(KvEventPubSub, EventsArriveInOrderAndTheStateMatchesTheMirror) {
  auto pub = KvEventPublisher::Start(LocalPublisher());
  ASSERT_TRUE(pub.ok()) << pub.status().ToString();
  EXPECT_NE((*pub)->endpoint().find("tcp://127.0.0.1:"), std::string::npos);
  EXPECT_EQ((*pub)->endpoint().find(":0"), std::string::npos) << (*pub)->endpoint();

  SubscriberState state;
  auto sub = KvEventSubscriber::Start(SubscriberFor(**pub), state.Callback());
  ASSERT_TRUE(sub.ok()) << sub.status().ToString();
  ASSERT_TRUE(WaitFor([&] { return (*sub)->synced(); }));

  const uint64_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Workload work(seed);
  for (int i = 0; i < 200; ++i) work.Round(**pub);
  ASSERT_TRUE(CaughtUp(**pub, **sub, state));
  const KvEventSubscriberStats s = (*sub)->stats();
  // A round's events may straddle the 1 ms flush timer: at least one batch per round.
  EXPECT_GE((*pub)->stats().batches, 200u);
  EXPECT_EQ((*pub)->stats().events, work.emitted());
  EXPECT_EQ(s.malformed, 0u);
  EXPECT_GE(s.snapshots, 1u);
}

TEST(KvEventPubSub, ALateSubscriberGetsTheStateBySnapshot) {
  auto pub = KvEventPublisher::Start(LocalPublisher());
  ASSERT_TRUE(pub.ok()) << pub.status().ToString();
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Workload work(seed);
  for (int i = 0; i < 100; ++i) work.Round(**pub);
  ASSERT_GE((*pub)->stats().last_seq, 99);

  SubscriberState state;
  auto sub = KvEventSubscriber::Start(SubscriberFor(**pub), state.Callback());
  ASSERT_TRUE(sub.ok()) << sub.status().ToString();
  ASSERT_TRUE(CaughtUp(**pub, **sub, state));
  EXPECT_EQ((*sub)->stats().snapshots, 1u);
  EXPECT_EQ((*pub)->stats().snapshots, 1u);
  // And it follows the stream from there.
  for (int i = 0; i < 20; ++i) work.Round(**pub);
  ASSERT_TRUE(CaughtUp(**pub, **sub, state));
}

TEST(KvEventPubSub, AGapIsFilledByReplay) {
  auto pub = KvEventPublisher::Start(LocalPublisher());
  ASSERT_TRUE(pub.ok()) << pub.status().ToString();
  SubscriberState state;
  KvEventSubscriberOptions o = SubscriberFor(**pub);
  o.test_drop_pub = [](int64_t seq) { return seq % 7 == 3; };
  auto sub = KvEventSubscriber::Start(o, state.Callback());
  ASSERT_TRUE(sub.ok()) << sub.status().ToString();
  ASSERT_TRUE(WaitFor([&] { return (*sub)->synced(); }));

  const uint64_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Workload work(seed);
  for (int i = 0; i < 150; ++i) work.Round(**pub);
  ASSERT_TRUE(CaughtUp(**pub, **sub, state));
  const KvEventSubscriberStats s = (*sub)->stats();
  EXPECT_GT(s.gaps, 0u);
  EXPECT_GT(s.replays, 0u);
  EXPECT_GT((*pub)->stats().replays, 0u);
  EXPECT_EQ(s.snapshots, 1u) << "only the first: every gap was within the replay buffer";
}

TEST(KvEventPubSub, AGapOlderThanTheReplayBufferIsResolvedBySnapshot) {
  KvEventPublisherOptions po = LocalPublisher();
  po.replay_buffer_batches = 4;
  auto pub = KvEventPublisher::Start(po);
  ASSERT_TRUE(pub.ok()) << pub.status().ToString();
  SubscriberState state;
  KvEventSubscriberOptions o = SubscriberFor(**pub);
  o.test_drop_pub = [](int64_t seq) { return seq >= 10 && seq < 30; };
  auto sub = KvEventSubscriber::Start(o, state.Callback());
  ASSERT_TRUE(sub.ok()) << sub.status().ToString();
  ASSERT_TRUE(WaitFor([&] { return (*sub)->synced(); }));

  const uint64_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Workload work(seed);
  for (int i = 0; i < 40; ++i) work.Round(**pub);
  ASSERT_TRUE(CaughtUp(**pub, **sub, state));
  EXPECT_GT((*sub)->stats().gaps, 0u);
  EXPECT_GE((*sub)->stats().snapshots, 2u);
  EXPECT_GE((*pub)->stats().snapshots, 2u);
}

TEST(KvEventPubSub, ARestartedPublisherIsResynchronised) {
  auto first = KvEventPublisher::Start(LocalPublisher());
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  KvEventPublisherOptions same = LocalPublisher();
  same.endpoint = (*first)->endpoint();
  same.replay_endpoint = (*first)->replay_endpoint();
  SubscriberState state;
  auto sub = KvEventSubscriber::Start(SubscriberFor(**first), state.Callback());
  ASSERT_TRUE(sub.ok()) << sub.status().ToString();
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Workload work(seed);
  for (int i = 0; i < 30; ++i) work.Round(**first);
  ASSERT_TRUE(CaughtUp(**first, **sub, state));

  first->reset();  // the server goes away; a new one binds the same endpoints, seq from 0
  Result<std::unique_ptr<KvEventPublisher>> second = Unavailable("not started");
  ASSERT_TRUE(WaitFor([&] {
    second = KvEventPublisher::Start(same);
    return second.ok();
  })) << second.status().ToString();
  Workload other(seed + 1);
  for (int i = 0; i < 5; ++i) other.Round(**second);
  ASSERT_TRUE(CaughtUp(**second, **sub, state));
  // Whichever noticed first (the idle probe, answered with a snapshot because its start_seq is
  // past the new publisher's last, or the SUB's new connection), both happen, and the view
  // stays right through the second resync.
  EXPECT_TRUE(WaitFor([&] { return (*sub)->stats().reconnects >= 1; }));
  other.Round(**second);
  ASSERT_TRUE(CaughtUp(**second, **sub, state));
}

TEST(KvEventPublisher, BindErrorsNameTheEndpoint) {
  auto first = KvEventPublisher::Start(LocalPublisher());
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  KvEventPublisherOptions o = LocalPublisher();
  o.endpoint = (*first)->endpoint();
  auto second = KvEventPublisher::Start(o);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), StatusCode::kUnavailable);
  EXPECT_EQ(second.status().message(),
            "kv events: cannot bind " + (*first)->endpoint() + ": Address already in use");

  o.endpoint = "bogus://x";
  second = KvEventPublisher::Start(o);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(second.status().message().find("cannot bind bogus://x"), std::string::npos);
}

TEST(KvEventPublisher, AFullQueueDropsAndCounts) {
  KvEventPublisherOptions o = LocalPublisher();
  o.max_queue_events = 10;
  o.flush_interval_ms = 60'000;  // nothing leaves the queue until Flush
  auto pub = KvEventPublisher::Start(o);
  ASSERT_TRUE(pub.ok()) << pub.status().ToString();
  for (uint64_t i = 0; i < 25; ++i) (*pub)->Emit(Stored(KvMedium::kMemory, {i}, std::nullopt, 16));
  (*pub)->Flush();
  const KvEventPublisherStats s = (*pub)->stats();
  EXPECT_EQ(s.dropped, 15u);
  EXPECT_EQ(s.events, 10u);
  EXPECT_EQ(s.batches, 1u);
  EXPECT_EQ(s.mirror_blocks, 10u);
}

TEST(KvEventPublisher, SplitsEventsBeyondTheReadersLimits) {
  auto pub = KvEventPublisher::Start(LocalPublisher());
  ASSERT_TRUE(pub.ok()) << pub.status().ToString();
  std::vector<uint64_t> hashes(kMaxEventBlocks + 5);
  for (size_t i = 0; i < hashes.size(); ++i) hashes[i] = i + 1;
  (*pub)->Emit(Stored(KvMedium::kRam, hashes, std::nullopt, 256));
  KvEvent bad = Stored(KvMedium::kRam, {1}, std::nullopt, -4);
  (*pub)->Emit(bad);
  (*pub)->Flush();
  const KvEventPublisherStats s = (*pub)->stats();
  EXPECT_EQ(s.events, 2u);
  EXPECT_EQ(s.invalid, 1u);
  EXPECT_EQ(s.mirror_blocks, hashes.size());
}

// A raw DEALER speaking vLLM's replay framing to the publisher.
class RawDealer {
 public:
  explicit RawDealer(const std::string& endpoint) {
    ctx_ = zmq_ctx_new();
    socket_ = zmq_socket(ctx_, ZMQ_DEALER);
    int zero = 0;
    zmq_setsockopt(socket_, ZMQ_LINGER, &zero, sizeof(zero));
    int timeout_ms = 2000;
    zmq_setsockopt(socket_, ZMQ_RCVTIMEO, &timeout_ms, sizeof(timeout_ms));
    zmq_connect(socket_, endpoint.c_str());
  }
  ~RawDealer() {
    zmq_close(socket_);
    zmq_ctx_term(ctx_);
  }
  // Sends [empty, start_seq]; returns the answer's (seq, payload) messages, end marker included.
  std::vector<std::pair<int64_t, std::string>> Ask(int64_t start_seq) {
    const std::string seq = EncodeSeq(start_seq);
    zmq_send(socket_, "", 0, ZMQ_SNDMORE);
    zmq_send(socket_, seq.data(), seq.size(), 0);
    std::vector<std::pair<int64_t, std::string>> answer;
    while (true) {
      std::vector<std::string> frames;
      int more = 1;
      while (more) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, socket_, 0) < 0) {
          zmq_msg_close(&m);
          return answer;  // timed out: the caller sees what came
        }
        frames.emplace_back(static_cast<const char*>(zmq_msg_data(&m)), zmq_msg_size(&m));
        more = zmq_msg_more(&m);
        zmq_msg_close(&m);
      }
      EXPECT_EQ(frames.size(), 3u);
      if (frames.size() != 3) return answer;
      EXPECT_TRUE(frames[0].empty());
      const int64_t s = DecodeSeq(frames[1]).value_or(-100);
      answer.emplace_back(s, frames[2]);
      if (s == kEndOfAnswerSeq) return answer;
    }
  }

 private:
  void* ctx_;
  void* socket_;
};

TEST(KvEventPublisher, AnswersReplaysAndSnapshotsInVllmFraming) {
  KvEventPublisherOptions o = LocalPublisher();
  o.replay_buffer_batches = 3;
  o.dp_rank = 2;
  auto pub = KvEventPublisher::Start(o);
  ASSERT_TRUE(pub.ok()) << pub.status().ToString();
  RawDealer dealer((*pub)->replay_endpoint());

  // Before anything is published: a snapshot of nothing, "before the first" (-3).
  auto answer = dealer.Ask(kSnapshotRequestSeq);
  ASSERT_EQ(answer.size(), 2u);
  EXPECT_EQ(answer[0].first, kSnapshotBeforeFirstSeq);
  EXPECT_EQ(answer[1], std::make_pair(kEndOfAnswerSeq, std::string()));
  // Asking for seq 0 before it exists: just the end marker.
  answer = dealer.Ask(0);
  ASSERT_EQ(answer.size(), 1u);
  EXPECT_EQ(answer[0].first, kEndOfAnswerSeq);

  for (uint64_t i = 0; i < 5; ++i) {
    (*pub)->Emit(Stored(KvMedium::kMemory, {100 + i}, std::nullopt, 16));
    (*pub)->Flush();
  }
  // Seqs 2..4 are buffered: a replay from 3 is 3, 4, end.
  answer = dealer.Ask(3);
  ASSERT_EQ(answer.size(), 3u);
  EXPECT_EQ(answer[0].first, 3);
  EXPECT_EQ(answer[1].first, 4);
  EXPECT_EQ(answer[2].first, kEndOfAnswerSeq);
  Result<KvEventBatch> b = DecodeBatch(answer[1].second);
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  EXPECT_EQ(b->dp_rank, std::optional<int64_t>(2));
  ASSERT_EQ(b->events.size(), 1u);
  EXPECT_EQ(b->events[0].block_hashes, std::vector<uint64_t>{104});

  // From 1 (no longer buffered): a snapshot at seq 4, AllBlocksCleared then the five blocks.
  for (int64_t start : {int64_t{1}, kSnapshotRequestSeq, int64_t{9}}) {
    answer = dealer.Ask(start);
    ASSERT_EQ(answer.size(), 2u) << start;
    EXPECT_EQ(answer[0].first, 4) << start;
    b = DecodeBatch(answer[0].second);
    ASSERT_TRUE(b.ok()) << b.status().ToString();
    ASSERT_EQ(b->events.size(), 2u);
    EXPECT_EQ(b->events[0].kind, KvEvent::Kind::kAllCleared);
    std::set<uint64_t> hashes(b->events[1].block_hashes.begin(), b->events[1].block_hashes.end());
    EXPECT_EQ(hashes, (std::set<uint64_t>{100, 101, 102, 103, 104}));
    EXPECT_EQ(b->events[1].block_size, 16);
  }
  EXPECT_EQ((*pub)->stats().snapshots, 4u);
  EXPECT_EQ((*pub)->stats().replays, 2u);
}

// A publisher the test speaks by hand: its own PUB and ROUTER, so it can send what a broken or
// hostile publisher would.
class FakePublisher {
 public:
  FakePublisher() {
    ctx_ = zmq_ctx_new();
    pub_ = zmq_socket(ctx_, ZMQ_PUB);
    router_ = zmq_socket(ctx_, ZMQ_ROUTER);
    int zero = 0;
    zmq_setsockopt(pub_, ZMQ_LINGER, &zero, sizeof(zero));
    zmq_setsockopt(router_, ZMQ_LINGER, &zero, sizeof(zero));
    EXPECT_EQ(zmq_bind(pub_, "tcp://127.0.0.1:0"), 0);
    EXPECT_EQ(zmq_bind(router_, "tcp://127.0.0.1:0"), 0);
    pub_endpoint_ = LastEndpoint(pub_);
    router_endpoint_ = LastEndpoint(router_);
  }
  ~FakePublisher() {
    zmq_close(pub_);
    zmq_close(router_);
    zmq_ctx_term(ctx_);
  }

  void Publish(const std::vector<std::string>& frames) { Send(pub_, frames); }

  // Answers snapshot requests for `for_ms`: with `answer(identity)`'s frames, each message
  // prefixed by the identity.
  using Answer = std::function<std::vector<std::vector<std::string>>()>;
  void Serve(int for_ms, const Answer& answer) {
    const auto until = std::chrono::steady_clock::now() + milliseconds(for_ms);
    while (std::chrono::steady_clock::now() < until) {
      zmq_pollitem_t item = {router_, 0, ZMQ_POLLIN, 0};
      if (zmq_poll(&item, 1, 5) <= 0) continue;
      std::vector<std::string> request = Receive(router_);
      ++requests;
      if (request.size() != 3) continue;
      for (std::vector<std::string> message : answer()) {
        message.insert(message.begin(), request[0]);
        Send(router_, message);
      }
    }
  }

  KvEventSubscriberOptions SubscriberOptions() const {
    KvEventSubscriberOptions o;
    o.endpoint = pub_endpoint_;
    o.replay_endpoint = router_endpoint_;
    o.answer_timeout_ms = 200;
    o.idle_probe_ms = 0;
    return o;
  }

  int requests = 0;

 private:
  static std::string LastEndpoint(void* socket) {
    char buf[256];
    size_t size = sizeof(buf);
    zmq_getsockopt(socket, ZMQ_LAST_ENDPOINT, buf, &size);
    return std::string(buf, size - 1);
  }
  static void Send(void* socket, const std::vector<std::string>& frames) {
    for (size_t i = 0; i < frames.size(); ++i) {
      zmq_send(socket, frames[i].data(), frames[i].size(), i + 1 < frames.size() ? ZMQ_SNDMORE : 0);
    }
  }
  static std::vector<std::string> Receive(void* socket) {
    std::vector<std::string> frames;
    int more = 1;
    while (more) {
      zmq_msg_t m;
      zmq_msg_init(&m);
      if (zmq_msg_recv(&m, socket, 0) < 0) break;
      frames.emplace_back(static_cast<const char*>(zmq_msg_data(&m)), zmq_msg_size(&m));
      more = zmq_msg_more(&m);
      zmq_msg_close(&m);
    }
    return frames;
  }

  void* ctx_;
  void* pub_;
  void* router_;
  std::string pub_endpoint_, router_endpoint_;
};

TEST(KvEventSubscriber, RefusesMalformedMessagesAndResynchronises) {
  FakePublisher fake;
  SubscriberState state;
  auto sub = KvEventSubscriber::Start(fake.SubscriberOptions(), state.Callback());
  ASSERT_TRUE(sub.ok()) << sub.status().ToString();

  // The snapshot it serves: two blocks at seq 10.
  KvEventBatch snapshot;
  snapshot.events = {Cleared(), Stored(KvMedium::kMemory, {1, 2}, std::nullopt, 16)};
  const FakePublisher::Answer good = [&] {
    return std::vector<std::vector<std::string>>{{"", EncodeSeq(10), EncodeBatch(snapshot)},
                                                 {"", EncodeSeq(kEndOfAnswerSeq), ""}};
  };
  // First a malformed answer (a payload that is not a batch): refused, asked again later.
  const FakePublisher::Answer garbage = [] {
    return std::vector<std::vector<std::string>>{{"", EncodeSeq(10), "\xc1"}};
  };
  ASSERT_TRUE(WaitFor([&] {
    fake.Serve(10, garbage);
    return (*sub)->stats().malformed >= 1;
  }));
  EXPECT_FALSE((*sub)->synced());
  ASSERT_TRUE(WaitFor([&] {
    fake.Serve(10, good);
    return (*sub)->synced();
  }));
  EXPECT_EQ(state.Blocks(), (BlockSet{{0, 1}, {0, 2}}));
  const uint64_t malformed_answers = (*sub)->stats().malformed;

  const std::string topic = "kv-events";
  const std::vector<std::vector<std::string>> bad_messages = {
      {topic + "garbage"},                                      // one frame
      {topic, EncodeSeq(11)},                                   // two frames
      {topic, EncodeSeq(11), EncodeBatch(snapshot), "extra"},   // four frames
      {topic, "1234567", EncodeBatch(snapshot)},                // a 7-byte seq
      {topic, EncodeSeq(11), "\x92\xcb"},                       // a truncated payload
      {topic, EncodeSeq(11), std::string("\x81\xa1k\x00", 4)},  // msgpack, not a batch
  };
  for (size_t i = 0; i < bad_messages.size(); ++i) {
    SCOPED_TRACE("bad message " + std::to_string(i));
    const uint64_t before = (*sub)->stats().malformed;
    // Until the SUB is connected its messages go nowhere: send until one is refused.
    ASSERT_TRUE(WaitFor([&] {
      fake.Publish(bad_messages[i]);
      fake.Serve(20, good);
      return (*sub)->stats().malformed > before;
    }));
    ASSERT_TRUE(WaitFor([&] {
      fake.Serve(10, good);
      return (*sub)->synced();
    }));
    EXPECT_EQ(state.Blocks(), (BlockSet{{0, 1}, {0, 2}}));
  }
  // A good batch after all that is applied.
  KvEventBatch next;
  next.events = {Removed(KvMedium::kMemory, {1})};
  fake.Publish({topic, EncodeSeq(11), EncodeBatch(next)});
  EXPECT_TRUE(WaitFor([&] { return state.Blocks() == BlockSet{{0, 2}}; }));
  EXPECT_EQ((*sub)->stats().last_seq, 11);
  EXPECT_EQ((*sub)->stats().malformed, malformed_answers + bad_messages.size());
}

// vLLM's publisher has no snapshots: it answers start_seq -2 with the end marker alone.
TEST(KvEventSubscriber, FollowsAPublisherWithoutSnapshots) {
  FakePublisher fake;
  SubscriberState state;
  auto sub = KvEventSubscriber::Start(fake.SubscriberOptions(), state.Callback());
  ASSERT_TRUE(sub.ok()) << sub.status().ToString();
  const FakePublisher::Answer end_only = [] {
    return std::vector<std::vector<std::string>>{{"", EncodeSeq(kEndOfAnswerSeq), ""}};
  };
  ASSERT_TRUE(WaitFor([&] {
    fake.Serve(10, end_only);
    return (*sub)->synced();
  }));
  KvEventBatch b;
  b.events = {Stored(KvMedium::kMemory, {5}, std::nullopt, 16)};
  ASSERT_TRUE(WaitFor([&] {
    fake.Publish({"kv-events", EncodeSeq(57), EncodeBatch(b)});
    fake.Serve(10, end_only);
    return state.Blocks() == BlockSet{{0, 5}};
  }));
  EXPECT_EQ((*sub)->stats().last_seq, 57);
}

TEST(KvEventSubscriber, StartRefusesBadOptions) {
  KvEventSubscriberOptions o;
  auto sub = KvEventSubscriber::Start(o, [](const KvEventBatch&, bool) {});
  ASSERT_FALSE(sub.ok());
  EXPECT_EQ(sub.status().code(), StatusCode::kInvalidArgument);
  o.endpoint = "nonsense";
  sub = KvEventSubscriber::Start(o, [](const KvEventBatch&, bool) {});
  ASSERT_FALSE(sub.ok());
  EXPECT_NE(sub.status().message().find("cannot connect to nonsense"), std::string::npos)
      << sub.status().message();
}

}  // namespace
}  // namespace cachette::events
