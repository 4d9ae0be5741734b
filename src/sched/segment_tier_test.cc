// How segments are filed in the chunk store (segment_tier.h): the metadata codec refuses every
// malformed input naming the field; packing into chunks and back is exact for every length
// around the chunk boundaries; the chain tokens separate contexts, lengths, tenants and bands;
// a load in bands hands over its layers band by band (PendingSegments, prefix_source.h).
#include "sched/segment_tier.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <random>

#include "sched/prefix_source.h"

namespace cachette::sched {
namespace {

using kernels::KvType;

SegmentKv RandomSegment(int64_t n, uint32_t seed, KvType type = KvType::kF16) {
  std::mt19937 rng(seed);
  SegmentKv s;
  s.shape = KvShape{8, 2, 32, type};
  s.tokens.resize(static_cast<size_t>(n));
  for (auto& t : s.tokens) t = static_cast<TokenId>(rng() % 30000);
  s.base_pos = 17;
  s.context = (uint64_t{rng()} << 32) | rng();
  s.context_chunks = {5, 6, 7};
  s.inter.resize(static_cast<size_t>(n));
  for (auto& x : s.inter) x = static_cast<float>(rng() % 1000) / 1000.0f;
  s.cci = 0.625;
  const size_t bytes = static_cast<size_t>(n) * s.shape.token_bytes();
  for (int l = 0; l < s.shape.n_layer; ++l) {
    s.k.emplace_back(bytes);
    s.v.emplace_back(bytes);
    for (auto& b : s.k.back()) b = static_cast<std::byte>(rng());
    for (auto& b : s.v.back()) b = static_cast<std::byte>(rng());
  }
  return s;
}

ChunkLayout LayoutOf(const KvShape& shape, uint32_t chunk_tokens) {
  ChunkLayout l;
  l.n_layer = static_cast<uint32_t>(shape.n_layer);
  l.n_kv_head = static_cast<uint32_t>(shape.n_kv_head);
  l.head_dim = static_cast<uint32_t>(shape.head_dim);
  l.n_tokens = chunk_tokens;
  l.kv_type = static_cast<uint32_t>(shape.type);
  return l;
}

// ChunkData as a load returns them, over packed chunks.
std::vector<ChunkData> AsLoaded(const SegmentChunks& p, const ChunkLayout& layout) {
  std::vector<ChunkData> out(p.chunks.size());
  for (size_t i = 0; i < p.chunks.size(); ++i) {
    out[i].status = Status::Ok();
    out[i].layout = layout;
    out[i].bytes_ = ByteSpan(p.chunks[i]);
    out[i].aux = p.aux[i];
  }
  return out;
}

std::vector<const ChunkData*> Pointers(const std::vector<ChunkData>& c) {
  std::vector<const ChunkData*> out;
  for (const ChunkData& d : c) out.push_back(&d);
  return out;
}

TEST(SegmentTierTest, BandsCoverTheLayersInOrder) {
  EXPECT_EQ(SegmentBands(1).size(), 1u);
  for (int n_layer : {1, 2, 3, 5, 6, 7, 8, 24, 80}) {
    const std::vector<LayerBand> bands = SegmentBands(n_layer);
    ASSERT_EQ(bands.size(), static_cast<size_t>(std::min(n_layer, 6)));
    EXPECT_EQ(bands.front().end, 1);
    EXPECT_EQ(bands.back().first, n_layer - 1);
    int next = 0;
    for (const LayerBand& b : bands) {
      EXPECT_EQ(b.first, next);
      EXPECT_GT(b.end, b.first);
      EXPECT_LE(b.end - b.first, std::max(1, (n_layer - 2 + 3) / 4));
      next = b.end;
    }
    EXPECT_EQ(next, n_layer);
  }
}

TEST(SegmentTierTest, PackAndUnpackAreExactAroundChunkBoundaries) {
  const uint32_t C = 16;
  for (int64_t n : {1, 11, 12, 13, 28, 29, 40, 77}) {
    for (KvType type : {KvType::kF16, KvType::kQ8_0, KvType::kQ4_0}) {
      SegmentKv s = RandomSegment(n, static_cast<uint32_t>(n), type);
      const ChunkLayout full = LayoutOf(s.shape, C);
      const std::vector<LayerBand> bands = SegmentBands(s.shape.n_layer);
      ASSERT_EQ(bands.size(), 6u);  // 8 layers: [0,1) [1,2) [2,4) [4,5) [5,7) [7,8)
      SegmentKv back;
      std::vector<std::vector<ChunkData>> loaded;
      std::vector<SegmentChunks> packed;
      for (const LayerBand& band : bands) {
        const ChunkLayout layout = BandLayout(full, band);
        packed.push_back(PackSegment(s, layout, band));
        const SegmentChunks& p = packed.back();
        ASSERT_EQ(p.chunks.size(), static_cast<size_t>((4 + n + C - 1) / C)) << n;
        EXPECT_EQ(SegmentChainTokens(s.tokens, s.context, C, band).size(), p.chunks.size() * C);
        for (size_t i = 0; i + 1 < p.aux.size(); ++i) EXPECT_TRUE(p.aux[i].empty());
        // The leading slots of the first chunk are zeros.
        const size_t tb = s.shape.token_bytes();
        for (size_t b = 0; b < 4 * tb; ++b) ASSERT_EQ(p.chunks[0][b], std::byte{0});
        loaded.push_back(AsLoaded(p, layout));
        const Status st =
            UnpackSegmentBand(Pointers(loaded.back()), s.tokens, s.context, s.shape, band, back);
        ASSERT_TRUE(st.ok()) << st.ToString();
      }
      EXPECT_EQ(back.k, s.k) << n;
      EXPECT_EQ(back.v, s.v) << n;
      EXPECT_EQ(back.inter, s.inter);
      EXPECT_EQ(back.context_chunks, s.context_chunks);
      EXPECT_EQ(back.base_pos, s.base_pos);
      EXPECT_EQ(back.cci, s.cci);
      // Asked as another segment, with a chunk missing, as another band, or a later band before
      // the first, it is a miss.
      const auto miss = [&](std::span<const ChunkData* const> c, std::span<const TokenId> toks,
                            uint64_t context, const KvShape& shape, LayerBand band) {
        SegmentKv into;
        if (band.first > 0) {
          EXPECT_TRUE(UnpackSegmentBand(Pointers(loaded[0]), s.tokens, s.context, s.shape,
                                        bands[0], into)
                          .ok());
        }
        return !UnpackSegmentBand(c, toks, context, shape, band, into).ok();
      };
      std::vector<TokenId> other = s.tokens;
      other.push_back(1);
      EXPECT_TRUE(miss(Pointers(loaded[0]), other, s.context, s.shape, bands[0]));
      EXPECT_TRUE(miss(Pointers(loaded[0]), s.tokens, s.context + 1, s.shape, bands[0]));
      std::vector<const ChunkData*> fewer = Pointers(loaded[1]);
      fewer.pop_back();
      if (!fewer.empty()) {
        EXPECT_TRUE(miss(fewer, s.tokens, s.context, s.shape, bands[1]));
      }
      // Band 2 holds two layers: its chunks are not band 3's.
      EXPECT_TRUE(miss(Pointers(loaded[2]), s.tokens, s.context, s.shape, bands[3]));
      SegmentKv fresh;
      EXPECT_FALSE(UnpackSegmentBand(Pointers(loaded[1]), s.tokens, s.context, s.shape, bands[1],
                                     fresh)
                       .ok());
      KvShape wider = s.shape;
      wider.n_kv_head = 4;
      EXPECT_TRUE(miss(Pointers(loaded[0]), s.tokens, s.context, wider, bands[0]));
    }
  }
}

TEST(SegmentTierTest, ChainTokensSeparateContextsLengthsAndTenants) {
  const std::vector<TokenId> a = {5, 6, 7};
  const std::vector<TokenId> ab = {5, 6, 7, 8};
  const LayerBand b0{0, 2}, b1{2, 4};
  EXPECT_NE(SegmentChainTokens(a, 1, 4, b0)[0], SegmentChainTokens(a, 2, 4, b0)[0]);
  EXPECT_NE(SegmentChainTokens(a, uint64_t{1} << 32, 4, b0), SegmentChainTokens(a, 0, 4, b0));
  // A segment and a longer one, or two bands of one, differ in their first chunk already.
  const auto ka = SegmentChainTokens(a, 1, 8, b0);
  const auto kab = SegmentChainTokens(ab, 1, 8, b0);
  const auto ka1 = SegmentChainTokens(a, 1, 8, b1);
  EXPECT_FALSE(std::equal(ka.begin(), ka.begin() + 8, kab.begin()));
  EXPECT_FALSE(std::equal(ka.begin(), ka.begin() + 8, ka1.begin()));
  EXPECT_NE(SegmentNamespace(Hash128{1, 2}), SegmentNamespace(Hash128{1, 3}));
  EXPECT_NE(SegmentNamespace(Hash128{1, 2}), (Hash128{1, 2}));
}

TEST(SegmentTierTest, MetaRoundTripsAndRefusesMalformedInputNamingTheField) {
  const SegmentKv s = RandomSegment(9, 3);
  const std::vector<std::byte> meta = EncodeSegmentMeta(s);
  Result<SegmentMeta> m = DecodeSegmentMeta(meta);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_EQ(m->n_tokens, 9u);
  EXPECT_EQ(m->inter, s.inter);
  EXPECT_EQ(m->context_chunks, s.context_chunks);
  // Without a profile (a segment computed after nothing) it is shorter and still reads.
  SegmentKv bare = s;
  bare.inter.clear();
  bare.context_chunks.clear();
  ASSERT_TRUE(DecodeSegmentMeta(EncodeSegmentMeta(bare)).ok());

  auto refused = [](std::vector<std::byte> b, const char* field) {
    Result<SegmentMeta> r = DecodeSegmentMeta(b);
    ASSERT_FALSE(r.ok()) << field;
    EXPECT_EQ(r.status().code(), StatusCode::kCorruption);
    EXPECT_NE(r.status().message().find(field), std::string::npos) << r.status().ToString();
  };
  for (size_t n = 0; n < meta.size(); ++n) {
    refused(std::vector<std::byte>(meta.begin(), meta.begin() + n), "segment meta");
  }
  auto with = [&](size_t at, uint32_t v) {
    std::vector<std::byte> b = meta;
    for (int i = 0; i < 4; ++i) b[at + i] = static_cast<std::byte>(v >> (8 * i));
    return b;
  };
  refused(with(0, 0), "magic");
  refused(with(4, 2), "version");
  refused(with(20, 1), "reserved");
  refused(with(8, 0), "n_tokens");
  refused(with(8, 70000), "n_tokens");
  refused(with(12, 5000), "n_context_chunks");
  refused(with(16, 4), "n_inter");
  refused(with(28, 1u << 9), "base_pos");  // 2^41
  refused(with(44, 0x7ff80000), "cci");  // NaN
  refused(with(48 + 24, 0x7f800000), "inter");  // +inf
  std::vector<std::byte> longer = meta;
  longer.push_back(std::byte{0});
  refused(longer, "size");
}

// A load in bands as the pipeline sees it: layers become readable band by band, the time left is
// fitted from the bands in (a fixed cost per band plus one per layer; with one band in, all
// fixed), a lost band ends the wait and leaves nothing to take.
TEST(PendingSegmentsTest, LayersArriveBandByBandAndTheTimeLeftFollowsThePace) {
  using Clock = std::chrono::steady_clock;
  const SegmentRef ref{{5, 6, 7}, 9};
  PendingSegments p({ref}, {1, 4, 7, 8});
  EXPECT_FALSE(p.published());
  EXPECT_EQ(p.Found(ref.tokens, ref.context), nullptr);
  EXPECT_EQ(p.load_left_us(), 0);
  auto seg = std::make_shared<SegmentKv>();
  // Band 0 (1 layer) took 40 ms: with one band in, all of it counts as a cost per band, so the
  // three bands left take 3 x 40 ms (a low estimate).
  p.Publish({seg}, 40000);
  EXPECT_TRUE(p.published());
  EXPECT_EQ(p.Found(ref.tokens, ref.context), seg);
  EXPECT_EQ(p.Found(ref.tokens, ref.context + 1), nullptr);
  EXPECT_NEAR(p.load_left_us(), 120000, 10000);
  EXPECT_TRUE(p.AwaitLayer(0, Clock::now()).ok());
  EXPECT_EQ(p.AwaitLayer(1, Clock::now() + std::chrono::milliseconds(1)).code(),
            StatusCode::kDeadlineExceeded);
  // Band 1 (3 layers) took 100 ms: 10 ms a band and 30 a layer fit both, so bands 2 and 3 (3
  // layers and 1) take 100 + 40 ms more.
  p.Advance(140000);
  EXPECT_NEAR(p.load_left_us(), 140000, 10000);
  EXPECT_TRUE(p.AwaitLayer(3, Clock::now()).ok());
  EXPECT_TRUE(p.Take().empty()) << "not ready";
  p.Fail();
  EXPECT_EQ(p.AwaitLayer(4, Clock::now() + std::chrono::seconds(10)).code(),
            StatusCode::kUnavailable);
  EXPECT_EQ(p.load_left_us(), 0);
  p.Finish();
  const auto taken = p.Take();
  ASSERT_EQ(taken.size(), 1u);
  EXPECT_EQ(taken[0], nullptr) << "a band was lost";
}

}  // namespace
}  // namespace cachette::sched
