#include "cache/session_journal.h"

#include <fcntl.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>

#include "cache/executor.h"
#include "core/bytes.h"
#include "core/file_io.h"
#include "core/hash.h"
#include "core/log.h"

namespace cachette::cache {
namespace {

constexpr uint32_t kMagic = 0x53535443;  // "CTSS" little-endian
constexpr uint16_t kVersion = 1;
constexpr size_t kHeaderBytes = 56;
constexpr size_t kChecksumBytes = 8;
constexpr uint64_t kChecksumSeed = 0x5e55;
constexpr uint64_t kDigestSeed = 0x5e5510;  // the admin API's session digest (server/auth.cc)
constexpr char kExt[] = ".ses";
constexpr char kTempExt[] = ".tmp";


// The digest in a record's file name, or false.
bool ParseName(std::string_view name, uint64_t* digest) {
  return name.size() == 16 + 4 && EndsWith(name, kExt) && ParseHex64(name.substr(0, 16), digest);
}

Result<std::vector<std::byte>> ReadFile(const std::string& path) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) return Errno("open", path);
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) return Errno("fstat", path);
  // Nothing larger than the largest valid record is read.
  const uint64_t most = kHeaderBytes + uint64_t{4} * kMaxSessionTokens + kChecksumBytes;
  if (static_cast<uint64_t>(st.st_size) > most) {
    return Corruption(path + ": " + std::to_string(st.st_size) +
                      " bytes, more than any session record");
  }
  std::vector<std::byte> buf(static_cast<size_t>(st.st_size));
  CT_ASSIGN_OR_RETURN(size_t n, ReadAt(fd.get(), buf.data(), buf.size(), 0, path));
  buf.resize(n);
  return buf;
}

}  // namespace

uint64_t SessionDigest64(std::string_view session_id) {
  return Hash64(ByteSpan(reinterpret_cast<const std::byte*>(session_id.data()), session_id.size()),
                kDigestSeed);
}

std::string SessionFileName(uint64_t digest) {
  char name[24];
  std::snprintf(name, sizeof name, "%016llx%s", static_cast<unsigned long long>(digest), kExt);
  return name;
}

std::vector<std::byte> EncodeSessionRecord(const SessionRecord& r) {
  const uint32_t n = static_cast<uint32_t>(std::min<size_t>(r.tokens.size(), kMaxSessionTokens));
  std::vector<std::byte> out(kHeaderBytes + size_t{4} * n + kChecksumBytes);
  std::byte* p = out.data();
  PutLe32(p, kMagic);
  PutLe16(p + 4, kVersion);
  PutLe16(p + 6, 0);  // flags
  PutLe64(p + 8, r.digest);
  PutLe64(p + 16, r.ns.lo);  // 128-bit hashes lo then hi, as in chunk records
  PutLe64(p + 24, r.ns.hi);
  PutLe64(p + 32, static_cast<uint64_t>(r.updated_unix_ms));
  PutLe64(p + 40, static_cast<uint64_t>(r.expires_unix_ms));
  PutLe32(p + 48, n);
  PutLe32(p + 52, 0);  // reserved
  for (uint32_t i = 0; i < n; ++i) PutLe32(p + kHeaderBytes + 4 * i, static_cast<uint32_t>(r.tokens[i]));
  const size_t body = kHeaderBytes + size_t{4} * n;
  PutLe64(p + body, Hash64(ByteSpan(p, body), kChecksumSeed));
  return out;
}

