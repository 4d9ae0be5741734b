#include "cache/disk_tier.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "core/file_io.h"
#include "core/hash.h"

namespace cachette::cache {
namespace {

constexpr char kFormatLine[] = "cachette-disk-tier 1\n";
constexpr char kRecordExt[] = ".ctk";
constexpr char kTempExt[] = ".tmp";

int64_t MtimeNs(const struct stat& st) {
  return int64_t{st.st_mtim.tv_sec} * 1000000000 + st.st_mtim.tv_nsec;
}

DiskEntry EntryOf(const ChunkKey& key, int level, const RecordHeader& h, uint64_t bytes,
                  int64_t mtime_ns) {
  return DiskEntry{key,
                   h.meta.key,
                   level,
                   h.meta.ns,
                   h.meta.layout.n_tokens,
                   h.meta.chunk_index,
                   h.meta.codec_id,
                   bytes,
                   mtime_ns};
}

// Which encoding of chunk `chunk` a record filed under `key` is: 0 (its own record), a level
// j in 1 .. kMaxChunkLevels (key == LevelKey(chunk, j)), or -1 (filed under a wrong name).
int LevelOf(const ChunkKey& key, const ChunkKey& chunk) {
  if (key == chunk) return 0;
  for (int j = 1; j <= kMaxChunkLevels; ++j) {
    if (LevelKey(chunk, j) == key) return j;
  }
  return -1;
}

}  // namespace

ChunkKey LevelKey(const ChunkKey& key, int level) {
  if (level == 0) return key;
  uint64_t words[3] = {key.lo, key.hi, static_cast<uint64_t>(level)};
  return Hash128Of(ByteSpan(reinterpret_cast<const std::byte*>(words), sizeof words),
                   /*seed=*/0x1e7e1);
}

bool ParseKeyHex(std::string_view hex, ChunkKey* key) {
  uint64_t hi, lo;
  if (hex.size() != 32 || !ParseHex64(hex.substr(0, 16), &hi) ||
      !ParseHex64(hex.substr(16), &lo)) {
    return false;
  }
  key->hi = hi;
  key->lo = lo;
  return true;
}

std::string DiskTier::PathOf(const ChunkKey& key) const {
  const std::string hex = key.ToHex();
  return options_.dir + "/chunks/" + hex.substr(0, 2) + "/" + hex + kRecordExt;
}

Result<std::unique_ptr<DiskTier>> DiskTier::Open(const DiskTierOptions& options) {
  if (options.dir.empty()) return InvalidArgument("disk tier: empty dir");
  std::unique_ptr<DiskTier> t(new DiskTier(options));
  const std::string& dir = options.dir;
  const std::string format_path = dir + "/FORMAT";
  if (!options.read_only) {
    // mkdir -p of the last component only: the parent is the operator's to create.
    CT_RETURN_IF_ERROR(MakeDir(dir));
    t->lock_fd_ = ::open((dir + "/LOCK").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (t->lock_fd_ < 0) return Errno("open", dir + "/LOCK");
    if (::flock(t->lock_fd_, LOCK_EX | LOCK_NB) != 0) {
      return Unavailable("disk tier: " + dir + " is in use by another process");
    }
    CT_RETURN_IF_ERROR(MakeDir(dir + "/tmp"));
    CT_RETURN_IF_ERROR(MakeDir(dir + "/chunks"));
    for (int i = 0; i < 256; ++i) {
      char sub[3];
      std::snprintf(sub, sizeof(sub), "%02x", i);
      CT_RETURN_IF_ERROR(MakeDir(dir + "/chunks/" + sub));
    }
  }
  // FORMAT: written once (atomically) on creation, refused when it names another format.
  Fd ffd(::open(format_path.c_str(), O_RDONLY | O_CLOEXEC));
  if (ffd.get() >= 0) {
    char buf[64] = {};
    const ssize_t n = ::read(ffd.get(), buf, sizeof(buf) - 1);
    if (n < 0 || std::string_view(buf, static_cast<size_t>(n)) != kFormatLine) {
      return InvalidArgument("disk tier: " + format_path + " is not '" +
                             std::string(kFormatLine, sizeof(kFormatLine) - 2) + "'");
    }
  } else if (options.read_only) {
    return NotFound("disk tier: " + format_path + " not found (not a cache directory)");
  } else {
    const std::string tmp = dir + "/tmp/FORMAT.tmp";
    Fd wfd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (wfd.get() < 0) return Errno("open", tmp);
    CT_RETURN_IF_ERROR(WriteAll(
        wfd.get(), ByteSpan(reinterpret_cast<const std::byte*>(kFormatLine),
                            sizeof(kFormatLine) - 1), tmp));
    if (::fsync(wfd.get()) != 0) return Errno("fsync", tmp);
    if (::rename(tmp.c_str(), format_path.c_str()) != 0) return Errno("rename", tmp);
    CT_RETURN_IF_ERROR(FsyncDir(dir));
  }
  CT_RETURN_IF_ERROR(t->Recover());
  return t;
}

DiskTier::~DiskTier() {
  if (lock_fd_ >= 0) ::close(lock_fd_);  // releases the flock
}

Status DiskTier::Recover() {
  const bool rw = !options_.read_only;
  // Step 2 of the recovery rules: temp files are the remains of interrupted writes.
  if (rw) {
    CT_ASSIGN_OR_RETURN(std::vector<std::string> temps, ListDir(options_.dir + "/tmp"));
    for (const std::string& name : temps) {
      const std::string path = options_.dir + "/tmp/" + name;
      if (::unlink(path.c_str()) == 0) ++recovery_.temp_files_removed;
    }
  }
  // Step 3: scan the published records, reading headers only.
  std::vector<std::byte> buf;
  for (int i = 0; i < 256; ++i) {
    char sub[3];
    std::snprintf(sub, sizeof(sub), "%02x", i);
    const std::string subdir = options_.dir + "/chunks/" + sub;
    auto names = ListDir(subdir);
    if (!names.ok()) {
      if (!rw) continue;  // a partial directory is fine to inspect
      return names.status();
    }
    for (const std::string& name : *names) {
      const std::string path = subdir + "/" + name;
      if (EndsWith(name, kTempExt)) {  // WART-proofing: older writers used in-place temps
        if (rw && ::unlink(path.c_str()) == 0) ++recovery_.temp_files_removed;
        continue;
      }
      ChunkKey key;
      if (!EndsWith(name, kRecordExt) ||
          !ParseKeyHex(std::string_view(name).substr(0, name.size() - 4), &key) ||
          name.size() != 36) {
        ++recovery_.foreign_files;
        continue;
      }
      auto corrupt = [&] {
        ++recovery_.corrupt_removed;
        ++stats_.corruptions;
        if (rw) ::unlink(path.c_str());
      };
      if (name.compare(0, 2, sub) != 0) {  // filed under the wrong subdirectory
        corrupt();
        continue;
      }
      Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
      struct stat st;
      if (fd.get() < 0 || ::fstat(fd.get(), &st) != 0) {
        ++recovery_.foreign_files;
        continue;
      }
      const uint64_t size = static_cast<uint64_t>(st.st_size);
      buf.resize(RecordHeaderBytes(0));
      auto n = ReadAt(fd.get(), buf.data(), buf.size(), 0, path);
      if (!n.ok()) return n.status();
      const uint64_t need = RecordHeaderBytesNeeded(ByteSpan(buf.data(), *n));
      if (*n == buf.size() && need > buf.size()) {
        buf.resize(need);
        n = ReadAt(fd.get(), buf.data(), need, 0, path);
        if (!n.ok()) return n.status();
      }
      auto h = DecodeRecordHeader(ByteSpan(buf.data(), *n), size);
      const int level = h.ok() ? LevelOf(key, h->meta.key) : -1;
      if (level < 0) {
        corrupt();
        continue;
      }
      index_.emplace(key, EntryOf(key, level, *h, size, MtimeNs(st)));
      stats_.bytes_used += size;
      ++recovery_.records;
    }
  }
  return Status::Ok();
}

Status DiskTier::Put(const ChunkKey& key, std::span<const std::byte> record, uint32_t) {
  if (options_.read_only) return InvalidArgument("disk tier: opened read-only");
  auto h = DecodeRecordHeader(record, record.size());
  if (!h.ok()) return InvalidArgument("disk tier put: " + h.status().message());
  const int level = LevelOf(key, h->meta.key);
  if (level < 0) return InvalidArgument("disk tier put: record key != key or a level key of it");
  const uint64_t size = record.size();
  uint64_t seq;
  {
    std::lock_guard lock(mu_);
    auto it = index_.find(key);
    const uint64_t old_bytes = it == index_.end() ? 0 : it->second.bytes;
    if (options_.budget_bytes != 0 &&
        stats_.bytes_used + reserved_bytes_ + size - old_bytes > options_.budget_bytes) {
      ++stats_.errors;
      return ResourceExhausted("disk tier: " + std::to_string(size) +
                               " bytes do not fit the budget of " +
                               std::to_string(options_.budget_bytes));
    }
    reserved_bytes_ += size;
    seq = ++temp_seq_;
  }
  const std::string final_path = PathOf(key);
  const std::string tmp_path =
      options_.dir + "/tmp/" + key.ToHex() + "." + std::to_string(seq) + kTempExt;
  auto write_temp = [&]() -> Status {
    Fd fd(::open(tmp_path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644));
    if (fd.get() < 0) return Errno("open", tmp_path);
    CT_RETURN_IF_ERROR(WriteAll(fd.get(), record, tmp_path));
    if (options_.sync && ::fdatasync(fd.get()) != 0) return Errno("fdatasync", tmp_path);
    if (fd.Close() != 0) return Errno("close", tmp_path);
    return Status::Ok();
  };
  Status s = write_temp();
  struct stat st {};
  {
    std::lock_guard lock(mu_);
    reserved_bytes_ -= size;
    if (s.ok() && ::rename(tmp_path.c_str(), final_path.c_str()) != 0) {
      s = Errno("rename", tmp_path);
    }
    if (!s.ok()) {
      ::unlink(tmp_path.c_str());
      ++stats_.errors;
      return s;
    }
    ::stat(final_path.c_str(), &st);
    auto it = index_.find(key);
    if (it != index_.end()) stats_.bytes_used -= it->second.bytes;
    index_[key] = EntryOf(key, level, *h, size, MtimeNs(st));
    stats_.bytes_used += size;
    stats_.bytes_in += size;
    ++stats_.puts;
  }
  if (options_.sync) {
    const std::string hex = key.ToHex();
    return FsyncDir(options_.dir + "/chunks/" + hex.substr(0, 2));
  }
  return Status::Ok();
}

void DiskTier::RemoveCorrupt(const ChunkKey& key, uint64_t ino) {
  std::lock_guard lock(mu_);
  ++stats_.corruptions;
  if (options_.read_only) return;
  const std::string path = PathOf(key);
  struct stat st;
  // Only the file that was read: a concurrent Put may have published a good one since.
  if (::stat(path.c_str(), &st) == 0 && static_cast<uint64_t>(st.st_ino) == ino) {
    ::unlink(path.c_str());
    auto it = index_.find(key);
    if (it != index_.end()) {
      stats_.bytes_used -= it->second.bytes;
      index_.erase(it);
    }
  }
}

Result<std::vector<std::byte>> DiskTier::Get(const ChunkKey& key, Deadline deadline) {
  return Get(key, deadline, nullptr);
}

void DiskTier::Prefetch(const ChunkKey& key) {
  {
    std::lock_guard lock(mu_);
    if (index_.count(key) == 0) return;
  }
  const std::string path = PathOf(key);
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) return;  // erased since: the Get will miss
  (void)::posix_fadvise(fd.get(), 0, 0, POSIX_FADV_WILLNEED);
}

Result<std::vector<std::byte>> DiskTier::Get(const ChunkKey& key, Deadline deadline,
                                             BufferPool* pool) {
  uint64_t indexed_bytes;
  {
    std::lock_guard lock(mu_);
    ++stats_.gets;
    if (Clock::now() > deadline) {
      ++stats_.deadline_misses;
      return DeadlineExceeded("disk tier: deadline passed before the read");
    }
    auto it = index_.find(key);
    if (it == index_.end()) {
      ++stats_.misses;
      return NotFound("disk tier: " + key.ToHex());
    }
    indexed_bytes = it->second.bytes;
  }
  const std::string path = PathOf(key);
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  struct stat st;
  if (fd.get() < 0 || ::fstat(fd.get(), &st) != 0) {
    // Erased (or evicted) since the index said yes: a miss.
    std::lock_guard lock(mu_);
    ++stats_.misses;
    return NotFound("disk tier: " + key.ToHex());
  }
  // The buffer is sized from the file only once the file is the size the index recorded from
  // its verified header: a file replaced or grown behind our back (or a huge foreign file
  // under a record's name) is never read whole into memory.
  const uint64_t file_bytes = static_cast<uint64_t>(st.st_size);
  if (file_bytes != indexed_bytes) {
    {
      std::lock_guard lock(mu_);
      auto it = index_.find(key);
      // A Put published a new record (or an Erase removed it) since we looked: a miss, unless
      // the file we opened is still the one published under the name.
      struct stat now {};
      const bool still_ours = ::stat(path.c_str(), &now) == 0 && now.st_ino == st.st_ino;
      if (!still_ours || it == index_.end()) {
        ++stats_.misses;
        return NotFound("disk tier: " + key.ToHex() + " changed during the read");
      }
    }
    RemoveCorrupt(key, static_cast<uint64_t>(st.st_ino));
    return Corruption("disk tier " + path + ": file is " + std::to_string(file_bytes) +
                      " bytes, its record was " + std::to_string(indexed_bytes));
  }
  const size_t size = static_cast<size_t>(file_bytes);
  std::vector<std::byte> bytes = pool != nullptr ? pool->Take(size) : std::vector<std::byte>(size);
  auto n = ReadAt(fd.get(), bytes.data(), bytes.size(), 0, path);
  if (!n.ok()) {
    std::lock_guard lock(mu_);
    ++stats_.errors;
    return n.status();
  }
  bytes.resize(*n);
  auto view = DecodeRecord(bytes);
  Status bad = view.ok() ? Status::Ok() : view.status();
  if (bad.ok() && LevelOf(key, view->header.meta.key) < 0) {
    bad = Corruption("record key != file name");
  }
  if (!bad.ok()) {
    RemoveCorrupt(key, static_cast<uint64_t>(st.st_ino));
    return Corruption("disk tier " + path + ": " + bad.message());
  }
  {
    std::lock_guard lock(mu_);
    ++stats_.hits;
    stats_.bytes_out += bytes.size();
  }
  if (read_hook_) read_hook_(bytes.size());
  return bytes;
}

Status DiskTier::Verify(const ChunkKey& key) {
  auto r = Get(key, NoDeadline());
  return r.ok() ? Status::Ok() : r.status();
}

std::vector<bool> DiskTier::ContainsMany(std::span<const ChunkKey> keys, Deadline) {
  std::vector<bool> out(keys.size());
  std::lock_guard lock(mu_);
  for (size_t i = 0; i < keys.size(); ++i) out[i] = index_.count(keys[i]) != 0;
  return out;
}

Status DiskTier::Erase(const ChunkKey& key) {
  if (options_.read_only) return InvalidArgument("disk tier: opened read-only");
  std::lock_guard lock(mu_);
  auto it = index_.find(key);
  if (it == index_.end()) return Status::Ok();
  const std::string path = PathOf(key);
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) return Errno("unlink", path);
  stats_.bytes_used -= it->second.bytes;
  index_.erase(it);
  return Status::Ok();
}

Status DiskTier::Clear(const Hash128* ns) {
  std::vector<ChunkKey> keys;
  {
    std::lock_guard lock(mu_);
    for (const auto& [k, e] : index_) {
      if (ns == nullptr || e.ns == *ns) keys.push_back(k);
    }
  }
  for (const ChunkKey& k : keys) CT_RETURN_IF_ERROR(Erase(k));
  return Status::Ok();
}

std::vector<DiskEntry> DiskTier::Entries() const {
  std::lock_guard lock(mu_);
  std::vector<DiskEntry> out;
  out.reserve(index_.size());
  for (const auto& [k, e] : index_) out.push_back(e);
  return out;
}

TierStats DiskTier::Stats() const {
  std::lock_guard lock(mu_);
  TierStats s = stats_;
  s.entries = index_.size();
  s.bytes_capacity = options_.budget_bytes;
  return s;
}

}  // namespace cachette::cache
