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

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

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
  //    verified zero-copy hit). "first fill": an empty tier, every buffer new (pre-faulted by
  //    the pool in one madvise). "at budget": the steady state of a full cache, where each put
  //    follows the eviction of an older chunk (here: the erase of the chunk put kWindow
  //    earlier), so the pool recycles the evicted buffer.
  constexpr size_t kWindow = 16;
  {
    double fill_s = 1e30, steady_s = 1e30, get_s = 1e30;
    for (int rep = 0; rep < 3; ++rep) {
      RamTier ram(0);
      sw.Reset();
      for (size_t c = 0; c < n; ++c) (void)ram.Put(keys[c], records[c]);
      fill_s = std::min(fill_s, sw.Seconds());
      sw.Reset();
      size_t sum = 0;
      for (size_t c = 0; c < n; ++c) sum += ram.Get(keys[c], NoDeadline())->size();
      get_s = std::min(get_s, sw.Seconds());
      if (sum == 0) return 1;
    }
    for (int rep = 0; rep < 3; ++rep) {
      RamTier ram(uint64_t{kWindow + 1} * records[0].size());
      for (size_t c = 0; c < kWindow; ++c) (void)ram.Put(keys[n - 1 - c], records[n - 1 - c]);
      sw.Reset();
      for (size_t c = 0; c < n; ++c) {
        (void)ram.Erase(keys[c >= kWindow ? c - kWindow : n - 1 - c]);
        (void)ram.Put(keys[c], records[c]);
      }
      steady_s = std::min(steady_s, sw.Seconds());
    }
    Report("ram tier put, first fill", total, fill_s, memcpy_gbs, "memcpy");
    Report("ram tier put, at budget (recycled)", total, steady_s, memcpy_gbs, "memcpy");
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
    Report("store put (ram), first fill", total, sw.Seconds(), memcpy_gbs, "memcpy");
    sw.Reset();
    auto h = store->Get(ns, tokens, 0, n, std::chrono::steady_clock::now() + std::chrono::hours(1));
    h->Wait();
    Report("store get (ram, verified, 0-copy)", total, sw.Seconds(), memcpy_gbs, "memcpy");
    if (h->ready_tokens() != n * 256) {
      std::printf("  (store get: only %zu tokens)\n", h->ready_tokens());
    }
  }
  {
    // At budget: the store evicts (no disk: drops) one chunk per put after the first kWindow.
    CacheOptions o;
    o.ram_budget_bytes = uint64_t{kWindow} * records[0].size();
    auto store = TieredStore::Create(o).value();
    for (size_t c = 0; c < kWindow; ++c) {  // fill first, so the timed puts all evict
      ByteSpan one[] = {kv};
      Hash128 warm_ns{8, 8};
      (void)store->Put(warm_ns, std::span(tokens).first((c + 1) * 256), c, layout, one);
    }
    sw.Reset();
    for (size_t c = 0; c < n; ++c) {
      ByteSpan one[] = {kv};
      (void)store->Put(ns, std::span(tokens).first((c + 1) * 256), c, layout, one);
    }
    Report("store put (ram), at budget", total, sw.Seconds(), memcpy_gbs, "memcpy");
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
  auto seq_read_cold = [&]() -> double {
    DropFromPageCache(seq);
    int fd = ::open(seq.c_str(), O_RDONLY);
    Stopwatch t;
    for (size_t c = 0; c < n; ++c) {
      if (::read(fd, kv.data(), raw) != static_cast<ssize_t>(raw)) return 1e-9;
    }
    const double gbs = total / t.Seconds() / 1e9;
    ::close(fd);
    return gbs;
  };

  const std::string tdir = dir + "/tier-sync";
  for (bool sync : {true, false}) {
    DiskTierOptions o;
    o.dir = sync ? tdir : dir + "/tier-nosync";
    o.sync = sync;
    auto disk = DiskTier::Open(o).value();
    sw.Reset();
    for (size_t c = 0; c < n; ++c) (void)disk->Put(keys[c], records[c]);
    if (!sync) ::sync();  // count the write-back too, so the figure is comparable
    Report(sync ? "disk tier put (fdatasync each)" : "disk tier put (no fsync, then sync)", total,
           sw.Seconds(), seq_w, "sequential write");
    if (!sync) std::filesystem::remove_all(o.dir);
  }

  // Cold reads, 3 rounds; each round measures its own sequential-read baseline right before the
  // tier, so a change of load on the shared machine moves both. Medians over the rounds.
  // "in order": one file after another (the old store load). "read-ahead 8": the store's load
  // loop (WILLNEED on the next 8 files). "store get": a whole-prefix Get through the store
  // (disk -> verified -> promoted to RAM), which uses the read-ahead.
  struct Figure {
    const char* name;
    std::vector<double> gbs, ratio;
  };
  Figure f_seq{"disk sequential read, cold", {}, {}};
  Figure f_tier{"disk tier get, cold, in order", {}, {}};
  Figure f_ra{"disk tier get, cold, read-ahead 8", {}, {}};
  Figure f_store{"store get, disk cold (prefix)", {}, {}};
  double cache_s = 1e30;
  for (int round = 0; round < 3; ++round) {
    const double seq_r = seq_read_cold();
    f_seq.gbs.push_back(seq_r);
    auto add = [&](Figure& f, double seconds) {
      f.gbs.push_back(total / seconds / 1e9);
      f.ratio.push_back(f.gbs.back() / seq_r);
    };
    {
      DiskTierOptions o;
      o.dir = tdir;
      auto disk = DiskTier::Open(o).value();
      for (size_t c = 0; c < n; ++c) DropFromPageCache(disk->PathOf(keys[c]));
      sw.Reset();
      for (size_t c = 0; c < n; ++c) (void)disk->Get(keys[c], NoDeadline());
      add(f_tier, sw.Seconds());
      sw.Reset();
      for (size_t c = 0; c < n; ++c) (void)disk->Get(keys[c], NoDeadline());
      cache_s = std::min(cache_s, sw.Seconds());
      for (size_t c = 0; c < n; ++c) DropFromPageCache(disk->PathOf(keys[c]));
      sw.Reset();
      for (size_t c = 0; c < n; ++c) {
        for (size_t a = c == 0 ? 0 : c + 8; a <= std::min(c + 8, n - 1); ++a) {
          disk->Prefetch(keys[a]);
        }
        (void)disk->Get(keys[c], NoDeadline());
      }
      add(f_ra, sw.Seconds());
      for (size_t c = 0; c < n; ++c) DropFromPageCache(disk->PathOf(keys[c]));
    }
    {
      CacheOptions o;
      o.ram_budget_bytes = uint64_t{n + 1} * records[0].size();
      o.disk_dir = tdir;
      auto store = TieredStore::Create(o).value();
      sw.Reset();
      auto h = store->Get(ns, tokens, 0, n, std::chrono::steady_clock::now() + std::chrono::hours(1));
      h->Wait();
      add(f_store, sw.Seconds());
      if (h->ready_tokens() != n * 256) {
      std::printf("  (store get: only %zu tokens)\n", h->ready_tokens());
    }
    }
  }
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v.empty() ? 0.0 : v[v.size() / 2];
  };
  std::printf("%-34s %8.2f GB/s   (baseline, median of %zu)\n", f_seq.name, median(f_seq.gbs),
              f_seq.gbs.size());
  for (const Figure* f : {&f_tier, &f_ra, &f_store}) {
    std::printf("%-34s %8.2f GB/s   %5.1f%% of sequential read (median of %zu)\n", f->name,
                median(f->gbs), 100 * median(f->ratio), f->ratio.size());
  }
  Report("disk tier get, page cache (verified)", total, cache_s, memcpy_gbs, "memcpy");
  std::filesystem::remove(seq);
  std::filesystem::remove_all(dir);
  return 0;
}

}  // namespace
}  // namespace cachette::cache

int main(int argc, char** argv) { return cachette::cache::Main(argc, argv); }