Result<SessionRecord> DecodeSessionRecord(ByteSpan bytes) {
  if (bytes.size() < kHeaderBytes + kChecksumBytes) {
    return Corruption("session record: " + std::to_string(bytes.size()) + " bytes, shorter than " +
                      std::to_string(kHeaderBytes + kChecksumBytes) + " (truncated)");
  }
  const std::byte* p = bytes.data();
  if (GetLe32(p) != kMagic) return Corruption("session record: bad magic (not a session record)");
  if (GetLe16(p + 4) != kVersion) {
    return Corruption("session record: version " + std::to_string(GetLe16(p + 4)) +
                      ", this build reads version " + std::to_string(kVersion));
  }
  if (GetLe16(p + 6) != 0 || GetLe32(p + 52) != 0) {
    return Corruption("session record: nonzero flags or reserved bytes");
  }
  const uint32_t n = GetLe32(p + 48);
  if (n > kMaxSessionTokens) {
    return Corruption("session record: " + std::to_string(n) + " tokens, more than " +
                      std::to_string(kMaxSessionTokens));
  }
  const size_t body = kHeaderBytes + size_t{4} * n;
  if (bytes.size() != body + kChecksumBytes) {
    return Corruption("session record: " + std::to_string(bytes.size()) + " bytes, but " +
                      std::to_string(n) + " tokens make " +
                      std::to_string(body + kChecksumBytes) + " (truncated or padded)");
  }
  if (GetLe64(p + body) != Hash64(ByteSpan(p, body), kChecksumSeed)) {
    return Corruption("session record: checksum mismatch (torn write or damage)");
  }
  SessionRecord r;
  r.digest = GetLe64(p + 8);
  r.ns.lo = GetLe64(p + 16);
  r.ns.hi = GetLe64(p + 24);
  r.updated_unix_ms = static_cast<int64_t>(GetLe64(p + 32));
  r.expires_unix_ms = static_cast<int64_t>(GetLe64(p + 40));
  if (r.updated_unix_ms < 0 || r.expires_unix_ms < 0) {
    return Corruption("session record: negative time");
  }
  r.tokens.resize(n);
  for (uint32_t i = 0; i < n; ++i) {
    const uint32_t t = GetLe32(p + kHeaderBytes + 4 * i);
    if (t > static_cast<uint32_t>(INT32_MAX)) {
      return Corruption("session record: token " + std::to_string(i) + " is negative");
    }
    r.tokens[i] = static_cast<TokenId>(t);
  }
  return r;
}

SessionJournal::SessionJournal(SessionJournalOptions options)
    : options_(std::move(options)), dir_(options_.dir + "/sessions") {}

Result<std::unique_ptr<SessionJournal>> SessionJournal::Open(const SessionJournalOptions& options) {
  if (options.dir.empty()) return InvalidArgument("session journal: no directory");
  std::unique_ptr<SessionJournal> j(new SessionJournal(options));
  if (!options.read_only) {
    CT_RETURN_IF_ERROR(MakeDir(options.dir));
    CT_RETURN_IF_ERROR(MakeDir(j->dir_));
    j->thread_ = std::make_unique<ThreadExecutor>("ct-sessions", 1, 4);
  }
  return j;
}

SessionJournal::~SessionJournal() {
  thread_.reset();  // runs a queued publication, then joins
  Publish();        // anything queued after it was scheduled
}

Result<SessionScan> SessionJournal::Scan() {
  SessionScan scan;
  struct stat st;
  if (::stat(dir_.c_str(), &st) != 0 && errno == ENOENT && options_.read_only) return scan;
  CT_ASSIGN_OR_RETURN(std::vector<std::string> names, ListDir(dir_));
  std::sort(names.begin(), names.end());
  for (const std::string& name : names) {
    const std::string path = dir_ + "/" + name;
    if (EndsWith(name, kTempExt)) {
      if (!options_.read_only && ::unlink(path.c_str()) == 0) ++scan.temp_files_removed;
      continue;
    }
    uint64_t digest = 0;
    if (!ParseName(name, &digest)) {
      ++scan.foreign_files;
      continue;
    }
    Result<SessionRecord> r = [&]() -> Result<SessionRecord> {
      CT_ASSIGN_OR_RETURN(std::vector<std::byte> bytes, ReadFile(path));
      CT_ASSIGN_OR_RETURN(SessionRecord rec, DecodeSessionRecord(bytes));
      if (rec.digest != digest) {
        return Corruption("session record: digest differs from its file name");
      }
      return rec;
    }();
    if (!r.ok()) {
      if (r.status().code() != StatusCode::kCorruption) return r.status();
      ++scan.corrupt;
      scan.problems.push_back(path + ": " + r.status().message());
      if (!options_.read_only) ::unlink(path.c_str());
      continue;
    }
    scan.records.push_back(std::move(*r));
  }
  return scan;
}

