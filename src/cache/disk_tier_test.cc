#include "cache/disk_tier.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "cache/test_util.h"

namespace cachette::cache {
namespace {

using testing::MakeRecord;
using testing::TempDir;
using testing::Tokens;

std::unique_ptr<DiskTier> OpenDir(const std::string& dir, uint64_t budget = 0,
                                  bool read_only = false) {
  DiskTierOptions o;
  o.dir = dir;
  o.budget_bytes = budget;
  o.sync = false;  // tests do not need durability against power loss
  o.read_only = read_only;
  auto t = DiskTier::Open(o);
  EXPECT_TRUE(t.ok()) << t.status().ToString();
  return t.ok() ? std::move(t).value() : nullptr;
}

size_t CountFiles(const std::string& dir) {
  size_t n = 0;
  for (auto& e : std::filesystem::recursive_directory_iterator(dir)) n += e.is_regular_file();
  return n;
}

TEST(DiskTierTest, PutGetEraseAndRecoveryAfterReopen) {
  TempDir d;
  ChunkKey k1, k2;
  auto r1 = MakeRecord(Hash128{1, 2}, Tokens(8, 1), 1, &k1);
  auto r2 = MakeRecord(Hash128{3, 4}, Tokens(8, 2), 2, &k2);
  {
    auto t = OpenDir(d.path());
    ASSERT_TRUE(t);
    EXPECT_EQ(t->Get(k1, NoDeadline()).status().code(), StatusCode::kNotFound);
    ASSERT_TRUE(t->Put(k1, r1).ok());
    ASSERT_TRUE(t->Put(k2, r2).ok());
    auto got = t->Get(k1, NoDeadline());
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    EXPECT_EQ(*got, r1);
    EXPECT_EQ(t->Stats().bytes_used, r1.size() + r2.size());
    // A second owner of the same directory is refused while the first holds it.
    DiskTierOptions o;
    o.dir = d.path();
    EXPECT_EQ(DiskTier::Open(o).status().code(), StatusCode::kUnavailable);
  }
  auto t = OpenDir(d.path());
  ASSERT_TRUE(t);
  EXPECT_EQ(t->recovery().records, 2u);
  EXPECT_EQ(t->Stats().bytes_used, r1.size() + r2.size());
  auto entries = t->Entries();
  ASSERT_EQ(entries.size(), 2u);
  auto got = t->Get(k2, NoDeadline());
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(*got, r2);
  const Hash128 ns1{1, 2};
  ASSERT_TRUE(t->Clear(&ns1).ok());
  EXPECT_EQ(t->Get(k1, NoDeadline()).status().code(), StatusCode::kNotFound);
  EXPECT_TRUE(t->Get(k2, NoDeadline()).ok());
  ASSERT_TRUE(t->Erase(k2).ok());
  EXPECT_EQ(t->Stats().bytes_used, 0u);
}

TEST(DiskTierTest, LevelRecordsAreFiledUnderTheirLevelKeyAndRecovered) {
  TempDir d;
  ChunkKey k;
  const auto rec = MakeRecord(Hash128{1, 2}, Tokens(8, 3), 3, &k);
  const ChunkKey level2 = LevelKey(k, 2);
  EXPECT_EQ(LevelKey(k, 0), k);
  EXPECT_NE(level2, k);
  EXPECT_NE(level2, LevelKey(k, 1));
  {
    auto t = OpenDir(d.path());
    ASSERT_TRUE(t);
    ASSERT_TRUE(t->Put(k, rec).ok());
    ASSERT_TRUE(t->Put(level2, rec).ok());  // the record keeps its own (the chunk's) key
    // Any other name is refused: a level key of another chunk, or one past the last level.
    EXPECT_EQ(t->Put(LevelKey(Hash128{5, 6}, 1), rec).code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(t->Put(LevelKey(k, kMaxChunkLevels + 1), rec).code(), StatusCode::kInvalidArgument);
    auto got = t->Get(level2, NoDeadline());
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    EXPECT_EQ(*got, rec);
  }
  auto t = OpenDir(d.path());
  ASSERT_TRUE(t);
  EXPECT_EQ(t->recovery().records, 2u);
  EXPECT_EQ(t->recovery().corrupt_removed, 0u);
  for (const DiskEntry& e : t->Entries()) {
    EXPECT_EQ(e.chunk, k);
    EXPECT_EQ(e.level, e.key == k ? 0 : 2);
    EXPECT_EQ(e.key == k || e.key == level2, true);
  }
  EXPECT_TRUE(t->Verify(level2).ok());
  const Hash128 ns{1, 2};
  ASSERT_TRUE(t->Clear(&ns).ok());
  EXPECT_EQ(CountFiles(d.path() + "/chunks"), 0u);
}
TEST(DiskTierTest, RefusesInvalidRecordsAndWrongKeys) {
  TempDir d;
  auto t = OpenDir(d.path());
  ChunkKey k;
  auto r = MakeRecord(Hash128{1, 2}, Tokens(8, 1), 1, &k);
  const ChunkKey wrong{5, 5};
  EXPECT_EQ(t->Put(wrong, r).code(), StatusCode::kInvalidArgument);
  r[0] = std::byte{0};
  EXPECT_EQ(t->Put(k, r).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(t->Stats().entries, 0u);
}

// Regression: Get sized its read buffer from the file as it found it, so a record file grown
// behind the tier's back (or replaced by a huge foreign file) was read whole into memory. The
// size is now checked against the index, which recorded it from a verified header.
TEST(DiskTierTest, FileThatGrewSinceIndexedIsCorruptionWithoutReadingIt) {
  TempDir d;
  ChunkKey k;
  auto r = MakeRecord(Hash128{1, 2}, Tokens(8, 1), 1, &k);
  auto t = OpenDir(d.path());
  ASSERT_TRUE(t->Put(k, r).ok());
  const std::string path = t->PathOf(k);
  // A sparse 1 GiB tail: cheap to make, and a buffer that size is what must not be allocated.
  ASSERT_EQ(::truncate(path.c_str(), off_t{1} << 30), 0);
  auto got = t->Get(k, NoDeadline());
  ASSERT_FALSE(got.ok());
  EXPECT_EQ(got.status().code(), StatusCode::kCorruption) << got.status().ToString();
  EXPECT_NE(got.status().message().find("its record was"), std::string::npos)
      << got.status().ToString();
  EXPECT_FALSE(std::filesystem::exists(path));  // removed and counted, as any corrupt record
  EXPECT_EQ(t->Stats().corruptions, 1u);
  EXPECT_EQ(t->Stats().entries, 0u);
  EXPECT_EQ(t->Get(k, NoDeadline()).status().code(), StatusCode::kNotFound);
  // Shrunk (truncated in place): also caught by size before the checksums run.
  ASSERT_TRUE(t->Put(k, r).ok());
  ASSERT_EQ(::truncate(path.c_str(), static_cast<off_t>(r.size() / 2)), 0);
  EXPECT_EQ(t->Get(k, NoDeadline()).status().code(), StatusCode::kCorruption);
  EXPECT_EQ(t->Stats().corruptions, 2u);
}

TEST(DiskTierTest, BudgetIsNeverExceeded) {
  TempDir d;
  ChunkKey k;
  auto r = MakeRecord(Hash128{1, 2}, Tokens(8, 0), 0, &k);
  const uint64_t budget = 3 * r.size() + 5;
  auto t = OpenDir(d.path(), budget);
  int refused = 0;
  for (uint32_t i = 0; i < 10; ++i) {
    auto ri = MakeRecord(Hash128{1, 2}, Tokens(8, i), i, &k);
    Status s = t->Put(k, ri);
    refused += s.code() == StatusCode::kResourceExhausted;
    EXPECT_LE(t->Stats().bytes_used, budget);
  }
  EXPECT_EQ(refused, 7);
}

// Simulated crash: a leftover temp file, a truncated record, a record with a flipped payload
// byte, one with a flipped header byte, and a foreign file. Reopening removes the temp file
// and the records whose header or size is bad; the payload flip is found by the first read.
// Nothing corrupt is ever served.
TEST(DiskTierTest, RecoveryAfterSimulatedCrash) {
  TempDir d;
  std::vector<ChunkKey> keys(5);
  std::vector<std::vector<std::byte>> recs;
  {
    auto t = OpenDir(d.path());
    for (uint32_t i = 0; i < 5; ++i) {
      recs.push_back(MakeRecord(Hash128{1, 2}, Tokens(8, i), i, &keys[i]));
      ASSERT_TRUE(t->Put(keys[i], recs[i]).ok());
    }
    std::ofstream(d.path() + "/tmp/" + keys[0].ToHex() + ".99.tmp") << "half a record";
    std::ofstream(d.path() + "/chunks/00/README") << "not ours";
    const std::string p1 = t->PathOf(keys[1]);
    ASSERT_EQ(::truncate(p1.c_str(), static_cast<off_t>(recs[1].size() - 3)), 0);
    auto flip = [](const std::string& path, off_t off) {
      int fd = ::open(path.c_str(), O_RDWR);
      ASSERT_GE(fd, 0);
      unsigned char c;
      ASSERT_EQ(::pread(fd, &c, 1, off), 1);
      c ^= 0x20;
      ASSERT_EQ(::pwrite(fd, &c, 1, off), 1);
      ::close(fd);
    };
    flip(t->PathOf(keys[2]), static_cast<off_t>(recs[2].size() - 1));  // payload
    flip(t->PathOf(keys[3]), 40);                                         // header
  }
  auto t = OpenDir(d.path());
  ASSERT_TRUE(t);
  const DiskRecovery& rec = t->recovery();
  EXPECT_EQ(rec.temp_files_removed, 1u);
  EXPECT_EQ(rec.corrupt_removed, 2u);  // truncated + header flip
  EXPECT_EQ(rec.foreign_files, 1u);
  EXPECT_EQ(rec.records, 3u);
  EXPECT_FALSE(std::filesystem::exists(t->PathOf(keys[1])));
  EXPECT_FALSE(std::filesystem::exists(t->PathOf(keys[3])));
  EXPECT_TRUE(std::filesystem::exists(d.path() + "/chunks/00/README"));
  // The payload flip: detected on read, counted, removed, never served.
  auto bad = t->Get(keys[2], NoDeadline());
  EXPECT_EQ(bad.status().code(), StatusCode::kCorruption);
  EXPECT_FALSE(std::filesystem::exists(t->PathOf(keys[2])));
  EXPECT_EQ(t->Get(keys[2], NoDeadline()).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(t->Stats().corruptions, 3u);
  for (int i : {0, 4}) {
    auto got = t->Get(keys[i], NoDeadline());
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    EXPECT_EQ(*got, recs[i]);
  }
  EXPECT_EQ(t->Stats().bytes_used, recs[0].size() + recs[4].size());
}

TEST(DiskTierTest, ReadOnlyInspectsWithoutChanging) {
  TempDir d;
  ChunkKey k;
  auto r = MakeRecord(Hash128{1, 2}, Tokens(8, 1), 1, &k);
  {
    auto t = OpenDir(d.path());
    ASSERT_TRUE(t->Put(k, r).ok());
    std::ofstream(d.path() + "/tmp/x.tmp") << "junk";
  }
  const size_t files = CountFiles(d.path());
  auto t = OpenDir(d.path(), 0, /*read_only=*/true);
  ASSERT_TRUE(t);
  EXPECT_EQ(t->Entries().size(), 1u);
  EXPECT_TRUE(t->Verify(k).ok());
  EXPECT_EQ(t->Put(k, r).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(CountFiles(d.path()), files);
  // Not a cache directory: refused, not created.
  TempDir empty;
  DiskTierOptions o;
  o.dir = empty.path();
  o.read_only = true;
  EXPECT_EQ(DiskTier::Open(o).status().code(), StatusCode::kNotFound);
}

TEST(DiskTierTest, RefusesAnotherFormat) {
  TempDir d;
  std::ofstream(d.path() + "/FORMAT") << "something else 7\n";
  DiskTierOptions o;
  o.dir = d.path();
  EXPECT_EQ(DiskTier::Open(o).status().code(), StatusCode::kInvalidArgument);
}

TEST(DiskTierTest, ParseKeyHexRoundTrip) {
  const ChunkKey k{0x0123456789abcdefull, 0xfedcba9876543210ull};
  ChunkKey back;
  ASSERT_TRUE(ParseKeyHex(k.ToHex(), &back));
  EXPECT_EQ(back, k);
  EXPECT_FALSE(ParseKeyHex("xyz", &back));
  EXPECT_FALSE(ParseKeyHex(std::string(32, 'G'), &back));
}

}  // namespace
}  // namespace cachette::cache
