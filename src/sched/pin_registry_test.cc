// PinRegistry with a session journal: what is written when, and what a restart registers again.
#include "sched/pin_registry.h"

#include <gtest/gtest.h>

#include <numeric>

#include "cache/test_util.h"
#include "core/timer.h"
#include "sched/prefix_source.h"

namespace cachette::sched {
namespace {

constexpr int kP = 16;

KvManagerOptions Options(int64_t* clock) {
  KvManagerOptions o;
  o.shape = KvShape{2, 2, 32, kernels::KvType::kF16};
  o.page_tokens = kP;
  o.budget_bytes = PagePool::PageBytes(o.shape, kP) * 16;
  o.clock = [clock] { return *clock; };
  return o;
}

std::vector<TokenId> Iota(int n, int start = 0) {
  std::vector<TokenId> t(n);
  std::iota(t.begin(), t.end(), start);
  return t;
}

// A chunk store stand-in that records the pins the registry takes on it.
class RecordingSource final : public NoPrefixSource {
 public:
  uint64_t Pin(const Hash128& ns, std::span<const TokenId> tokens, int64_t ttl_ms) override {
    pins[next] = {ns, static_cast<int64_t>(tokens.size()), ttl_ms};
    return next++;
  }
  void Unpin(uint64_t pin) override { pins.erase(pin); }

  struct Held {
    Hash128 ns;
    int64_t tokens = 0;
    int64_t ttl_ms = 0;
  };
  std::map<uint64_t, Held> pins;
  uint64_t next = 1;
};

class PinRegistryJournalTest : public ::testing::Test {
 protected:
  void SetUp() override {
    kv_ = std::make_unique<KvManager>(Options(&now_ns_));
    cache::SessionJournalOptions o;
    o.dir = dir_.path();
    o.sync = false;
    journal_ = std::move(cache::SessionJournal::Open(o)).value();
  }
  // Caches `tokens` in the pool, as a finished turn leaves them.
  void Cache(const std::vector<TokenId>& tokens) {
    auto s = kv_->Start(ns_, tokens, 1000);
    ASSERT_TRUE(s->Reserve(static_cast<int64_t>(tokens.size())).ok());
    s->SetTokens(static_cast<int64_t>(tokens.size()));
    kv_->Finish(*s, tokens);
  }
  std::vector<cache::SessionRecord> Records() {
    journal_->Flush();
    return journal_->Scan()->records;
  }
  std::unique_ptr<PinRegistry> Registry(PinLimits limits = {}) {
    return std::make_unique<PinRegistry>(*kv_, limits, [this] { return now_ms_; }, &source_);
  }

