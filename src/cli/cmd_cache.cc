// `cachette cache ls|stat|verify|clear --dir DIR`: inspect and maintain a disk tier directory
// (format: docs/formats/chunk.md) and the session journal beside it (docs/formats/session.md).
// ls and stat open it read-only (no lock, nothing changes, so they work beside a running
// server); verify and clear take ownership of it.
#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <map>

#include <unordered_set>

#include "cache/chunk.h"
#include "cache/disk_tier.h"
#include "cache/session_journal.h"
#include "cli/cli.h"
#include "core/timer.h"

namespace cachette::cli {
namespace {

struct CacheArgs {
  std::string dir;
  std::string ns;  // clear: only this namespace (32 hex digits)
  size_t limit = 0;
  bool sessions_only = false;  // ls --sessions
};

Result<std::unique_ptr<cache::DiskTier>> OpenDir(const std::string& dir, bool read_only) {
  cache::DiskTierOptions o;
  o.dir = dir;
  o.read_only = read_only;
  o.sync = true;
  return cache::DiskTier::Open(o);
}

Result<cache::SessionScan> ScanSessions(const std::string& dir, bool read_only) {
  CT_ASSIGN_OR_RETURN(auto j, cache::SessionJournal::Open({dir, read_only}));
  return j->Scan();
}

// How many leading tokens of `tokens` the chunks on disk hold: the chunk keys chain every token
// before them, so a conversation whose prefix changed matches only up to the change.
int64_t OnDiskTokens(const cache::SessionRecord& r, const std::vector<cache::DiskEntry>& es) {
  uint32_t chunk_tokens = 0;  // the chunk size of its namespace: that of its full chunks
  std::unordered_set<cache::ChunkKey, cache::ChunkKeyHash> keys;
  for (const cache::DiskEntry& e : es) {
    if (e.ns != r.ns) continue;
    chunk_tokens = std::max(chunk_tokens, e.n_tokens);
    keys.insert(e.key);
  }
  if (chunk_tokens == 0) return 0;
  int64_t n = 0;
  for (const cache::ChunkKey& k :
       cache::ComputeChunkKeys(r.ns, r.tokens, static_cast<int>(chunk_tokens))) {
    if (keys.count(k) == 0) break;
    n += chunk_tokens;
  }
  return n;
}

void PrintSessions(const cache::SessionScan& scan, const std::vector<cache::DiskEntry>& es) {
  std::vector<const cache::SessionRecord*> rs;
  for (const auto& r : scan.records) rs.push_back(&r);
  std::sort(rs.begin(), rs.end(),
            [](const auto* x, const auto* y) { return x->updated_unix_ms < y->updated_unix_ms; });
  const int64_t now = UnixMillis();
  std::printf("%-16s  %-32s  %7s  %7s  %10s  %10s\n", "session", "namespace", "tokens", "on_disk",
              "idle_s", "expires_s");
  for (const cache::SessionRecord* r : rs) {
    const double idle = static_cast<double>(now - r->updated_unix_ms) / 1e3;
    const std::string expires =
        r->expires_unix_ms == 0
            ? "never"
            : std::to_string((r->expires_unix_ms - now) / 1000) +
                  (r->expires_unix_ms <= now ? " (expired)" : "");
    std::printf("%016" PRIx64 "  %s  %7zu  %7" PRId64 "  %10.0f  %10s\n", r->digest,
                r->ns.ToHex().c_str(), r->tokens.size(), OnDiskTokens(*r, es), idle,
                expires.c_str());
  }
  if (scan.corrupt > 0) {
    std::printf("%" PRIu64 " bad session records (`verify` removes them)\n", scan.corrupt);
  }
}

int Ls(const CacheArgs& a) {
  auto t = OpenDir(a.dir, true);
  if (!t.ok()) return Fail(t.status());
  auto sessions = ScanSessions(a.dir, true);
  if (!sessions.ok()) return Fail(sessions.status());
  std::vector<cache::DiskEntry> es = (*t)->Entries();
  if (a.sessions_only) {
    PrintSessions(*sessions, es);
    return 0;
  }
  std::sort(es.begin(), es.end(), [](const auto& x, const auto& y) {
    return x.mtime_ns != y.mtime_ns ? x.mtime_ns < y.mtime_ns : x.key < y.key;
  });
  std::printf("%-32s  %-32s  %6s  %6s  %5s  %12s\n", "key", "namespace", "chunk", "tokens",
              "codec", "bytes");
  size_t n = 0;
  for (const cache::DiskEntry& e : es) {
    if (a.limit != 0 && n++ >= a.limit) break;
    std::printf("%s  %s  %6u  %6u  %5u  %12" PRIu64 "\n", e.key.ToHex().c_str(),
                e.ns.ToHex().c_str(), e.chunk_index, e.n_tokens, e.codec_id, e.bytes);
  }
  if (!sessions->records.empty() || sessions->corrupt > 0) {
    std::printf("\n");
    PrintSessions(*sessions, es);
  }
  return 0;
}

int Stat(const CacheArgs& a) {
  auto t = OpenDir(a.dir, true);
  if (!t.ok()) return Fail(t.status());
  const std::vector<cache::DiskEntry> es = (*t)->Entries();
  std::map<Hash128, std::pair<uint64_t, uint64_t>> by_ns;  // chunks, bytes
  uint64_t bytes = 0, tokens = 0;
  for (const cache::DiskEntry& e : es) {
    bytes += e.bytes;
    tokens += e.n_tokens;
    auto& v = by_ns[e.ns];
    ++v.first;
    v.second += e.bytes;
  }
  const cache::DiskRecovery& r = (*t)->recovery();
  std::printf("dir             %s\n", a.dir.c_str());
  std::printf("chunks          %zu\n", es.size());
  std::printf("tokens          %" PRIu64 "\n", tokens);
  std::printf("bytes           %" PRIu64 " (%.1f MiB)\n", bytes, static_cast<double>(bytes) / (1 << 20));
  std::printf("namespaces      %zu\n", by_ns.size());
  std::printf("bad headers     %" PRIu64 " (left in place: read-only; `verify` removes them)\n",
              r.corrupt_removed);
  std::printf("foreign files   %" PRIu64 "\n", r.foreign_files);
  auto sessions = ScanSessions(a.dir, true);
  if (!sessions.ok()) return Fail(sessions.status());
  std::printf("sessions        %zu (%" PRIu64 " bad records)\n", sessions->records.size(),
              sessions->corrupt);
  for (const auto& [ns, v] : by_ns) {
    std::printf("  ns %s  %8" PRIu64 " chunks  %12" PRIu64 " bytes\n", ns.ToHex().c_str(),
                v.first, v.second);
  }
  return 0;
}

int Verify(const CacheArgs& a) {
  auto t = OpenDir(a.dir, false);
  if (!t.ok()) return Fail(t.status());
  const cache::DiskRecovery& r = (*t)->recovery();
  uint64_t ok = 0, bad = 0;
  for (const cache::DiskEntry& e : (*t)->Entries()) {
    const Status s = (*t)->Verify(e.key);
    if (s.ok()) {
      ++ok;
    } else {
      ++bad;
      std::printf("removed %s: %s\n", e.key.ToHex().c_str(), s.ToString().c_str());
    }
  }
  std::printf("verified %" PRIu64 " records: %" PRIu64 " ok, %" PRIu64
              " corrupt payloads removed, %" PRIu64 " bad headers or truncated removed, %" PRIu64
              " temp files removed\n",
              ok + bad, ok, bad, r.corrupt_removed, r.temp_files_removed);
  auto sessions = ScanSessions(a.dir, false);
  if (!sessions.ok()) return Fail(sessions.status());
  for (const std::string& p : sessions->problems) std::printf("removed %s\n", p.c_str());
  std::printf("verified %zu session records: %zu ok, %" PRIu64 " bad removed\n",
              sessions->records.size() + sessions->corrupt, sessions->records.size(),
              sessions->corrupt);
  return bad + r.corrupt_removed + sessions->corrupt == 0 ? 0 : 2;
}

int Clear(const CacheArgs& a) {
  Hash128 ns;
  if (!a.ns.empty() && !cache::ParseKeyHex(a.ns, &ns)) {
    return Fail(InvalidArgument("--ns must be 32 lowercase hex digits"));
  }
  auto t = OpenDir(a.dir, false);
  if (!t.ok()) return Fail(t.status());
  const uint64_t before = (*t)->Stats().entries;
  const Status s = (*t)->Clear(a.ns.empty() ? nullptr : &ns);
  if (!s.ok()) return Fail(s);
  std::printf("removed %" PRIu64 " chunks\n", before - (*t)->Stats().entries);
  // The sessions of those chunks go with them.
  auto j = cache::SessionJournal::Open({a.dir});
  if (!j.ok()) return Fail(j.status());
  auto scan = (*j)->Scan();
  if (!scan.ok()) return Fail(scan.status());
  size_t n = 0;
  for (const auto& r : scan->records) n += a.ns.empty() || r.ns == ns;
  if (Status cs = (*j)->Clear(a.ns.empty() ? nullptr : &ns); !cs.ok()) return Fail(cs);
  std::printf("removed %zu sessions\n", n);
  return 0;
}

}  // namespace

Runner AddCacheCommand(CLI::App& app) {
  auto a = std::make_shared<CacheArgs>();
  CLI::App* c = app.add_subcommand("cache", "Inspect and maintain a disk cache directory");
  c->require_subcommand(1);
  CLI::App* ls = c->add_subcommand("ls", "List the chunks and the sessions (read-only)");
  CLI::App* st = c->add_subcommand("stat", "Totals per namespace (read-only)");
  CLI::App* ve = c->add_subcommand("verify", "Check every record; remove corrupt ones");
  CLI::App* cl =
      c->add_subcommand("clear", "Remove all chunks and sessions (or one namespace's)");
  for (CLI::App* s : {ls, st, ve, cl}) {
    s->add_option("--dir", a->dir, "Disk tier directory")->required();
  }
  ls->add_option("--limit", a->limit, "Print at most this many chunks (0 = all)");
  ls->add_flag("--sessions", a->sessions_only,
               "Only the sessions: digest, namespace, tokens, how many of them the chunks on "
               "disk hold, idle and expiry seconds");
  cl->add_option("--ns", a->ns, "Only this namespace (32 hex digits, as `stat` prints)");
  return [a, ls, st, ve] {
    if (ls->parsed()) return Ls(*a);
    if (st->parsed()) return Stat(*a);
    if (ve->parsed()) return Verify(*a);
    return Clear(*a);
  };
}

}  // namespace cachette::cli