void SessionJournal::Write(SessionRecord r) {
  if (options_.read_only) return;
  std::lock_guard lock(mu_);
  const uint64_t d = r.digest;
  pending_[d] = std::move(r);
  if (!scheduled_) scheduled_ = thread_->TrySubmit([this] { Publish(); });
}

void SessionJournal::Remove(uint64_t digest) {
  if (options_.read_only) return;
  std::lock_guard lock(mu_);
  pending_[digest] = std::nullopt;
  if (!scheduled_) scheduled_ = thread_->TrySubmit([this] { Publish(); });
}

void SessionJournal::Flush() {
  if (thread_ != nullptr) thread_->Drain();
  Publish();  // an intent whose scheduling found the queue full
}

void SessionJournal::Publish() {
  std::lock_guard io(io_mu_);
  std::map<uint64_t, std::optional<SessionRecord>> work;
  {
    std::lock_guard lock(mu_);
    work.swap(pending_);
    scheduled_ = false;
  }
  for (auto& [digest, intent] : work) {
    const Status s = intent ? WriteFile(*intent) : RemoveFile(digest);
    if (!s.ok()) {
      ++write_errors_;
      CT_LOG(kWarning) << "session journal: " << s.message();
    }
  }
}

Status SessionJournal::WriteFile(const SessionRecord& r) {
  const std::vector<std::byte> bytes = EncodeSessionRecord(r);
  const std::string tmp = dir_ + "/" + std::to_string(++temp_seq_) + kTempExt;
  const std::string path = dir_ + "/" + SessionFileName(r.digest);
  {
    Fd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (fd.get() < 0) return Errno("open", tmp);
    Status s = WriteAll(fd.get(), bytes, tmp);
    if (s.ok() && options_.sync && ::fdatasync(fd.get()) != 0) s = Errno("fdatasync", tmp);
    if (s.ok() && fd.Close() != 0) s = Errno("close", tmp);
    if (!s.ok()) {
      ::unlink(tmp.c_str());
      return s;
    }
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const Status s = Errno("rename", tmp);
    ::unlink(tmp.c_str());
    return s;
  }
  return options_.sync ? FsyncDir(dir_) : Status::Ok();
}

Status SessionJournal::RemoveFile(uint64_t digest) {
  const std::string path = dir_ + "/" + SessionFileName(digest);
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) return Errno("unlink", path);
  return Status::Ok();
}

Status SessionJournal::Clear(const Hash128* ns) {
  if (options_.read_only) return InvalidArgument("session journal: opened read-only");
  Flush();
  std::lock_guard io(io_mu_);
  CT_ASSIGN_OR_RETURN(std::vector<std::string> names, ListDir(dir_));
  for (const std::string& name : names) {
    uint64_t digest = 0;
    if (!ParseName(name, &digest)) continue;
    const std::string path = dir_ + "/" + name;
    if (ns != nullptr) {
      auto bytes = ReadFile(path);
      if (bytes.ok()) {
        auto r = DecodeSessionRecord(*bytes);
        if (r.ok() && r->ns != *ns) continue;  // another tenant's; a corrupt one goes too
      }
    }
    if (::unlink(path.c_str()) != 0 && errno != ENOENT) return Errno("unlink", path);
  }
  return options_.sync ? FsyncDir(dir_) : Status::Ok();
}

}  // namespace cachette::cache
