// Tier throughput beside the machine's limits, measured in the same run: RAM tier and store
// put/get against memcpy; disk tier put/get against a dd-like sequential write/read of the same
// bytes in one file. One line per configuration, with the ratio to its baseline.
//
//   cache_tier_bench [DIR] [MiB]     (DIR: a directory on the disk to measure, default /tmp;
//                                     MiB: bytes moved per figure, default 512)
// Chunks have the qwen2.5-0.5b shape: 24 layers x 2 KV heads x 64 dims x 256 tokens, f16 (3 MiB).
// "cold" reads first drop the files from the page cache (posix_fadvise DONTNEED after fsync).
#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>

#include "cache/disk_tier.h"
#include "cache/ram_tier.h"
#include "cache/record.h"
#include "cache/store.h"
#include "core/timer.h"

namespace cachette::cache {
namespace {

void DropFromPageCache(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return;
  ::fdatasync(fd);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
}

void Report(const char* what, double bytes, double seconds, double baseline_gbs,
            const char* baseline) {
  const double gbs = bytes / seconds / 1e9;
  if (baseline_gbs > 0) {
    std::printf("%-34s %8.2f GB/s   %5.1f%% of %s\n", what, gbs, 100 * gbs / baseline_gbs,
                baseline);
  } else {
    std::printf("%-34s %8.2f GB/s   (baseline)\n", what, gbs);
  }
}

int Main(int argc, char** argv) {
  const std::string base = argc > 1 ? argv[1] : "/tmp";
  const size_t mib = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 512;
  const std::string dir = base + "/cachette-tier-bench-" + std::to_string(::getpid());
  std::filesystem::create_directories(dir);

  ChunkLayout layout{24, 2, 64, 256, 1};
  const size_t raw = layout.raw_bytes();
  const size_t n = std::max<size_t>(1, (mib << 20) / raw);
  const double total = static_cast<double>(n * raw);
  std::printf("chunks: %zu x %.2f MiB = %.0f MiB; dir %s\n", n, raw / 1048576.0, total / 1048576,
              dir.c_str());

  // Distinct chunks (the records the tiers store), built once.
  const Hash128 ns{7, 7};
  std::vector<TokenId> tokens(n * 256);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<TokenId>(i % 50000);
  const std::vector<ChunkKey> keys = ComputeChunkKeys(ns, tokens, 256);
  std::vector<std::byte> kv(raw);
  for (size_t i = 0; i < raw; ++i) kv[i] = static_cast<std::byte>(i * 2654435761u >> 13);
  std::vector<std::vector<std::byte>> records(n);
  for (size_t c = 0; c < n; ++c) {
    RecordMeta m;
    m.ns = ns;
    m.key = keys[c];
    m.parent = c == 0 ? ChunkKey{} : keys[c - 1];
    m.layout = layout;
    m.chunk_index = static_cast<uint32_t>(c);
    m.raw_bytes = raw;
    records[c] = EncodeRecord(m, std::span(tokens).subspan(c * 256, 256), kv).value();
  }

  // 1. memcpy: the RAM baseline, chunk-sized copies into a pre-faulted destination (the
  //    machine's copy bandwidth). Best of 3 passes for this and the RAM figures.
  double memcpy_s = 1e30;
  {
    std::vector<std::byte> dst(n * raw, std::byte{1});
    for (int rep = 0; rep < 3; ++rep) {
      Stopwatch sw;
      for (size_t c = 0; c < n; ++c) std::memcpy(dst.data() + c * raw, kv.data(), raw);
      memcpy_s = std::min(memcpy_s, sw.Seconds());
    }
    if (dst[raw / 2] == std::byte{0x7f}) std::printf(" ");
  }
  const double memcpy_gbs = total / memcpy_s / 1e9;
  Report("memcpy (pre-faulted destination)", total, memcpy_s, 0, "");
  Stopwatch sw;

  // 2. RAM tier put/get (each a copy), and the store (put: record encode + checksum; get: a
  //    verified zero-copy hit).
  {
    double put_s = 1e30, get_s = 1e30;
    for (int rep = 0; rep < 3; ++rep) {
      RamTier ram(0);
      sw.Reset();
      for (size_t c = 0; c < n; ++c) (void)ram.Put(keys[c], records[c]);
      put_s = std::min(put_s, sw.Seconds());
      sw.Reset();
      size_t sum = 0;
      for (size_t c = 0; c < n; ++c) sum += ram.Get(keys[c], NoDeadline())->size();
      get_s = std::min(get_s, sw.Seconds());
      if (sum == 0) return 1;
    }
    Report("ram tier put", total, put_s, memcpy_gbs, "memcpy");
    Report("ram tier get", total, get_s, memcpy_gbs, "memcpy");
  }
  {
    CacheOptions o;
    o.ram_budget_bytes = uint64_t{n + 1} * records[0].size();
    auto store = TieredStore::Create(o).value();
    sw.Reset();
    for (size_t c = 0; c < n; ++c) {
      ByteSpan one[] = {kv};
      (void)store->Put(ns, std::span(tokens).first((c + 1) * 256), c, layout, one);
    }
    Report("store put (ram)", total, sw.Seconds(), memcpy_gbs, "memcpy");
    sw.Reset();
    auto h = store->Get(ns, tokens, 0, n, std::chrono::steady_clock::now() + std::chrono::hours(1));
    h->Wait();
    Report("store get (ram, verified, 0-copy)", total, sw.Seconds(), memcpy_gbs, "memcpy");
    if (h->ready_tokens() != n * 256) std::printf("  (store get: only %zu tokens)\n", h->ready_tokens());
  }

  // 3. Disk: dd-like sequential baseline, then the tier.
  const std::string seq = dir + "/sequential.bin";
  {
    int fd = ::open(seq.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    sw.Reset();
    for (size_t c = 0; c < n; ++c) {
      if (::write(fd, kv.data(), raw) != static_cast<ssize_t>(raw)) return 1;
    }
    ::fdatasync(fd);
    ::close(fd);
  }
  const double seq_w = total / sw.Seconds() / 1e9;
  Report("disk sequential write (dd-like)", total, total / 1e9 / seq_w, 0, "");
  DropFromPageCache(seq);
  double seq_r;
  {
    int fd = ::open(seq.c_str(), O_RDONLY);
    sw.Reset();
    for (size_t c = 0; c < n; ++c) {
      if (::read(fd, kv.data(), raw) != static_cast<ssize_t>(raw)) return 1;
    }
    seq_r = total / sw.Seconds() / 1e9;
    ::close(fd);
  }
  Report("disk sequential read, cold", total, total / 1e9 / seq_r, 0, "");
  std::filesystem::remove(seq);

  for (bool sync : {true, false}) {
    const std::string tdir = dir + (sync ? "/tier-sync" : "/tier-nosync");
    DiskTierOptions o;
    o.dir = tdir;
    o.sync = sync;
    auto disk = DiskTier::Open(o).value();
    sw.Reset();
    for (size_t c = 0; c < n; ++c) (void)disk->Put(keys[c], records[c]);
    if (!sync) ::sync();  // count the write-back too, so the figure is comparable
    Report(sync ? "disk tier put (fdatasync each)" : "disk tier put (no fsync, then sync)", total,
           sw.Seconds(), seq_w, "sequential write");
    if (!sync) continue;
    for (size_t c = 0; c < n; ++c) DropFromPageCache(disk->PathOf(keys[c]));
    sw.Reset();
    for (size_t c = 0; c < n; ++c) (void)disk->Get(keys[c], NoDeadline());
    Report("disk tier get, cold (verified)", total, sw.Seconds(), seq_r, "sequential read");
    sw.Reset();
    for (size_t c = 0; c < n; ++c) (void)disk->Get(keys[c], NoDeadline());
    Report("disk tier get, page cache (verified)", total, sw.Seconds(), memcpy_gbs, "memcpy");
  }
  std::filesystem::remove_all(dir);
  return 0;
}

}  // namespace
}  // namespace cachette::cache

int main(int argc, char** argv) { return cachette::cache::Main(argc, argv); }
