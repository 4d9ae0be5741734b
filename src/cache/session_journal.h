// The session journal: one small record per live session (session_id) under the disk tier's
// directory, so a restarted server knows its sessions again. The format and the recovery rules
// are in docs/formats/session.md.
//
// A session's KV lives in the chunk store like any other prefix (chunks keyed by the chained
// hash of their tokens); what the journal adds is the session itself: which conversation
// (namespace and token sequence) a session id last held, and until when. At start-up the server
// scans it and pins each live session's chunks again for the TTL it had left, so the next turn
// restores them instead of prefilling, and `cachette cache ls` lists the sessions with the part
// of each conversation whose chunks are on disk. The session id is never written: a record is
// filed under its 64-bit digest (the digest the admin API shows).
//
// Writes are asynchronous and coalesced: Write and Remove record the latest intent per session
// and one background thread ("ct-sessions") publishes it (temp file, fdatasync, rename, fsync
// of the directory), so the scheduler loop that ends a turn never waits for the disk. A crash
// loses at most the intents not yet published; it never leaves a record that reads back wrong
// (every record carries a checksum, and a torn or foreign file is reported and removed).
//
// Thread-safety: every method is safe to call concurrently.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "cachette/status.h"
#include "cachette/types.h"
#include "core/hash.h"

namespace cachette::cache {

class ThreadExecutor;

// The longest conversation a record holds (tokens); longer ones are cut to this prefix.
inline constexpr uint32_t kMaxSessionTokens = 1u << 24;

struct SessionRecord {
  uint64_t digest = 0;          // SessionDigest64(session_id)
  Hash128 ns;                   // the namespace of its chunks (model, KV type, tenant)
  int64_t updated_unix_ms = 0;  // when its last turn ended (wall clock)
  int64_t expires_unix_ms = 0;  // when its pin lapses (wall clock); 0 = never
  std::vector<TokenId> tokens;  // the conversation so far (prompt and reply of every turn)
};

// The digest a session id is known by on disk and in the admin API (XXH64, seeded).
uint64_t SessionDigest64(std::string_view session_id);

// The bytes of `r` (docs/formats/session.md). Tokens beyond kMaxSessionTokens are dropped.
std::vector<std::byte> EncodeSessionRecord(const SessionRecord& r);
// Parses and verifies a record. kCorruption with a message naming the problem (short, bad
// magic, unknown version, nonzero reserved bytes, length mismatch, negative token, checksum).
Result<SessionRecord> DecodeSessionRecord(ByteSpan bytes);
// "<16 lowercase hex digits>.ses".
std::string SessionFileName(uint64_t digest);

struct SessionJournalOptions {
  std::string dir;         // the disk tier's directory; records go to dir/sessions/
  bool read_only = false;  // inspect only: nothing created, written or removed
  bool sync = true;        // fdatasync each record and fsync the directory
};

// What a scan found.
struct SessionScan {
  std::vector<SessionRecord> records;  // verified, in no particular order
  uint64_t corrupt = 0;                // bad records (removed unless read_only)
  uint64_t temp_files_removed = 0;     // left by a crash mid-write
  uint64_t foreign_files = 0;          // names that are not ours; left alone
  std::vector<std::string> problems;   // one line per corrupt record, naming the file
};

class SessionJournal {
 public:
  // Opens dir/sessions (created unless read_only; a read-only open of a directory without it
  // is an empty journal). kIOError when it cannot be created.
  static Result<std::unique_ptr<SessionJournal>> Open(const SessionJournalOptions& options);
  ~SessionJournal();  // publishes what is queued, then stops its thread

  // Reads every record. Corrupt ones are counted, named in `problems` and removed (unless
  // read_only); temp files of interrupted writes are removed (unless read_only).
  Result<SessionScan> Scan();

  // Queue the publication of `r` / the removal of the session's record. The latest call per
  // digest wins. Never blocks on I/O; a failed write is logged and counted (write_errors).
  void Write(SessionRecord r);
  void Remove(uint64_t digest);
  // Waits until every intent queued before the call is published.
  void Flush();
  // Removes every record (of namespace `ns` only, if given) now. kInvalidArgument if read_only.
  Status Clear(const Hash128* ns = nullptr);

  uint64_t write_errors() const { return write_errors_.load(); }
  const std::string& dir() const { return dir_; }

 private:
  explicit SessionJournal(SessionJournalOptions options);
  void Publish();  // on the thread: takes the pending intents and applies them
  Status WriteFile(const SessionRecord& r);
  Status RemoveFile(uint64_t digest);

  const SessionJournalOptions options_;
  const std::string dir_;  // options_.dir + "/sessions"
  std::mutex mu_;
  // The latest intent per digest: a record to publish, or nullopt to remove.
  std::map<uint64_t, std::optional<SessionRecord>> pending_;  // GUARDED_BY(mu_)
  bool scheduled_ = false;                                     // GUARDED_BY(mu_)
  std::mutex io_mu_;  // one publication at a time (Publish, Clear)
  uint64_t temp_seq_ = 0;  // GUARDED_BY(io_mu_)
  std::atomic<uint64_t> write_errors_{0};
  std::unique_ptr<ThreadExecutor> thread_;  // last: destroyed (drained) first
};

}  // namespace cachette::cache
