#include "cache/record.h"

#include <gtest/gtest.h>

#include <cstring>

#include "cache/test_util.h"

namespace cachette::cache {
namespace {

using testing::Bytes;
using testing::SmallLayout;
using testing::Tokens;

struct Fixture {
  RecordMeta meta;
  std::vector<TokenId> tokens = Tokens(16, 1);
  std::vector<std::byte> payload;
  std::vector<std::byte> record;
  Fixture() {
    meta.ns = Hash128{11, 22};
    meta.parent = Hash128{33, 44};
    meta.layout = SmallLayout(16);
    meta.raw_bytes = meta.layout.raw_bytes();
    meta.chunk_index = 5;
    meta.key = ChainKey(meta.parent, meta.ns, tokens);
    payload = Bytes(meta.raw_bytes, 2);
    record = EncodeRecord(meta, tokens, payload).value();
  }
};

TEST(RecordTest, RoundTrip) {
  Fixture f;
  EXPECT_EQ(f.record.size(), RecordHeaderBytes(16) + f.payload.size());
  auto v = DecodeRecord(f.record);
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  EXPECT_EQ(v->header.meta, f.meta);
  EXPECT_EQ(v->header.tokens, f.tokens);
  ASSERT_EQ(v->payload.size(), f.payload.size());
  EXPECT_EQ(std::memcmp(v->payload.data(), f.payload.data(), f.payload.size()), 0);
  auto h = DecodeRecordHeader(ByteSpan(f.record).first(RecordHeaderBytes(16)), f.record.size());
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  EXPECT_EQ(h->meta, f.meta);
  EXPECT_EQ(RecordHeaderBytesNeeded(ByteSpan(f.record).first(16)), RecordHeaderBytes(16));
}

// Every KV type's layout survives a record (q4_0: ggml blocks of 32 in 18 bytes), an unknown
// kv_type or a head_dim that is not whole blocks does not.
TEST(RecordTest, RoundTripsEveryKvTypeAndRefusesUnknownOnes) {
  for (uint32_t kv_type : {0u, 1u, 2u, 3u, 4u, 5u}) {
    Fixture f;
    f.meta.layout.head_dim = 64;
    f.meta.layout.kv_type = kv_type;
    f.meta.raw_bytes = f.meta.layout.raw_bytes();
    f.payload = Bytes(f.meta.raw_bytes, 4);
    auto rec = EncodeRecord(f.meta, f.tokens, f.payload);
    ASSERT_TRUE(rec.ok()) << kv_type << ": " << rec.status().ToString();
    auto v = DecodeRecord(*rec);
    ASSERT_TRUE(v.ok()) << kv_type << ": " << v.status().ToString();
    EXPECT_EQ(v->header.meta, f.meta);
  }
  ChunkLayout q4 = SmallLayout(16);
  q4.head_dim = 64;
  q4.kv_type = 3;
  EXPECT_EQ(q4.head_bytes(), 36u);
  q4.head_dim = 48;
  EXPECT_EQ(q4.head_bytes(), 0u);
  q4.kv_type = 4;  // kivi4: blocks of 32 in 20 bytes
  q4.head_dim = 64;
  EXPECT_EQ(q4.head_bytes(), 40u);
  q4.head_dim = 48;
  EXPECT_EQ(q4.head_bytes(), 0u);
  q4.kv_type = 5;  // q4_1
  q4.head_dim = 64;
  EXPECT_EQ(q4.head_bytes(), 40u);
  q4.kv_type = 6;
  EXPECT_EQ(q4.head_bytes(), 0u);
}

TEST(RecordTest, ChainKeyMatchesComputeChunkKeys) {
  const Hash128 ns{1, 2};
  auto tokens = Tokens(48, 3);
  auto keys = ComputeChunkKeys(ns, tokens, 16);
  ASSERT_EQ(keys.size(), 3u);
  ChunkKey parent{};
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(ChainKey(parent, ns, std::span(tokens).subspan(16 * i, 16)), keys[i]);
    parent = keys[i];
  }
}

TEST(RecordTest, EncodeRefusesInconsistentMeta) {
  Fixture f;
  RecordMeta m = f.meta;
  m.key.lo ^= 1;
  EXPECT_EQ(EncodeRecord(m, f.tokens, f.payload).status().code(), StatusCode::kInvalidArgument);
  m = f.meta;
  m.raw_bytes += 1;
  EXPECT_EQ(EncodeRecord(m, f.tokens, f.payload).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(EncodeRecord(f.meta, f.tokens, ByteSpan(f.payload).first(10)).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(EncodeRecord(f.meta, {}, f.payload).status().code(), StatusCode::kInvalidArgument);
}

// Writes a little-endian u32/u64 at `off` and re-seals the header checksum, so the field check
// itself (not the checksum) is what must refuse the record.
void SetU32(std::vector<std::byte>& r, size_t off, uint32_t v, bool reseal) {
  for (int i = 0; i < 4; ++i) r[off + i] = static_cast<std::byte>(v >> (8 * i));
  if (!reseal) return;
  uint32_t n = 0;
  for (int i = 0; i < 4; ++i) n |= std::to_integer<uint32_t>(r[12 + i]) << (8 * i);
  const size_t checked = 120 + 4 * size_t{n};
  if (checked + 8 > r.size()) return;
  const uint64_t h = Hash64(ByteSpan(r.data(), checked));
  for (int i = 0; i < 8; ++i) r[checked + i] = static_cast<std::byte>(h >> (8 * i));
}
void SetU64(std::vector<std::byte>& r, size_t off, uint64_t v) {
  for (int i = 0; i < 8; ++i) r[off + i] = static_cast<std::byte>(v >> (8 * i));
  SetU32(r, 12, static_cast<uint32_t>(std::to_integer<uint32_t>(r[12]) |
                                      std::to_integer<uint32_t>(r[13]) << 8 |
                                      std::to_integer<uint32_t>(r[14]) << 16 |
                                      std::to_integer<uint32_t>(r[15]) << 24),
         true);
}

struct CorruptCase {
  const char* name;
  void (*mutate)(std::vector<std::byte>&);
  const char* field;  // expected in the message
};

const CorruptCase kCases[] = {
    {"empty", [](std::vector<std::byte>& r) { r.clear(); }, "record header"},
    {"short_header", [](std::vector<std::byte>& r) { r.resize(100); }, "record header"},
    {"magic", [](std::vector<std::byte>& r) { r[0] = std::byte{'X'}; }, "record magic"},
    {"version", [](std::vector<std::byte>& r) { r[4] = std::byte{3}; }, "record version"},
    {"version_2_without_aux", [](std::vector<std::byte>& r) { r[4] = std::byte{2}; },
     "record flags"},
    {"flags", [](std::vector<std::byte>& r) { r[6] = std::byte{1}; }, "record flags"},
    {"n_tokens_zero", [](std::vector<std::byte>& r) { SetU32(r, 12, 0, false); },
     "record n_tokens"},
    {"n_tokens_huge", [](std::vector<std::byte>& r) { SetU32(r, 12, 1u << 30, false); },
     "record n_tokens"},
    {"header_bytes", [](std::vector<std::byte>& r) { SetU32(r, 8, 999, false); },
     "record header_bytes"},
    {"header_truncated", [](std::vector<std::byte>& r) { r.resize(150); }, "record header"},
    {"header_checksum", [](std::vector<std::byte>& r) { r[20] ^= std::byte{1}; },
     "record header checksum"},
    {"token_flip", [](std::vector<std::byte>& r) { r[121] ^= std::byte{4}; },
     "record header checksum"},
    {"layout_n_tokens", [](std::vector<std::byte>& r) { SetU32(r, 84, 17, true); },
     "record layout"},
    {"layout_kv_type", [](std::vector<std::byte>& r) { SetU32(r, 88, 9, true); },
     "record layout"},
    {"layout_zero_layers", [](std::vector<std::byte>& r) { SetU32(r, 72, 0, true); },
     "record layout"},
    {"raw_bytes", [](std::vector<std::byte>& r) { SetU64(r, 96, 12345); }, "record raw_bytes"},
    {"key", [](std::vector<std::byte>& r) { SetU32(r, 32, 7, true); }, "record key"},
    {"namespace", [](std::vector<std::byte>& r) { SetU32(r, 16, 7, true); }, "record key"},
    {"parent", [](std::vector<std::byte>& r) { SetU32(r, 48, 7, true); }, "record key"},
    {"huge_payload_len", [](std::vector<std::byte>& r) { SetU64(r, 104, ~uint64_t{0}); },
     "record payload_bytes"},
    // Hostile lengths that a reader trusting them would allocate (regressions: each is refused
    // by its check before any buffer is sized from it).
    {"header_bytes_max_u32", [](std::vector<std::byte>& r) { SetU32(r, 8, ~0u, false); },
     "record header_bytes"},
    {"n_tokens_max_u32", [](std::vector<std::byte>& r) { SetU32(r, 12, ~0u, false); },
     "record n_tokens"},
    {"n_tokens_one_past_cap",
     [](std::vector<std::byte>& r) { SetU32(r, 12, kRecordMaxTokens + 1, false); },
     "record n_tokens"},
    {"layout_head_dim_max_u32", [](std::vector<std::byte>& r) { SetU32(r, 80, ~0u, true); },
     "record layout"},
    {"layout_n_layer_max_u32", [](std::vector<std::byte>& r) { SetU32(r, 72, ~0u, true); },
     "record layout"},
    {"layout_n_kv_head_max_u32", [](std::vector<std::byte>& r) { SetU32(r, 76, ~0u, true); },
     "record layout"},
    // A self-consistent layout of 2^46 bytes (f16): every dimension in range and raw_bytes
    // equal to it, so only the cap on raw_bytes stands between it and a 64 TiB decode buffer.
    {"raw_bytes_over_cap",
     [](std::vector<std::byte>& r) {
       ChunkLayout l;
       l.n_layer = 4096;
       l.n_kv_head = 4096;
       l.head_dim = 65536;
       l.n_tokens = 16;
       l.kv_type = std::to_integer<uint32_t>(r[88]);
       SetU32(r, 72, l.n_layer, false);
       SetU32(r, 76, l.n_kv_head, false);
       SetU32(r, 80, l.head_dim, false);
       SetU64(r, 96, l.raw_bytes());
     },
     "record raw_bytes"},
    {"raw_bytes_wraps_to_small", [](std::vector<std::byte>& r) { SetU64(r, 96, ~uint64_t{0}); },
     "record raw_bytes"},
    {"payload_truncated", [](std::vector<std::byte>& r) { r.resize(r.size() - 1); },
     "record payload"},
    {"trailing_bytes", [](std::vector<std::byte>& r) { r.push_back(std::byte{0}); },
     "record payload"},
    {"payload_flip", [](std::vector<std::byte>& r) { r.back() ^= std::byte{0x80}; },
     "record payload checksum"},
    {"payload_checksum", [](std::vector<std::byte>& r) { SetU64(r, 112, 1); },
     "record payload checksum"},
};

class RecordCorruptionTest : public ::testing::TestWithParam<CorruptCase> {};

TEST_P(RecordCorruptionTest, IsRefusedNamingTheField) {
  Fixture f;
  GetParam().mutate(f.record);
  auto v = DecodeRecord(f.record);
  ASSERT_FALSE(v.ok());
  EXPECT_EQ(v.status().code(), StatusCode::kCorruption) << v.status().ToString();
  EXPECT_NE(v.status().message().find(GetParam().field), std::string::npos)
      << v.status().ToString();
}

INSTANTIATE_TEST_SUITE_P(All, RecordCorruptionTest, ::testing::ValuesIn(kCases),
                         [](const auto& info) { return std::string(info.param.name); });

// A non-raw codec may store any payload length; the payload checks still hold.
TEST(RecordTest, NonRawCodecPayloadLength) {
  Fixture f;
  RecordMeta m = f.meta;
  m.codec_id = 1;
  auto small = Bytes(17, 9);
  auto r = EncodeRecord(m, f.tokens, small);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  auto v = DecodeRecord(*r);
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  EXPECT_EQ(v->payload.size(), 17u);
  EXPECT_EQ(v->header.meta.codec_id, 1u);
}

// However large the n_tokens a file claims, a reader asks for a bounded header prefix; and a
// prefix shorter than the header it claims is refused, not read past.
TEST(RecordTest, HeaderBytesNeededIsBoundedWhateverTheFileSays) {
  Fixture f;
  EXPECT_EQ(RecordHeaderBytesNeeded(f.record), RecordHeaderBytes(16));
  EXPECT_EQ(RecordHeaderBytesNeeded(ByteSpan(f.record).first(10)), RecordHeaderBytes(0));
  const uint64_t largest = RecordHeaderBytes(kRecordMaxTokens, kRecordMaxAuxBytes);
  for (uint32_t n : {static_cast<uint32_t>(largest), static_cast<uint32_t>(largest + 1),
                     1u << 31, ~0u}) {
    auto r = f.record;
    SetU32(r, 8, n, false);
    EXPECT_EQ(RecordHeaderBytesNeeded(r), largest) << n;
  }
  auto r = f.record;
  SetU32(r, 8, 3, false);
  EXPECT_EQ(RecordHeaderBytesNeeded(r), RecordHeaderBytes(0));
  auto h = DecodeRecordHeader(ByteSpan(f.record).first(RecordHeaderBytes(0)), f.record.size());
  ASSERT_FALSE(h.ok());
  EXPECT_EQ(h.status().code(), StatusCode::kInvalidArgument) << h.status().ToString();
  // A record size smaller than the header it claims is a truncated header.
  h = DecodeRecordHeader(f.record, RecordHeaderBytes(16) - 1);
  ASSERT_FALSE(h.ok());
  EXPECT_EQ(h.status().code(), StatusCode::kCorruption);
}

// Aux bytes (version 2) travel in the header: round trip, the header-only path, a bounded
// prefix, and a record without aux still written as version 1, byte for byte as before.
TEST(RecordTest, AuxBytesRoundTripAsVersion2) {
  Fixture f;
  EXPECT_EQ(std::to_integer<int>(f.record[4]), 1);
  RecordMeta m = f.meta;
  m.aux = Bytes(37, 8);
  auto rec = EncodeRecord(m, f.tokens, f.payload);
  ASSERT_TRUE(rec.ok()) << rec.status().ToString();
  EXPECT_EQ(std::to_integer<int>((*rec)[4]), 2);
  EXPECT_EQ(rec->size(), RecordHeaderBytes(16, 37) + f.payload.size());
  auto v = DecodeRecord(*rec);
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  EXPECT_EQ(v->header.meta, m);
  EXPECT_EQ(v->header.meta.aux, m.aux);
  EXPECT_EQ(std::memcmp(v->payload.data(), f.payload.data(), f.payload.size()), 0);
  EXPECT_EQ(RecordHeaderBytesNeeded(ByteSpan(*rec).first(16)), RecordHeaderBytes(16, 37));
  auto h = DecodeRecordHeader(ByteSpan(*rec).first(RecordHeaderBytes(16, 37)), rec->size());
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  EXPECT_EQ(h->meta.aux, m.aux);
  // Every flip and every truncation of the aux record is refused.
  for (size_t i = 0; i < RecordHeaderBytes(16, 37); ++i) {
    auto bad = *rec;
    bad[i] ^= std::byte{0x01};
    EXPECT_FALSE(DecodeRecord(bad).ok()) << "flip at byte " << i;
  }
  for (size_t n = 0; n < rec->size(); n += 7) {
    EXPECT_FALSE(DecodeRecord(ByteSpan(*rec).first(n)).ok()) << "truncated to " << n;
  }
  // An aux length that disagrees with header_bytes, with the checksum re-sealed.
  auto bad = *rec;
  const size_t at = 120 + 4 * 16;
  for (int i = 0; i < 4; ++i) bad[at + i] = static_cast<std::byte>(36 >> (8 * i));
  const uint64_t sum = Hash64(ByteSpan(bad.data(), RecordHeaderBytes(16, 37) - 8));
  for (int i = 0; i < 8; ++i) {
    bad[RecordHeaderBytes(16, 37) - 8 + i] = static_cast<std::byte>(sum >> (8 * i));
  }
  auto refused = DecodeRecord(bad);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("record aux"), std::string::npos)
      << refused.status().ToString();
  m.aux.assign(kRecordMaxAuxBytes + 1, std::byte{1});
  EXPECT_EQ(EncodeRecord(m, f.tokens, f.payload).status().code(), StatusCode::kInvalidArgument);
}

// Every single-byte flip of a record is refused (exhaustive over a small record).
TEST(RecordTest, EveryByteFlipIsDetected) {
  RecordMeta m;
  m.ns = Hash128{1, 1};
  auto tokens = Tokens(2, 4);
  m.layout = SmallLayout(2);
  m.raw_bytes = m.layout.raw_bytes();
  m.key = ChainKey(m.parent, m.ns, tokens);
  auto rec = EncodeRecord(m, tokens, Bytes(m.raw_bytes, 5)).value();
  for (size_t i = 0; i < rec.size(); ++i) {
    auto bad = rec;
    bad[i] ^= std::byte{0x10};
    EXPECT_FALSE(DecodeRecord(bad).ok()) << "flip at byte " << i;
  }
}

}  // namespace
}  // namespace cachette::cache
