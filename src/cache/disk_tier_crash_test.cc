// A real crash test of the disk tier: a forked writer process puts (and erases) chunk records
// in a loop and is killed with SIGKILL at a random moment; the directory is then reopened and
// every record that survives must read back byte-exact, what the writer left half-done must be
// cleaned up, and nothing may hang. Some rounds also damage a published file the way a torn
// write on another system would (truncation, a flipped payload byte), which must be detected,
// counted and removed, never served.
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <map>
#include <random>
#include <thread>

#include "cache/disk_tier.h"
#include "cache/test_util.h"

namespace cachette::cache {
namespace {

using testing::Bytes;
using testing::TempDir;
using testing::Tokens;

constexpr int kKeys = 48;

// 256 KiB records: big enough that a kill often lands inside write() or fdatasync().
ChunkLayout CrashLayout() {
  ChunkLayout l;
  l.n_layer = 4;
  l.n_kv_head = 2;
  l.head_dim = 64;
  l.n_tokens = 64;
  l.kv_type = 1;
  return l;
}

// What the writer intends to store under key i: a deterministic function of i, so the parent
// can tell a correct record from a wrong or stale one.
std::vector<std::byte> IntendedRecord(int i, ChunkKey* key) {
  const std::vector<TokenId> tokens = Tokens(64, 1000 + static_cast<uint32_t>(i));
  RecordMeta m;
  m.ns = Hash128{42, 43};
  m.layout = CrashLayout();
  m.raw_bytes = m.layout.raw_bytes();
  m.key = ChainKey(m.parent, m.ns, tokens);
  *key = m.key;
  return EncodeRecord(m, tokens, Bytes(m.raw_bytes, 77 + static_cast<uint32_t>(i))).value();
}

// The writer: never returns. Exit codes other than by SIGKILL are failures the parent reports.
[[noreturn]] void RunWriter(const std::string& dir, bool sync, uint32_t seed,
                            const std::vector<std::vector<std::byte>>& records,
                            const std::vector<ChunkKey>& keys) {
  DiskTierOptions o;
  o.dir = dir;
  o.sync = sync;
  auto t = DiskTier::Open(o);
  if (!t.ok()) ::_exit(3);
  std::minstd_rand rng(seed);
  for (int j = 0; j < 1000000; ++j) {
    const size_t k = rng() % keys.size();
    if (rng() % 8 == 0) {
      if (!(*t)->Erase(keys[k]).ok()) ::_exit(4);
    } else if (!(*t)->Put(keys[k], records[k]).ok()) {
      ::_exit(5);
    }
  }
  ::_exit(0);
}

// The published path of `key` (docs/formats/chunk.md), without opening the directory.
std::string PathFor(const std::string& dir, const ChunkKey& key) {
  const std::string hex = key.ToHex();
  return dir + "/chunks/" + hex.substr(0, 2) + "/" + hex + ".ctk";
}

size_t CountFilesIn(const std::string& dir) {
  size_t n = 0;
  for (auto& e : std::filesystem::directory_iterator(dir)) n += e.is_regular_file();
  return n;
}

TEST(DiskTierCrashTest, WriterKilledAtRandomMomentsLosesNothingItPublished) {
  TempDir d;
  std::vector<std::vector<std::byte>> records(kKeys);
  std::vector<ChunkKey> keys(kKeys);
  std::map<ChunkKey, int> index_of;
  for (int i = 0; i < kKeys; ++i) {
    records[i] = IntendedRecord(i, &keys[i]);
    index_of[keys[i]] = i;
  }
  std::mt19937 rng(20240611);
  const auto start = std::chrono::steady_clock::now();
  int rounds = 0;
  uint64_t temps_seen = 0, records_seen = 0, damaged = 0;
  for (; rounds < 30; ++rounds) {
    if (std::chrono::steady_clock::now() - start > std::chrono::seconds(8)) break;
    const bool sync = rounds % 2 == 0;
    const pid_t pid = ::fork();
    ASSERT_GE(pid, 0) << "fork failed";
    if (pid == 0) RunWriter(d.path(), sync, static_cast<uint32_t>(rng()), records, keys);
    // Let it write for 2..60 ms (the first rounds create the directory), then kill it.
    std::this_thread::sleep_for(std::chrono::microseconds(2000 + rng() % 58000));
    ASSERT_EQ(::kill(pid, SIGKILL), 0);
    int wstatus = 0;
    ASSERT_EQ(::waitpid(pid, &wstatus, 0), pid);
    ASSERT_TRUE(WIFSIGNALED(wstatus) && WTERMSIG(wstatus) == SIGKILL)
        << "round " << rounds << ": the writer exited by itself, status " << wstatus;

    const std::string tmp_dir = d.path() + "/tmp";
    if (!std::filesystem::exists(tmp_dir)) continue;  // killed before Open created it
    // A writer killed inside its first Open may leave FORMAT.tmp, which the next Open reuses
    // (rewrites and renames) rather than removes: only record temps count.
    const size_t temps =
        CountFilesIn(tmp_dir) - std::filesystem::exists(tmp_dir + "/FORMAT.tmp");
    temps_seen += temps;

    // Every third round, damage two published files as a torn write elsewhere would.
    ChunkKey flipped{};
    bool have_flipped = false;
    uint64_t truncated = 0;
    if (rounds % 3 == 2) {
      std::vector<ChunkKey> present;
      for (int i = 0; i < kKeys; ++i) {
        if (std::filesystem::exists(PathFor(d.path(), keys[i]))) present.push_back(keys[i]);
      }
      if (present.size() >= 2) {
        std::filesystem::resize_file(PathFor(d.path(), present[0]), records[0].size() / 2);
        truncated = 1;
        const std::string p = PathFor(d.path(), present[1]);
        int fd = ::open(p.c_str(), O_RDWR);
        ASSERT_GE(fd, 0);
        const char x = 0x5a;  // lands in the payload: only the full read can tell
        ASSERT_EQ(::pwrite(fd, &x, 1, static_cast<off_t>(records[0].size() - 100)), 1);
        ::close(fd);
        flipped = present[1];
        have_flipped = true;
        damaged += 2;
      }
    }

    DiskTierOptions o;
    o.dir = d.path();
    o.sync = false;
    auto t = DiskTier::Open(o);
    ASSERT_TRUE(t.ok()) << "round " << rounds << ": " << t.status().ToString();
    EXPECT_EQ(CountFilesIn(tmp_dir), 0u) << "round " << rounds;
    EXPECT_EQ((*t)->recovery().temp_files_removed, temps) << "round " << rounds;
    EXPECT_EQ((*t)->recovery().corrupt_removed, truncated) << "round " << rounds;
    EXPECT_EQ((*t)->recovery().foreign_files, 0u);
    const std::vector<DiskEntry> entries = (*t)->Entries();
    records_seen += entries.size();
    for (const DiskEntry& e : entries) {
      auto it = index_of.find(e.key);
      ASSERT_NE(it, index_of.end()) << "a record under a key the writer never used";
      auto got = (*t)->Get(e.key, NoDeadline());
      if (have_flipped && e.key == flipped) {
        EXPECT_EQ(got.status().code(), StatusCode::kCorruption);
        EXPECT_FALSE(std::filesystem::exists((*t)->PathOf(e.key)));
        continue;
      }
      ASSERT_TRUE(got.ok()) << "round " << rounds << ": " << got.status().ToString();
      EXPECT_TRUE(*got == records[it->second]) << "round " << rounds << ": record " << it->second
                                               << " differs from what the writer intended";
    }
    // Keys without a file are misses, never errors.
    for (int i = 0; i < kKeys; ++i) {
      if (std::filesystem::exists((*t)->PathOf(keys[i]))) continue;
      EXPECT_EQ((*t)->Get(keys[i], NoDeadline()).status().code(), StatusCode::kNotFound);
    }
    EXPECT_EQ((*t)->Stats().corruptions, truncated + (have_flipped ? 1 : 0));
  }  // the tier closes (and unlocks) before the next writer is forked
  EXPECT_GE(rounds, 10) << "too few rounds in the time budget";
  EXPECT_GT(records_seen, 0u) << "the writer never published anything: the test tests nothing";
  EXPECT_GT(damaged, 0u);
  std::printf("crash test: %d rounds, %llu records verified, %llu temp files cleaned\n", rounds,
              static_cast<unsigned long long>(records_seen),
              static_cast<unsigned long long>(temps_seen));
}

}  // namespace
}  // namespace cachette::cache