  cache::testing::TempDir dir_;
  int64_t now_ns_ = 0, now_ms_ = 1000;
  std::unique_ptr<KvManager> kv_;
  std::unique_ptr<cache::SessionJournal> journal_;
  RecordingSource source_;
  const Hash128 ns_{7, 7};
};

TEST_F(PinRegistryJournalTest, EachTurnReplacesTheRecordAndAnEndedSessionErasesIt) {
  auto reg = Registry();
  reg->AttachJournal(journal_.get(), {}, UnixMillis());
  const auto turn1 = Iota(40), turn2 = Iota(70);
  Cache(turn1);
  const int64_t before = UnixMillis();
  auto info = reg->SetSession("agent-1", ns_, "", turn1, 60000);
  ASSERT_NE(info.id, 0u);
  EXPECT_EQ(info.digest, cache::SessionDigest64("agent-1"));
  auto recs = Records();
  ASSERT_EQ(recs.size(), 1u);
  EXPECT_EQ(recs[0].digest, info.digest);
  EXPECT_EQ(recs[0].ns, ns_);
  EXPECT_EQ(recs[0].tokens, turn1);
  EXPECT_GE(recs[0].expires_unix_ms, before + 60000);
  EXPECT_LE(recs[0].expires_unix_ms, UnixMillis() + 60000);

  Cache(turn2);
  reg->SetSession("agent-1", ns_, "", turn2, 60000);
  recs = Records();
  ASSERT_EQ(recs.size(), 1u);
  EXPECT_EQ(recs[0].tokens, turn2);

  // The scheduler's program pins are not clients' sessions: never journaled.
  reg->SetSession(std::string("\x01program:P"), ns_, "", turn1, 60000);
  EXPECT_EQ(Records().size(), 1u);

  EXPECT_TRUE(reg->RemoveSession("agent-1"));
  EXPECT_TRUE(Records().empty());
  reg->SetSession("agent-2", ns_, "", turn1, 10);
  EXPECT_EQ(Records().size(), 1u);
  now_ms_ += 11;
  reg->Sweep();  // expired: erased
  EXPECT_TRUE(Records().empty());
  reg->SetSession("agent-3", ns_, "", turn1, 60000);
  reg.reset();  // shutting down erases nothing
  EXPECT_EQ(Records().size(), 1u);
}

TEST_F(PinRegistryJournalTest, ARestartRegistersLiveSessionsWithTheirChunkPinsOnly) {
  const int64_t wall = UnixMillis();
  auto rec = [&](const char* id, int n, int64_t updated, int64_t expires) {
    cache::SessionRecord r;
    r.digest = cache::SessionDigest64(id);
    r.ns = ns_;
    r.updated_unix_ms = updated;
    r.expires_unix_ms = expires;
    r.tokens = Iota(n);
    journal_->Write(r);
    return r;
  };
  rec("live", 48, wall - 5000, wall + 30000);
  rec("stale", 32, wall - 9000, wall - 1);
  std::vector<cache::SessionRecord> found = Records();
  ASSERT_EQ(found.size(), 2u);

  auto reg = Registry();
  const PinRegistry::RestoreReport r = reg->AttachJournal(journal_.get(), found, wall);
  EXPECT_EQ(r.sessions, 1u);
  EXPECT_EQ(r.expired, 1u);
  EXPECT_EQ(r.tokens, 48);
  EXPECT_EQ(Records().size(), 1u);  // the expired record is erased
  EXPECT_EQ(reg->sessions(), 1u);
  ASSERT_EQ(source_.pins.size(), 1u);
  EXPECT_EQ(source_.pins.begin()->second.tokens, 48);
  EXPECT_EQ(source_.pins.begin()->second.ttl_ms, 30000);  // the TTL it had left
  EXPECT_EQ(kv_->GetStats().pages_pinned, 0u);             // its pages went with the old process
  auto list = reg->List();
  ASSERT_EQ(list.size(), 1u);
  EXPECT_TRUE(list[0].restored);
  EXPECT_EQ(list[0].digest, cache::SessionDigest64("live"));
  EXPECT_TRUE(list[0].session.empty());

  // Its next turn (found by the id's digest) replaces the restored entry.
  const auto turn = Iota(64);
  Cache(turn);
  auto info = reg->SetSession("live", ns_, "salt", turn, 60000);
  ASSERT_NE(info.id, 0u);
  EXPECT_EQ(reg->sessions(), 1u);
  list = reg->List();
  ASSERT_EQ(list.size(), 1u);
  EXPECT_FALSE(list[0].restored);
  EXPECT_EQ(source_.pins.size(), 1u);  // the restored pin released, the new one taken
  EXPECT_EQ(source_.pins.begin()->second.tokens, 64);
  EXPECT_EQ(Records().at(0).tokens, turn);
}

TEST_F(PinRegistryJournalTest, RestoreKeepsTheLatestUpToTheCapAndATenantClearReachesThem) {
  const int64_t wall = UnixMillis();
  for (int i = 0; i < 4; ++i) {
    cache::SessionRecord r;
    r.digest = cache::SessionDigest64("s" + std::to_string(i));
    r.ns = i < 2 ? ns_ : Hash128{9, 9};
    r.updated_unix_ms = wall - 1000 * (4 - i);  // s3 is the latest
    r.expires_unix_ms = wall + 100000;
    r.tokens = Iota(20);
    journal_->Write(r);
  }
  PinLimits limits;
  limits.max_sessions = 3;
  auto reg = Registry(limits);
  const auto rep = reg->AttachJournal(journal_.get(), Records(), wall);
  EXPECT_EQ(rep.sessions, 3u);
  EXPECT_EQ(rep.dropped, 1u);
  EXPECT_EQ(Records().size(), 3u);
  for (const auto& i : reg->List()) EXPECT_NE(i.digest, cache::SessionDigest64("s0"));
  EXPECT_EQ(reg->RestoredNamespaces().size(), 2u);
  // A tenant clear names the salt; restored sessions (salt unknown) go by namespace.
  EXPECT_EQ(reg->RemoveTenant("whatever", Hash128{9, 9}), 2u);
  EXPECT_EQ(reg->sessions(), 1u);
  EXPECT_EQ(Records().size(), 1u);
  EXPECT_EQ(source_.pins.size(), 1u);
}

}  // namespace
}  // namespace cachette::sched
