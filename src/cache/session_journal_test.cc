#include "cache/session_journal.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <random>

#include "cache/test_util.h"

namespace cachette::cache {
namespace {

using testing::TempDir;

SessionRecord RandomRecord(std::mt19937_64& rng, size_t n) {
  SessionRecord r;
  r.digest = rng();
  r.ns = Hash128{rng(), rng()};
  r.updated_unix_ms = static_cast<int64_t>(rng() >> 20);
  r.expires_unix_ms = r.updated_unix_ms + 300000;
  r.tokens.resize(n);
  for (auto& t : r.tokens) t = static_cast<TokenId>(rng() % 150000);
  return r;
}

void ExpectSame(const SessionRecord& a, const SessionRecord& b) {
  EXPECT_EQ(a.digest, b.digest);
  EXPECT_EQ(a.ns, b.ns);
  EXPECT_EQ(a.updated_unix_ms, b.updated_unix_ms);
  EXPECT_EQ(a.expires_unix_ms, b.expires_unix_ms);
  EXPECT_EQ(a.tokens, b.tokens);
}

std::unique_ptr<SessionJournal> Open(const std::string& dir, bool read_only = false) {
  SessionJournalOptions o;
  o.dir = dir;
  o.read_only = read_only;
  o.sync = false;  // tests do not need durability against power loss
  auto j = SessionJournal::Open(o);
  EXPECT_TRUE(j.ok()) << j.status().ToString();
  return j.ok() ? std::move(j).value() : nullptr;
}

TEST(SessionRecordTest, RoundTripsOnFreshRandomRecords) {
  std::mt19937_64 rng(std::random_device{}());
  for (size_t n : {0, 1, 7, 4096}) {
    const SessionRecord r = RandomRecord(rng, n);
    const std::vector<std::byte> bytes = EncodeSessionRecord(r);
    EXPECT_EQ(bytes.size(), 64 + 4 * n);
    auto back = DecodeSessionRecord(bytes);
    ASSERT_TRUE(back.ok()) << back.status().ToString();
    ExpectSame(*back, r);
  }
}

TEST(SessionRecordTest, EveryTruncationAndByteFlipIsCorruptionNamingTheProblem) {
  std::mt19937_64 rng(7);
  const std::vector<std::byte> good = EncodeSessionRecord(RandomRecord(rng, 33));
  for (size_t n = 0; n < good.size(); ++n) {
    auto r = DecodeSessionRecord(ByteSpan(good.data(), n));
    ASSERT_FALSE(r.ok()) << n;
    EXPECT_EQ(r.status().code(), StatusCode::kCorruption);
  }
  for (size_t i = 0; i < good.size(); ++i) {
    std::vector<std::byte> bad = good;
    bad[i] ^= std::byte{0x10};
    auto r = DecodeSessionRecord(bad);
    ASSERT_FALSE(r.ok()) << i;
    EXPECT_EQ(r.status().code(), StatusCode::kCorruption);
  }
  std::vector<std::byte> bad = good;
  bad[0] = std::byte{'X'};
  EXPECT_NE(DecodeSessionRecord(bad).status().message().find("magic"), std::string::npos);
  bad = good;
  bad[4] = std::byte{9};
  EXPECT_NE(DecodeSessionRecord(bad).status().message().find("version 9"), std::string::npos);
  EXPECT_NE(DecodeSessionRecord(ByteSpan(good.data(), good.size() - 4)).status().message().find(
                "truncated"),
            std::string::npos);
  bad = good;
  bad[good.size() - 1] ^= std::byte{1};
  EXPECT_NE(DecodeSessionRecord(bad).status().message().find("checksum"), std::string::npos);
}

TEST(SessionRecordTest, DigestIsTheAdminApisAndTheFileNameCarriesIt) {
  EXPECT_EQ(SessionDigest64("user-42"), SessionDigest64("user-42"));
  EXPECT_NE(SessionDigest64("user-42"), SessionDigest64("user-43"));
  EXPECT_EQ(SessionFileName(0x00ab), "00000000000000ab.ses");
}

TEST(SessionJournalTest, PublishesTheLatestIntentPerSessionAndReadsItBack) {
  TempDir d;
  std::mt19937_64 rng(std::random_device{}());
  SessionRecord a = RandomRecord(rng, 100), b = RandomRecord(rng, 50);
  {
    auto j = Open(d.path());
    j->Write(a);
    SessionRecord a2 = a;
    a2.tokens.push_back(5);  // the next turn of a: replaces the first
    j->Write(a2);
    a = a2;
    j->Write(b);
    j->Remove(b.digest);  // b ended: no record
    j->Flush();
    auto scan = j->Scan();
    ASSERT_TRUE(scan.ok());
    ASSERT_EQ(scan->records.size(), 1u);
    ExpectSame(scan->records[0], a);
    j->Write(b);  // queued at destruction: still published
  }
  auto j = Open(d.path());
  auto scan = j->Scan();
  ASSERT_TRUE(scan.ok());
  EXPECT_EQ(scan->records.size(), 2u);
  EXPECT_EQ(j->write_errors(), 0u);
  EXPECT_TRUE(std::filesystem::exists(d.path() + "/sessions/" + SessionFileName(a.digest)));
}

TEST(SessionJournalTest, ScanRemovesTornRecordsAndTempFilesAndLeavesForeignOnes) {
  TempDir d;
  std::mt19937_64 rng(3);
  const SessionRecord a = RandomRecord(rng, 10), b = RandomRecord(rng, 10);
  {
    auto j = Open(d.path());
    j->Write(a);
    j->Write(b);
    j->Flush();
  }
  const std::string dir = d.path() + "/sessions/";
  std::filesystem::resize_file(dir + SessionFileName(b.digest), 30);  // torn
  std::ofstream(dir + "7.tmp") << "half";
  std::ofstream(dir + "README") << "not ours";
  // A valid record filed under another session's name is corruption too.
  std::filesystem::copy_file(dir + SessionFileName(a.digest), dir + SessionFileName(42));

  auto ro = Open(d.path(), /*read_only=*/true);
  auto scan = ro->Scan();
  ASSERT_TRUE(scan.ok());
  EXPECT_EQ(scan->records.size(), 1u);
  EXPECT_EQ(scan->corrupt, 2u);
  EXPECT_EQ(scan->foreign_files, 1u);
  EXPECT_EQ(scan->temp_files_removed, 0u);
  ASSERT_EQ(scan->problems.size(), 2u);
  EXPECT_NE(scan->problems[0].find("digest differs"), std::string::npos) << scan->problems[0];
  EXPECT_NE(scan->problems[1].find("truncated"), std::string::npos) << scan->problems[1];
  EXPECT_TRUE(std::filesystem::exists(dir + SessionFileName(b.digest)));  // read-only: kept

  auto j = Open(d.path());
  scan = j->Scan();
  ASSERT_TRUE(scan.ok());
  EXPECT_EQ(scan->records.size(), 1u);
  EXPECT_EQ(scan->corrupt, 2u);
  EXPECT_EQ(scan->temp_files_removed, 1u);
  EXPECT_FALSE(std::filesystem::exists(dir + SessionFileName(b.digest)));
  EXPECT_TRUE(std::filesystem::exists(dir + "README"));
  scan = j->Scan();
  EXPECT_EQ(scan->corrupt, 0u);
  EXPECT_EQ(scan->records.size(), 1u);
}

TEST(SessionJournalTest, ClearRemovesOneNamespaceOrAll) {
  TempDir d;
  std::mt19937_64 rng(5);
  SessionRecord a = RandomRecord(rng, 4), b = RandomRecord(rng, 4), c = RandomRecord(rng, 4);
  c.ns = a.ns;
  auto j = Open(d.path());
  j->Write(a);
  j->Write(b);
  j->Write(c);
  ASSERT_TRUE(j->Clear(&a.ns).ok());
  auto scan = j->Scan();
  ASSERT_EQ(scan->records.size(), 1u);
  EXPECT_EQ(scan->records[0].digest, b.digest);
  ASSERT_TRUE(j->Clear().ok());
  EXPECT_TRUE(j->Scan()->records.empty());
  auto ro = Open(d.path(), true);
  EXPECT_EQ(ro->Clear().code(), StatusCode::kInvalidArgument);
}

TEST(SessionJournalTest, ReadOnlyOpenOfADirectoryWithoutSessionsIsEmpty) {
  TempDir d;
  auto ro = Open(d.path(), true);
  auto scan = ro->Scan();
  ASSERT_TRUE(scan.ok()) << scan.status().ToString();
  EXPECT_TRUE(scan->records.empty());
  EXPECT_FALSE(std::filesystem::exists(d.path() + "/sessions"));
}

}  // namespace
}  // namespace cachette::cache
