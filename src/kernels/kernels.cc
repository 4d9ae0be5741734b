// Front end of the kernels: CPU feature detection, ISA dispatch, the parallel MatMul and
// Attention drivers, and the kernels that are not worth an ISA-specific version (RoPE, KV
// conversion). Compiled for baseline x86-64: nothing here may use AVX.
#include "kernels/kernels.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/fp16.h"
#include "core/log.h"
#include "kernels/kernels_internal.h"

#if defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace cachette::kernels {
namespace {

#if defined(__x86_64__)
uint64_t ReadXcr0() {
  uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

CpuFeatures DetectCpu() {
  CpuFeatures f;
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = (c >> 27) & 1, avx = (c >> 28) & 1;
  if (!osxsave || !avx) return f;
  const uint64_t xcr0 = ReadXcr0();
  // The OS must save the YMM state (bits 1, 2) for AVX and the opmask/ZMM state (5, 6, 7)
  // for AVX-512, or the registers are clobbered on a context switch.
  const bool os_ymm = (xcr0 & 0x6) == 0x6;
  const bool os_zmm = os_ymm && (xcr0 & 0xe0) == 0xe0;
  const bool fma = (c >> 12) & 1, f16c = (c >> 29) & 1;
  unsigned b7 = 0, c7 = 0, d7 = 0, a71 = 0;
  if (__get_cpuid_count(7, 0, &a, &b7, &c7, &d7)) {
    unsigned b71 = 0, c71 = 0, d71 = 0;
    if (a >= 1) __get_cpuid_count(7, 1, &a71, &b71, &c71, &d71);
  }
  if (os_ymm) {
    f.avx2 = (b7 >> 5) & 1;
    f.fma = fma;
    f.f16c = f16c;
    f.avxvnni = (a71 >> 4) & 1;
  }
  if (os_zmm) {
    f.avx512f = (b7 >> 16) & 1;
    f.avx512dq = (b7 >> 17) & 1;
    f.avx512bw = (b7 >> 30) & 1;
    f.avx512vl = (b7 >> 31) & 1;
    f.avx512vnni = (c7 >> 11) & 1;
    f.avx512bf16 = (a71 >> 5) & 1;
    f.avx512fp16 = (d7 >> 23) & 1;
  }
  // AMX: the OS must enable the tile state in XCR0 (bits 17, 18) and, on Linux, grant this
  // process permission to use the large XTILEDATA state before the first tile instruction.
  const bool amx_cpu = (d7 >> 24) & 1;
  if (amx_cpu && (xcr0 & 0x60000) == 0x60000) {
    constexpr long kArchReqXcompPerm = 0x1023;
    constexpr long kXfeatureXtiledata = 18;
    if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0) {
      f.amx_tile = true;
      f.amx_int8 = (d7 >> 25) & 1;
      f.amx_bf16 = (d7 >> 22) & 1;
    }
  }
  return f;
}
#else
CpuFeatures DetectCpu() { return {}; }
#endif

Isa HardwareIsa(const CpuFeatures& f) {
  const bool avx2 = f.avx2 && f.fma && f.f16c;
  // WART: the AVX-512 level requires VNNI (Cascade Lake and later); Skylake-X falls back to
  // AVX2 rather than carrying a third integer dot-product variant.
  const bool avx512 = avx2 && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.avx512vnni;
  // AMX is detected (Cpu().amx_int8) but has no kernels of its own, so the best level on an
  // AMX machine is AVX-512: what the kernels run, and what benchmarks report. AMX-INT8 tile
  // kernels for Q8_0/Q4_0 prefill were built and measured no faster than the VNNI panels
  // (docs/benchmarks.md, "AMX"), so they are not kept.
  if (avx512) return Isa::kAvx512;
  if (avx2) return Isa::kAvx2;
  return Isa::kScalar;
}

Isa ComputeBestIsa() {
  Isa isa = HardwareIsa(Cpu());
  if (const char* env = std::getenv("CACHETTE_ISA")) {
    std::string s(env);
    Isa cap = isa;
    if (s == "scalar") {
      cap = Isa::kScalar;
    } else if (s == "avx2") {
      cap = Isa::kAvx2;
    } else if (s == "avx512") {
      cap = Isa::kAvx512;
    } else if (s == "amx") {
      cap = Isa::kAmx;
    } else {
      CT_LOG(kWarning) << "CACHETTE_ISA=" << s
                       << " is not one of scalar, avx2, avx512, amx: ignored";
    }
    isa = std::min(isa, cap);
  }
  return isa;
}

const internal::Ops& OpsFor(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return internal::ScalarOps();
    case Isa::kAvx2:
      return internal::Avx2Ops();
    // WART: the AMX level runs the AVX-512 kernels (see HardwareIsa).
    case Isa::kAvx512:
    case Isa::kAmx:
      return internal::Avx512Ops();
  }
  return internal::ScalarOps();
}

// internal::Q8DecodeOrder()'s choice where CACHETTE_Q8_DECODE does not make it.
internal::Q8Order DefaultQ8DecodeOrder() {
  using internal::Q8Order;
  if (const char* env = std::getenv("CACHETTE_Q8_DECODE")) {
    const std::string s(env);
    if (s == "rows") return Q8Order::kRows;
    if (s == "step") return Q8Order::kStep;
    CT_LOG(kWarning) << "CACHETTE_Q8_DECODE=" << s << " is not one of rows, step: ignored";
  }
  // In step on every processor measured: on Zen 5 50-60% faster than rows, on Zen 3 (since
  // the in-step tile prefetches each line once) 5-13% (docs/benchmarks.md, 2026-12-06).
  return Q8Order::kStep;
}

std::atomic<internal::Q8Order> g_q8_order{DefaultQ8DecodeOrder()};
std::atomic<Isa> g_active{BestIsa()};
std::atomic<const internal::Ops*> g_ops{&OpsFor(BestIsa())};

const internal::Ops& ActiveOps() { return *g_ops.load(std::memory_order_relaxed); }

// Quantizing activations is O(m * cols), tiny next to the O(m * cols * rows) product, so
// only large calls split it over threads (a fork-join costs a few microseconds).
constexpr int64_t kParallelQuantizeElems = 1 << 16;

}  // namespace

std::string_view IsaName(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return "scalar";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAmx:
      return "amx";
  }
  return "?";
}

const CpuFeatures& Cpu() {
  static const CpuFeatures f = DetectCpu();
  return f;
}

Isa BestIsa() {
  static const Isa isa = ComputeBestIsa();
  return isa;
}

Isa ActiveIsa() { return g_active.load(std::memory_order_relaxed); }

double FmaPeakFlops(double seconds) {
  const internal::Ops& ops = ActiveOps();
  using Clock = std::chrono::steady_clock;
  // About 0.1 ms a call on a core doing two vector FMAs a cycle.
  constexpr int64_t kSteps = int64_t{1} << 16;
  float sink = 0;
  const auto run_for = [&](double s) {
    int64_t flops = 0;
    const Clock::time_point t0 = Clock::now();
    double elapsed = 0;
    do {
      flops += ops.fma_chains(kSteps, &sink);
      elapsed = std::chrono::duration<double>(Clock::now() - t0).count();
    } while (elapsed < s);
    return flops / elapsed;
  };
  // Untimed: wide vector units and clocks that wake up on first use.
  run_for(std::min(0.05, seconds / 4));
  return run_for(seconds);
}

void SetIsa(Isa isa) {
  isa = std::min(isa, BestIsa());
  g_active.store(isa);
  g_ops.store(&OpsFor(isa));
}

std::string_view WTypeName(WType t) {
  switch (t) {
    case WType::kF32:
      return "f32";
    case WType::kF16:
      return "f16";
    case WType::kBF16:
      return "bf16";
    case WType::kQ8_0:
      return "q8_0";
    case WType::kQ4_0:
      return "q4_0";
  }
  return "?";
}

int64_t WTypeBlockElems(WType t) { return t == WType::kQ8_0 || t == WType::kQ4_0 ? 32 : 1; }

int64_t WTypeBlockBytes(WType t) {
  switch (t) {
    case WType::kF32:
      return 4;
    case WType::kF16:
      return 2;
    case WType::kBF16:
      return 2;
    case WType::kQ8_0:
      return 34;
    case WType::kQ4_0:
      return 18;
  }
  return 0;
}

size_t WTypeRowBytes(WType t, int64_t cols) {
  return static_cast<size_t>(cols / WTypeBlockElems(t) * WTypeBlockBytes(t));
}

bool UsesDecodeScales(WType t) {
  return (t == WType::kQ8_0 || t == WType::kQ4_0) && ActiveIsa() != Isa::kScalar;
}

std::vector<uint16_t> DecodeScales(const WeightMatrix& w) {
  CT_CHECK(w.type == WType::kQ8_0 || w.type == WType::kQ4_0) << WTypeName(w.type);
  const int64_t nb = w.cols / 32, groups = (w.rows + 7) / 8;
  std::vector<uint16_t> out(DecodeScalesCount(w));
  for (int64_t g = 0; g < groups; ++g) {
    for (int r = 0; r < 8; ++r) {
      const int64_t row = std::min(g * 8 + r, w.rows - 1);
      for (int64_t b = 0; b < nb; ++b) {
        std::memcpy(&out[static_cast<size_t>((g * nb + b) * 8 + r)], QuantBlockAt(w, row, b), 2);
      }
    }
  }
  return out;
}

void InterleaveRows8(WType t, int64_t rows, int64_t cols, void* data) {
  CT_CHECK(t == WType::kQ8_0 || t == WType::kQ4_0) << WTypeName(t);
  const size_t bb = static_cast<size_t>(WTypeBlockBytes(t));
  const size_t nb = static_cast<size_t>(cols / 32), row_bytes = nb * bb;
  std::vector<uint8_t> group(8 * row_bytes);
  for (int64_t g = 0; g + 8 <= rows; g += 8) {
    uint8_t* p = static_cast<uint8_t*>(data) + static_cast<size_t>(g) * row_bytes;
    std::memcpy(group.data(), p, group.size());
    for (size_t r = 0; r < 8; ++r) {
      for (size_t b = 0; b < nb; ++b) {
        std::memcpy(p + (b * 8 + r) * bb, group.data() + r * row_bytes + b * bb, bb);
      }
    }
  }
}

bool PrefersInterleaved8(WType t) {
  // CACHETTE_WEIGHT_LAYOUT=rows keeps the row layout (to measure one against the other).
  static const bool allowed = [] {
    const char* env = std::getenv("CACHETTE_WEIGHT_LAYOUT");
    if (env == nullptr || std::string_view(env) == "interleaved") return true;
    if (std::string_view(env) == "rows") return false;
    CT_LOG(kWarning) << "CACHETTE_WEIGHT_LAYOUT=" << env
                     << " is not one of rows, interleaved: ignored";
    return true;
  }();
  return allowed && (t == WType::kQ8_0 || t == WType::kQ4_0) && ActiveIsa() == Isa::kAvx2;
}

size_t DecodeScalesCount(const WeightMatrix& w) {
  return static_cast<size_t>((w.rows + 7) / 8 * (w.cols / 32) * 8);
}

namespace {

// The size of cpu0's highest cache level in bytes, from sysfs (the kernel's reading of CPUID;
// glibc's sysconf can report the whole package's L3 in a VM), or -1.
int64_t LastLevelCacheBytes() {
  int64_t best = -1;
  int best_level = 0;
  for (int i = 0; i < 8; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    std::FILE* f_level = std::fopen((dir + "level").c_str(), "r");
    if (f_level == nullptr) break;
    int level = 0;
    const bool got_level = std::fscanf(f_level, "%d", &level) == 1;
    std::fclose(f_level);
    std::FILE* f_size = std::fopen((dir + "size").c_str(), "r");
    if (f_size == nullptr) continue;
    long long n = 0;
    char unit = 0;
    const int got = std::fscanf(f_size, "%lld%c", &n, &unit);
    std::fclose(f_size);
    if (!got_level || got < 1 || n <= 0 || level < best_level) continue;
    best_level = level;
    best = n * (unit == 'K' ? 1024 : unit == 'M' ? 1024 * 1024 : 1);
  }
  return best;
}

}  // namespace

bool FitsInLastLevelCache(uint64_t bytes) {
  static const int64_t llc = LastLevelCacheBytes();
  return llc > 0 && bytes <= static_cast<uint64_t>(llc) / 2;
}

// ---- Scratch -----------------------------------------------------------------------------

namespace internal {
Q8Order Q8DecodeOrder() { return g_q8_order.load(std::memory_order_relaxed); }
void SetQ8DecodeOrder(Q8Order order) { g_q8_order.store(order); }

namespace {
struct ScratchSlot {
  void* p = nullptr;
  size_t bytes = 0;
  ~ScratchSlot() { std::free(p); }
};
constexpr int kScratchSlots = 4;
}  // namespace

void* ThreadScratch(int slot, size_t bytes) {
  thread_local ScratchSlot slots[kScratchSlots];
  CT_CHECK(slot >= 0 && slot < kScratchSlots) << "scratch slot " << slot;
  ScratchSlot& s = slots[slot];
  if (s.bytes < bytes) {
    std::free(s.p);
    // Round up so that slightly growing shapes do not reallocate every call.
    const size_t want = std::max<size_t>(bytes + bytes / 4, 4096);
    const size_t rounded = (want + 63) / 64 * 64;
    s.p = std::aligned_alloc(64, rounded);
    CT_CHECK(s.p != nullptr) << "out of memory for " << rounded << " scratch bytes";
    s.bytes = rounded;
  }
  return s.p;
}

size_t ActQ8Bytes(int64_t m, int64_t cols) {
  const int64_t nb = cols / 32;
  const size_t q = (static_cast<size_t>(m * cols) + 63) / 64 * 64;
  return q + static_cast<size_t>(m * nb) * (sizeof(float) + sizeof(int32_t)) + 64;
}

ActQ8 ActQ8View(void* buf, int64_t m, int64_t cols) {
  const int64_t nb = cols / 32;
  auto* p = static_cast<std::byte*>(buf);
  const size_t q = (static_cast<size_t>(m * cols) + 63) / 64 * 64;
  ActQ8 a;
  a.q = reinterpret_cast<int8_t*>(p);
  a.d = reinterpret_cast<float*>(p + q);
  a.sum = reinterpret_cast<int32_t*>(p + q + static_cast<size_t>(m * nb) * sizeof(float));
  a.m = m;
  a.cols = cols;
  return a;
}
}  // namespace internal

// ---- MatMul ------------------------------------------------------------------------------

namespace {

void CheckMatMulShape(const WeightMatrix& w) {
  CT_CHECK(w.cols % WTypeBlockElems(w.type) == 0)
      << "cols " << w.cols << " for " << WTypeName(w.type);
  CT_CHECK(w.row_bytes >= WTypeRowBytes(w.type, w.cols)) << "row_bytes " << w.row_bytes;
  CT_CHECK(!w.interleaved8 || ((w.type == WType::kQ8_0 || w.type == WType::kQ4_0) &&
                               w.row_bytes == WTypeRowBytes(w.type, w.cols)))
      << "interleaved " << WTypeName(w.type) << " with row_bytes " << w.row_bytes;
}

// The kernels for a matmul: the active level's, except that the AVX-512 level hands
// interleaved weights (WeightMatrix::interleaved8) to its AVX2 kernels, which give the same
// bits for q8_0 and q4_0 (docs/kernels.md) and read that layout.
const internal::Ops& MatMulOps(bool interleaved) {
  const internal::Ops& ops = ActiveOps();
  return interleaved && ops.isa >= Isa::kAvx512 ? internal::Avx2Ops() : ops;
}

// x quantized to 8 bits per block of `cols` for the quantized weight types, in the caller's
// scratch (workers only read it); an empty view for the others.
internal::ActQ8 QuantizeActivations(const float* x, int64_t m, WType type, int64_t cols,
                                    ThreadPool& pool) {
  if (type != WType::kQ8_0 && type != WType::kQ4_0) return {};
  const internal::Ops& ops = ActiveOps();
  internal::ActQ8 act =
      internal::ActQ8View(internal::ThreadScratch(0, internal::ActQ8Bytes(m, cols)), m, cols);
  if (m * cols >= kParallelQuantizeElems && pool.size() > 1) {
    pool.ParallelFor(m, [&](int64_t t0, int64_t t1, int) { ops.quantize_act(x, t0, t1, act); });
  } else {
    ops.quantize_act(x, 0, m, act);
  }
  return act;
}

// A few tokens (decode): the weights stream from memory once and each thread's rows should
// be one run in address order, the threads finishing together (ParallelForStreaming: 6-9%
// off a decode step's matmuls on a 2-vCPU Zen 5, where the threads had waited for each other
// about a tenth of the step). More tokens: fewer, larger ranges, each reusing x's blocks.
constexpr int64_t kStreamingMaxM = 4;

void ParallelRows(ThreadPool& pool, int64_t m, int64_t n, const ThreadPool::RangeFn& fn,
                  int64_t grain) {
  if (m <= kStreamingMaxM) {
    pool.ParallelForStreaming(n, fn, grain);
  } else {
    pool.ParallelFor(n, fn, grain);
  }
}

}  // namespace

void MatMul(const float* x, int64_t m, const WeightMatrix& w, float* y, ThreadPool& pool) {
  if (m <= 0 || w.rows <= 0) return;
  CheckMatMulShape(w);
  const internal::Ops& ops = MatMulOps(w.interleaved8);
  internal::MatMulArgs a;
  a.x = x;
  a.m = m;
  a.w = &w;
  a.y = y;
  a.act = QuantizeActivations(x, m, w.type, w.cols, pool);
  ParallelRows(
      pool, m, w.rows, [&](int64_t r0, int64_t r1, int) { ops.matmul_rows(a, r0, r1); },
      ops.row_grain(w.type, m));
}

void MatMulGroup(const float* x, int64_t m, std::span<const WeightMatrix* const> ws,
                 std::span<float* const> ys, ThreadPool& pool) {
  CT_CHECK(ws.size() == ys.size()) << ws.size() << " matrices, " << ys.size() << " outputs";
  constexpr size_t kMaxGroup = 4;
  bool alike = !ws.empty() && ws.size() <= kMaxGroup;
  for (const WeightMatrix* w : ws) {
    alike = alike && w->type == ws[0]->type && w->cols == ws[0]->cols;
  }
  if (!alike || m <= 0) {
    for (size_t i = 0; i < ws.size(); ++i) MatMul(x, m, *ws[i], ys[i], pool);
    return;
  }
  bool interleaved = false;
  for (const WeightMatrix* w : ws) interleaved = interleaved || w->interleaved8;
  const internal::Ops& ops = MatMulOps(interleaved);
  const WType type = ws[0]->type;
  const int64_t grain = ops.row_grain(type, m);
  const internal::ActQ8 act = QuantizeActivations(x, m, type, ws[0]->cols, pool);
  // The matrices' rows side by side in units of `grain` rows, each matrix starting a unit, so
  // every range a thread takes splits each matrix at multiples of grain, as MatMul does.
  internal::MatMulArgs args[kMaxGroup];
  int64_t first_unit[kMaxGroup + 1] = {0};
  for (size_t i = 0; i < ws.size(); ++i) {
    CheckMatMulShape(*ws[i]);
    args[i].x = x;
    args[i].m = m;
    args[i].w = ws[i];
    args[i].y = ys[i];
    args[i].act = act;
    first_unit[i + 1] = first_unit[i] + (ws[i]->rows + grain - 1) / grain;
  }
  const size_t n = ws.size();
  ParallelRows(pool, m, first_unit[n], [&](int64_t u0, int64_t u1, int) {
    for (size_t i = 0; i < n; ++i) {
      const int64_t b = std::max(u0, first_unit[i]), e = std::min(u1, first_unit[i + 1]);
      if (b >= e) continue;
      const int64_t r0 = (b - first_unit[i]) * grain;
      const int64_t r1 = std::min(ws[i]->rows, (e - first_unit[i]) * grain);
      ops.matmul_rows(args[i], r0, r1);
    }
  }, 1);
}

void DequantizeRow(const WeightMatrix& w, int64_t row, float* out) {
  CT_CHECK(row >= 0 && row < w.rows) << "row " << row << " of " << w.rows;
  ActiveOps().dequantize_row(w, row, out);
}

void RmsNorm(const float* x, const float* weight, float* y, int64_t rows, int64_t dim, float eps) {
  ActiveOps().rms_norm(x, weight, y, rows, dim, eps);
}

void Softmax(float* x, int64_t n) { ActiveOps().softmax(x, n); }

void SwiGlu(const float* gate, const float* up, float* out, int64_t n) {
  ActiveOps().swiglu(gate, up, out, n);
}

void Add(const float* x, float* y, int64_t n) { ActiveOps().add(x, y, n); }

// ---- RoPE --------------------------------------------------------------------------------

// One implementation for all ISAs: per token the cos/sin table [head_dim/2] is computed once in
// double and shared by all heads (and by the next tokens while their position is the same: a
// shift of many cached keys by one delta computes it once); the rotation itself is a few flops
// per element, far below the matmuls around it, so a vector version is not worth its test
// surface.
void Rope(float* x, int64_t n_tok, int n_head, const int32_t* pos, const RopeParams& p) {
  const int hd = p.head_dim;
  CT_CHECK(hd > 0 && hd % 2 == 0) << "head_dim " << hd;
  const int half = hd / 2;
  auto* tab = static_cast<double*>(internal::ThreadScratch(1, sizeof(double) * 3 * half));
  double* inv_freq = tab;       // [half]
  double* cs = tab + half;      // [half] cos
  double* sn = tab + 2 * half;  // [half] sin
  for (int i = 0; i < half; ++i) {
    inv_freq[i] = std::pow(static_cast<double>(p.theta_base), -2.0 * i / hd);
  }
  for (int64_t t = 0; t < n_tok; ++t) {
    if (t == 0 || pos[t] != pos[t - 1]) {
      const double position = static_cast<double>(pos[t]) * p.freq_scale;
      for (int i = 0; i < half; ++i) {
        const double angle = position * inv_freq[i];
        cs[i] = std::cos(angle);
        sn[i] = std::sin(angle);
      }
    }
    for (int h = 0; h < n_head; ++h) {
      float* v = x + (t * n_head + h) * hd;
      // kNormal pairs are (2i, 2i+1); kNeox pairs are (i, i + half).
      const int stride = p.style == RopeStyle::kNormal ? 2 : 1;
      const int offset = p.style == RopeStyle::kNormal ? 1 : half;
      for (int i = 0; i < half; ++i) {
        float* a = v + i * stride;
        float* b = a + offset;
        const double x0 = *a, x1 = *b;
        *a = static_cast<float>(x0 * cs[i] - x1 * sn[i]);
        *b = static_cast<float>(x0 * sn[i] + x1 * cs[i]);
      }
    }
  }
}

// ---- KV storage --------------------------------------------------------------------------

std::string_view KvTypeName(KvType t) {
  switch (t) {
    case KvType::kF32:
      return "f32";
    case KvType::kF16:
      return "f16";
    case KvType::kQ8_0:
      return "q8_0";
    case KvType::kQ4_0:
      return "q4_0";
    case KvType::kKivi4:
      return "kivi4";
    case KvType::kQ4_1:
      return "q4_1";
  }
  return "?";
}

std::optional<KvType> KvTypeFromName(std::string_view name) {
  for (const KvType t : {KvType::kF32, KvType::kF16, KvType::kQ8_0, KvType::kQ4_0, KvType::kKivi4,
                         KvType::kQ4_1}) {
    if (name == KvTypeName(t)) return t;
  }
  return std::nullopt;
}

int KvTypeBlockElems(KvType t) { return t == KvType::kF32 || t == KvType::kF16 ? 1 : 32; }

size_t KvHeadBytes(KvType t, int head_dim) {
  switch (t) {
    case KvType::kF32:
      return static_cast<size_t>(head_dim) * 4;
    case KvType::kF16:
      return static_cast<size_t>(head_dim) * 2;
    case KvType::kQ8_0:
      return static_cast<size_t>(head_dim / 32) * 34;
    case KvType::kQ4_0:
      return static_cast<size_t>(head_dim / 32) * 18;
    case KvType::kKivi4:
    case KvType::kQ4_1:
      return static_cast<size_t>(head_dim / 32) * 20;
  }
  return 0;
}

float KvDot(const float* q, const void* k, int head_dim, KvType t) {
  CT_CHECK(t != KvType::kKivi4) << "kivi4 K is read by groups of tokens";
  return ActiveOps().kv_dot(q, k, head_dim, t);
}

namespace {

// One 32-element quantization block: its largest magnitude, the element that has it (sign
// kept; the first on ties), and whether it holds a NaN. Unlike ggml, a block with a NaN gets a
// NaN scale, so it reads back as NaN rather than silently as numbers (as in f32/f16).
struct BlockScan {
  float amax = 0, max = 0;
  bool nan = false;
};

BlockScan ScanBlock(const float* s) {
  BlockScan k;
  for (int j = 0; j < 32; ++j) {
    if (std::fabs(s[j]) > k.amax) {
      k.amax = std::fabs(s[j]);
      k.max = s[j];
    }
    k.nan |= std::isnan(s[j]);
  }
  return k;
}

}  // namespace

// Scalar at every ISA level: StoreKv converts one token's K/V (n_kv_head * head_dim, ~100s of
// values) per layer per step, noise next to the matmuls.
namespace internal {

void FixNanHalves(const float* x, uint8_t* out, int n) {
  for (int j = 0; j < n; ++j) {
    if (std::isnan(x[j])) {
      const uint16_t h = Fp32ToFp16(x[j]);
      std::memcpy(out + 2 * j, &h, 2);
    }
  }
}

void FixNanFloats(const uint8_t* in, float* y, int n) {
  for (int j = 0; j < n; ++j) {
    uint16_t h;
    std::memcpy(&h, in + 2 * j, 2);
    if ((h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0) y[j] = Fp16ToFp32(h);
  }
}

}  // namespace internal

void StoreKv(const float* src, int64_t n_vec, int head_dim, KvType t, void* dst) {
  CT_CHECK(t != KvType::kKivi4) << "kivi4 K is stored by groups of tokens (StoreKiviGroup)";
  CT_CHECK(head_dim % KvTypeBlockElems(t) == 0)
      << KvTypeName(t) << " KV needs head_dim % " << KvTypeBlockElems(t) << " == 0, got "
      << head_dim;
  auto* out = static_cast<uint8_t*>(dst);
  const int64_t n = n_vec * head_dim;
  switch (t) {
    case KvType::kF32:
      std::memcpy(dst, src, static_cast<size_t>(n) * 4);
      return;
    case KvType::kF16:
      ActiveOps().f32_to_f16(src, out, n);
      return;
    case KvType::kQ8_0: {
      for (int64_t b = 0; b < n / 32; ++b) {
        const float* s = src + b * 32;
        uint8_t* blk = out + b * 34;
        const BlockScan k = ScanBlock(s);
        const float d = k.nan ? std::numeric_limits<float>::quiet_NaN() : k.amax / 127.0f;
        const float id = d != 0 && !k.nan ? 1.0f / d : 0.0f;
        const uint16_t dh = Fp32ToFp16(d);
        std::memcpy(blk, &dh, 2);
        for (int j = 0; j < 32; ++j) {
          // The comparisons send a NaN product (inf * 0, when amax is inf) to 0 before the
          // float -> int cast, which would be undefined for it.
          const float q = std::nearbyint(s[j] * id);
          const float c = q >= -127.0f ? (q <= 127.0f ? q : 127.0f) : (q < 0 ? -127.0f : 0.0f);
          blk[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(c));
        }
      }
      return;
    }
    case KvType::kQ4_0: {
      for (int64_t b = 0; b < n / 32; ++b) {
        const float* s = src + b * 32;
        uint8_t* blk = out + b * 18;
        // The element of largest magnitude maps to nib 0 (-8, the wider end of [-8, 7]).
        const BlockScan k = ScanBlock(s);
        const float d = k.nan ? std::numeric_limits<float>::quiet_NaN() : k.max / -8.0f;
        const float id = d != 0 && !k.nan ? 1.0f / d : 0.0f;
        const uint16_t dh = Fp32ToFp16(d);
        std::memcpy(blk, &dh, 2);
        // x * id lies in [-8, 8], so + 8.5 truncated is round-half-up into [0, 16]; the
        // comparisons also send a NaN product (inf * 0) to 15 before any float -> int cast.
        auto nib = [&](float x) {
          const float v = x * id + 8.5f;
          return v < 15.0f ? static_cast<int>(v) : 15;
        };
        for (int j = 0; j < 16; ++j) {
          blk[2 + j] = static_cast<uint8_t>(nib(s[j]) | (nib(s[j + 16]) << 4));
        }
      }
      return;
    }
    case KvType::kQ4_1: {
      for (int64_t b = 0; b < n / 32; ++b) {
        const float* s = src + b * 32;
        uint8_t* blk = out + b * 20;
        float mn = s[0], mx = s[0];
        bool finite = true;
        for (int j = 0; j < 32; ++j) {
          finite &= std::isfinite(s[j]);
          mn = s[j] < mn ? s[j] : mn;
          mx = s[j] > mx ? s[j] : mx;
        }
        const float nan = std::numeric_limits<float>::quiet_NaN();
        const float d = finite ? (mx - mn) / 15.0f : nan;
        const float id = finite && d != 0 ? 1.0f / d : 0.0f;
        const uint16_t dh = Fp32ToFp16(d), mh = Fp32ToFp16(finite ? mn : nan);
        std::memcpy(blk, &dh, 2);
        std::memcpy(blk + 2, &mh, 2);
        // (x - min) * id lies in [0, 15] up to rounding: + 0.5 truncated rounds half up.
        auto nib = [&](float x) {
          const float v = finite ? (x - mn) * id + 0.5f : 0.0f;
          return v < 15.0f ? static_cast<int>(v) : 15;
        };
        for (int j = 0; j < 16; ++j) {
          blk[4 + j] = static_cast<uint8_t>(nib(s[j]) | (nib(s[j + 16]) << 4));
        }
      }
      return;
    }
    case KvType::kKivi4:
      return;  // refused above
  }
}

void LoadKv(const void* src, int64_t n_vec, int head_dim, KvType t, float* dst) {
  CT_CHECK(t != KvType::kKivi4) << "kivi4 K is read by groups of tokens (LoadKiviGroup)";
  const auto* in = static_cast<const uint8_t*>(src);
  const int64_t n = n_vec * head_dim;
  switch (t) {
    case KvType::kF32:
      std::memcpy(dst, src, static_cast<size_t>(n) * 4);
      return;
    case KvType::kF16:
      ActiveOps().f16_to_f32(in, dst, n);
      return;
    case KvType::kQ8_0:
      for (int64_t b = 0; b < n / 32; ++b) {
        const uint8_t* blk = in + b * 34;
        uint16_t dh;
        std::memcpy(&dh, blk, 2);
        const float d = Fp16ToFp32(dh);
        for (int j = 0; j < 32; ++j) dst[b * 32 + j] = d * static_cast<int8_t>(blk[2 + j]);
      }
      return;
    case KvType::kQ4_0:
      for (int64_t b = 0; b < n / 32; ++b) {
        const uint8_t* blk = in + b * 18;
        uint16_t dh;
        std::memcpy(&dh, blk, 2);
        const float d = Fp16ToFp32(dh);
        for (int j = 0; j < 16; ++j) {
          dst[b * 32 + j] = d * ((blk[2 + j] & 0x0f) - 8);
          dst[b * 32 + j + 16] = d * ((blk[2 + j] >> 4) - 8);
        }
      }
      return;
    case KvType::kQ4_1:
      for (int64_t b = 0; b < n / 32; ++b) {
        const uint8_t* blk = in + b * 20;
        uint16_t dh, mh;
        std::memcpy(&dh, blk, 2);
        std::memcpy(&mh, blk + 2, 2);
        const float d = Fp16ToFp32(dh), m = Fp16ToFp32(mh);
        for (int j = 0; j < 16; ++j) {
          dst[b * 32 + j] = std::fma(d, static_cast<float>(blk[4 + j] & 0x0f), m);
          dst[b * 32 + j + 16] = std::fma(d, static_cast<float>(blk[4 + j] >> 4), m);
        }
      }
      return;
    case KvType::kKivi4:
      break;  // refused above
  }
}

// ---- kivi4 -------------------------------------------------------------------------------

namespace {

constexpr size_t kKiviBlockBytes = 20;  // { f16 scale; f16 min; uint8 qs[16] }

// Scale and min of 32 values x[i * stride] (KIVI's asymmetric 4-bit: min + scale * [0, 15]),
// as stored (f16) and read back; NaN for both when a value is not finite.
struct KiviParams {
  uint16_t scale_h, min_h;
  float scale, min;
};

KiviParams KiviParamsOf(const float* x, size_t stride) {
  float mn = x[0], mx = x[0];
  bool finite = true;
  for (int i = 0; i < 32; ++i) {
    const float v = x[i * stride];
    finite &= std::isfinite(v);
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
  }
  KiviParams p;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  p.scale_h = Fp32ToFp16(finite ? (mx - mn) / 15.0f : nan);
  p.min_h = Fp32ToFp16(finite ? mn : nan);
  p.scale = Fp16ToFp32(p.scale_h);
  p.min = Fp16ToFp32(p.min_h);
  return p;
}

// The nibble of x under p: round to nearest of (x - min) / scale, clamped to [0, 15] (0 for a
// zero or NaN scale; the comparisons keep a NaN away from the float -> int cast).
int KiviNibble(float x, const KiviParams& p) {
  if (!(p.scale > 0)) return 0;
  const float c = std::nearbyint((x - p.min) / p.scale);
  return c >= 0.0f ? (c <= 15.0f ? static_cast<int>(c) : 15) : 0;
}

void PutNibble(uint8_t* qs, int j, int nib) {
  if (j < 16) {
    qs[j] = static_cast<uint8_t>((qs[j] & 0xf0) | nib);
  } else {
    qs[j - 16] = static_cast<uint8_t>((qs[j - 16] & 0x0f) | (nib << 4));
  }
}

int GetNibble(const uint8_t* qs, int j) { return j < 16 ? qs[j] & 0x0f : qs[j - 16] >> 4; }

}  // namespace

void StoreKiviGroup(const float* k, const float* v, int n_kv_head, int head_dim, void* k_dst,
                    void* v_dst, size_t dst_stride) {
  CT_CHECK(head_dim % 32 == 0) << "kivi4 KV needs head_dim % 32 == 0, got " << head_dim;
  const size_t hb = KvHeadBytes(KvType::kKivi4, head_dim);
  const size_t row = static_cast<size_t>(n_kv_head) * head_dim;  // floats per token
  auto* kd = static_cast<uint8_t*>(k_dst);
  auto* vd = static_cast<uint8_t*>(v_dst);
  for (int h = 0; h < n_kv_head; ++h) {
    for (int b = 0; b < head_dim / 32; ++b) {
      // K: channel 32b + r over the group's tokens; its params go to token r's block header.
      for (int r = 0; r < kKiviGroup; ++r) {
        const int c = 32 * b + r;
        const KiviParams p = KiviParamsOf(k + h * head_dim + c, row);
        uint8_t* hdr = kd + r * dst_stride + h * hb + b * kKiviBlockBytes;
        std::memcpy(hdr, &p.scale_h, 2);
        std::memcpy(hdr + 2, &p.min_h, 2);
        for (int t = 0; t < kKiviGroup; ++t) {
          PutNibble(kd + t * dst_stride + h * hb + b * kKiviBlockBytes + 4, r,
                    KiviNibble(k[t * row + h * head_dim + c], p));
        }
      }
      // V: each token's 32 elements of the block.
      for (int t = 0; t < kKiviGroup; ++t) {
        const float* x = v + t * row + h * head_dim + 32 * b;
        const KiviParams p = KiviParamsOf(x, 1);
        uint8_t* blk = vd + t * dst_stride + h * hb + b * kKiviBlockBytes;
        std::memcpy(blk, &p.scale_h, 2);
        std::memcpy(blk + 2, &p.min_h, 2);
        for (int j = 0; j < 32; ++j) PutNibble(blk + 4, j, KiviNibble(x[j], p));
      }
    }
  }
}

void LoadKiviGroup(const void* k_src, const void* v_src, size_t src_stride, int n_kv_head,
                   int head_dim, float* k, float* v) {
  CT_CHECK(head_dim % 32 == 0) << "kivi4 KV needs head_dim % 32 == 0, got " << head_dim;
  const size_t hb = KvHeadBytes(KvType::kKivi4, head_dim);
  const size_t row = static_cast<size_t>(n_kv_head) * head_dim;
  const auto* ks = static_cast<const uint8_t*>(k_src);
  const auto* vs = static_cast<const uint8_t*>(v_src);
  std::vector<float> scale(head_dim), min(head_dim);
  for (int h = 0; h < n_kv_head; ++h) {
    internal::KiviKeyParams(ks + h * hb, src_stride, head_dim, scale.data(), min.data());
    for (int t = 0; t < kKiviGroup; ++t) {
      internal::KiviKeyRow(ks + t * src_stride + h * hb, head_dim, scale.data(), min.data(),
                           k + t * row + h * head_dim);
      internal::KiviValueRow(vs + t * src_stride + h * hb, head_dim, v + t * row + h * head_dim);
    }
  }
}

namespace internal {

void KiviKeyParams(const void* first, size_t stride, int head_dim, float* scale, float* min) {
  const auto* p = static_cast<const uint8_t*>(first);
  for (int r = 0; r < kKiviGroup; ++r) {
    for (int b = 0; b < head_dim / 32; ++b) {
      const uint8_t* hdr = p + r * stride + b * kKiviBlockBytes;
      uint16_t sh, mh;
      std::memcpy(&sh, hdr, 2);
      std::memcpy(&mh, hdr + 2, 2);
      scale[32 * b + r] = Fp16ToFp32(sh);
      min[32 * b + r] = Fp16ToFp32(mh);
    }
  }
}

void KiviKeyRow(const void* k, int head_dim, const float* scale, const float* min, float* out) {
  const auto* p = static_cast<const uint8_t*>(k);
  for (int b = 0; b < head_dim / 32; ++b) {
    const uint8_t* qs = p + b * kKiviBlockBytes + 4;
    for (int j = 0; j < 32; ++j) {
      const int c = 32 * b + j;
      out[c] = std::fma(scale[c], static_cast<float>(GetNibble(qs, j)), min[c]);
    }
  }
}

void KiviValueRow(const void* v, int head_dim, float* out) {
  const auto* p = static_cast<const uint8_t*>(v);
  for (int b = 0; b < head_dim / 32; ++b) {
    const uint8_t* blk = p + b * kKiviBlockBytes;
    uint16_t sh, mh;
    std::memcpy(&sh, blk, 2);
    std::memcpy(&mh, blk + 2, 2);
    const float scale = Fp16ToFp32(sh), min = Fp16ToFp32(mh);
    for (int j = 0; j < 32; ++j) {
      out[32 * b + j] = std::fma(scale, static_cast<float>(GetNibble(blk + 4, j)), min);
    }
  }
}

const uint8_t* KvSlot(const KvView& kv, bool v, int kvh, int64_t slot) {
  // WART: written without `(v ? a : b)[i]`: GCC 12 at -O1 with -fsanitize=undefined compiled
  // that subscript as [0] on the k_blocks side (the asan preset; found by kernels_test).
  const int64_t block = slot / kv.block_tokens, in_block = slot % kv.block_tokens;
  const void* base = v ? kv.v_blocks[block] : kv.k_blocks[block];
  const size_t hb = KvHeadBytes(kv.type, kv.head_dim);
  return static_cast<const uint8_t*>(base) +
         static_cast<size_t>(in_block) * hb * kv.n_kv_head + static_cast<size_t>(kvh) * hb;
}

void FindTile(const KvView& kv, int kvh, int64_t j0, int n, TileAddrs* t) {
  const size_t hb = KvHeadBytes(kv.type, kv.head_dim);
  const size_t tok_bytes = hb * kv.n_kv_head;
  t->n = n;
  t->n_blocks = static_cast<int>(std::clamp<int64_t>(kv.tail_begin - j0, 0, n));
  int64_t block = j0 / kv.block_tokens, in_block = j0 % kv.block_tokens;
  for (int j = 0; j < t->n_blocks; ++block, in_block = 0) {
    const size_t off = static_cast<size_t>(in_block) * tok_bytes + static_cast<size_t>(kvh) * hb;
    const uint8_t* k = static_cast<const uint8_t*>(kv.k_blocks[block]) + off;
    const uint8_t* v = static_cast<const uint8_t*>(kv.v_blocks[block]) + off;
    for (int64_t r = in_block; r < kv.block_tokens && j < t->n_blocks; ++r, ++j) {
      t->k[j] = k;
      t->v[j] = v;
      k += tok_bytes;
      v += tok_bytes;
    }
  }
  for (int j = t->n_blocks; j < n; ++j) {
    t->k[j] = reinterpret_cast<const uint8_t*>(TailSlot(kv, false, kvh, j0 + j));
    t->v[j] = reinterpret_cast<const uint8_t*>(TailSlot(kv, true, kvh, j0 + j));
  }
}

const uint16_t* TailSlot(const KvView& kv, bool v, int kvh, int64_t slot) {
  const size_t row = static_cast<size_t>(kv.n_kv_head) * kv.head_dim;
  return static_cast<const uint16_t*>(v ? kv.tail_v : kv.tail_k) +
         static_cast<size_t>(slot % kv.tail_cap) * row + static_cast<size_t>(kvh) * kv.head_dim;
}

void WidenTile(const KvView& kv, int kvh, int64_t j0, int n, float* kt, float* vt, int ld) {
  const int hd = kv.head_dim;
  const bool kivi = kv.type == KvType::kKivi4;
  std::vector<float> scale(kivi ? hd : 0), min(scale.size());
  int64_t group = -1;
  for (int j = 0; j < n; ++j) {
    const int64_t s = j0 + j;
    if (s >= kv.tail_begin) {
      const uint16_t* kh = TailSlot(kv, false, kvh, s);
      const uint16_t* vh = TailSlot(kv, true, kvh, s);
      for (int d = 0; d < hd; ++d) {
        kt[j * ld + d] = Fp16ToFp32(kh[d]);
        vt[j * ld + d] = Fp16ToFp32(vh[d]);
      }
      continue;
    }
    if (!kivi) {
      LoadKv(KvSlot(kv, false, kvh, s), 1, hd, kv.type, kt + j * ld);
      LoadKv(KvSlot(kv, true, kvh, s), 1, hd, kv.type, vt + j * ld);
      continue;
    }
    if (s / kKiviGroup != group) {
      group = s / kKiviGroup;
      KiviKeyParams(KvSlot(kv, false, kvh, group * kKiviGroup),
                    KvHeadBytes(kv.type, hd) * kv.n_kv_head, hd, scale.data(), min.data());
    }
    KiviKeyRow(KvSlot(kv, false, kvh, s), hd, scale.data(), min.data(), kt + j * ld);
    KiviValueRow(KvSlot(kv, true, kvh, s), hd, vt + j * ld);
  }
}

}  // namespace internal

// ---- Attention ---------------------------------------------------------------------------
//
// One driver for Attention and AttentionLse. A query's keys are cut at multiples of kAttnSplit
// into splits; ops.attend_block gives each split's online-softmax state per head, and the
// states are merged in split order (MergeSplits). Work units are (query, KV head) when there are
// enough of them to fill the threads; otherwise (a decode step over a long context) they are
// (query, KV head, split), the states go to one buffer and are merged after. Both ways compute
// each head's states and merge by the same functions in the same order, so a query's output is
// the same bits in a decode step, in a prefill chunk of any size and on any number of threads.

namespace {

constexpr int64_t kAttnSplit = 2048;
static_assert(kAttnSplit % internal::kAttnTile == 0);
// Queries per attend_block call of the rows path, at most: each K/V tile is widened once per
// block and its slots read from L2/L3 once per block. 16 against 4 took 12-15% off a 512-query
// chunk over 4,096 slots (AVX-512, Zen 5; docs/benchmarks.md); 32 and 64 measured no better.
constexpr int64_t kQueryBlock = 16;

// Floats of one split's state for `group` heads: m[group], l[group], acc[group][hd].
size_t StateFloats(int group, int hd) { return static_cast<size_t>(group) * (hd + 2); }

// Merges the states of n_split consecutive splits (each StateFloats apart) into out[group][hd]
// and, when lse is not null, lse[group]. A head that saw no key gets out = 0, lse = -inf.
void MergeSplits(const float* states, int64_t n_split, int group, int hd, float* out,
                 float* lse) {
  const size_t stride = StateFloats(group, hd);
  const float inf = std::numeric_limits<float>::infinity();
  for (int g = 0; g < group; ++g) {
    float* o = out + g * hd;
    float mx = -inf;
    for (int64_t s = 0; s < n_split; ++s) mx = std::max(mx, states[s * stride + g]);
    std::fill(o, o + hd, 0.0f);
    if (mx == -inf) {
      if (lse != nullptr) lse[g] = -inf;
      continue;
    }
    float sum = 0;
    for (int64_t s = 0; s < n_split; ++s) {
      const float* st = states + s * stride;
      if (st[g] == -inf) continue;
      const float w = std::exp(st[g] - mx);
      sum += w * st[group + g];
      const float* acc = st + 2 * group + g * hd;
      for (int d = 0; d < hd; ++d) o[d] += w * acc[d];
    }
    const float inv = 1.0f / sum;
    for (int d = 0; d < hd; ++d) o[d] *= inv;
    if (lse != nullptr) lse[g] = mx + std::log(sum);
  }
}

// Query i attends slots [begin, stop(i)), stop(i) = min(end, causal_slot0 + i + 1) when
// causal_slot0 >= 0, else end. out [n_q][n_head][hd]; lse [n_q][n_head] or null.
void AttendRanges(const float* q, int64_t n_q, int n_head, const KvView& kv, int64_t begin,
                  int64_t end, int64_t causal_slot0, float scale, float* out, float* lse,
                  ThreadPool& pool) {
  const internal::Ops& ops = ActiveOps();
  const int hd = kv.head_dim;
  const int group = n_head / kv.n_kv_head;
  const size_t state = StateFloats(group, hd);
  auto stop = [&](int64_t i) {
    return causal_slot0 < 0 ? end : std::min(end, causal_slot0 + i + 1);
  };
  // Split s of a query covers [max(begin, s * S), min(stop, (s + 1) * S)); its splits are
  // [begin / S, ceil(stop / S)), none when the range is empty.
  const int64_t first = begin / kAttnSplit;
  auto n_splits = [&](int64_t i) {
    const int64_t e = stop(i);
    return e <= begin ? int64_t{0} : (e + kAttnSplit - 1) / kAttnSplit - first;
  };
  auto split_lo = [&](int64_t s) { return std::max(begin, (first + s) * kAttnSplit); };
  auto split_hi = [&](int64_t i, int64_t s) {
    return std::min(stop(i), (first + s + 1) * kAttnSplit);
  };
  auto merge = [&](int64_t i, int kvh, const float* states) {
    const int64_t row = i * n_head + kvh * group;
    MergeSplits(states, n_splits(i), group, hd, out + row * hd,
                lse != nullptr ? lse + row : nullptr);
  };
  int64_t max_splits = 0;
  for (int64_t i : {int64_t{0}, n_q - 1}) max_splits = std::max(max_splits, n_splits(i));
  const int64_t n_rows = n_q * kv.n_kv_head;
  if (max_splits > 1 && n_rows < 2 * static_cast<int64_t>(pool.size())) {
    // Few rows over a long range: every (query, KV heads, split) is a unit, with as many KV
    // heads as leave a unit for each thread (all of them, at depth): a unit reads each slot's
    // record of its KV heads whole (docs/kernels.md, "Attention").
    int nk = kv.n_kv_head;
    while (nk > 1 && n_q * (kv.n_kv_head / nk) * max_splits < pool.size()) {
      do --nk; while (kv.n_kv_head % nk != 0);
    }
    const int n_groups = kv.n_kv_head / nk;
    auto* states = static_cast<float*>(
        internal::ThreadScratch(3, sizeof(float) * state * n_rows * max_splits));
    pool.ParallelFor(n_q * n_groups * max_splits, [&](int64_t u0, int64_t u1, int) {
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t r = u / max_splits, s = u % max_splits;
        const int64_t i = r / n_groups;
        const int kvh = static_cast<int>(r % n_groups) * nk;
        if (s >= n_splits(i)) continue;
        const int64_t hi = split_hi(i, s);
        internal::AttendJob job;
        job.q = q + (i * n_head + kvh * group) * hd;
        job.nq = 1;
        job.q_kvh_stride = static_cast<int64_t>(group) * hd;
        job.group = group;
        job.kvh = kvh;
        job.n_kvh = nk;
        job.begin = split_lo(s);
        job.ends = &hi;
        job.scale = scale;
        job.state = states + ((i * kv.n_kv_head + kvh) * max_splits + s) * state;
        job.state_kvh_stride = max_splits * state;
        ops.attend_block(kv, job);
      }
    });
    for (int64_t r = 0; r < n_rows; ++r) {
      merge(r / kv.n_kv_head, static_cast<int>(r % kv.n_kv_head), states + r * max_splits * state);
    }
    return;
  }
  // Rows as units: blocks of up to kQueryBlock consecutive queries of one KV head (each K/V
  // tile read once per block at the vector levels), of even sizes, smaller where that would
  // leave fewer than two units a thread (a short chunk after a long cached prefix). A query's
  // arithmetic does not depend on its block, so neither do its bits. Causal queries late in
  // the chunk see more keys, so blocks are visited in the order 0, n-1, 1, n-2, ... to give
  // both halves of the contiguous split equal work.
  int64_t n_blocks = (n_q + kQueryBlock - 1) / kQueryBlock;
  const int64_t min_blocks = (2 * static_cast<int64_t>(pool.size()) + kv.n_kv_head - 1) /
                             kv.n_kv_head;
  n_blocks = std::min(n_q, std::max(n_blocks, min_blocks));
  const int64_t qb = (n_q + n_blocks - 1) / n_blocks;
  n_blocks = (n_q + qb - 1) / qb;
  pool.ParallelFor(n_blocks * kv.n_kv_head, [&](int64_t u0, int64_t u1, int) {
    auto* states = static_cast<float*>(
        internal::ThreadScratch(1, sizeof(float) * state * max_splits * qb));
    int64_t ends[kQueryBlock];
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t k = u / kv.n_kv_head;
      const int64_t blk = (k % 2 == 0) ? k / 2 : n_blocks - 1 - k / 2;
      const int kvh = static_cast<int>(u % kv.n_kv_head);
      const int64_t i0 = blk * qb, i1 = std::min(n_q, i0 + qb);
      // Split s of the block: the queries with more than s splits, a suffix [ia, i1) of it
      // (a query's split count grows with i).
      for (int64_t s = 0, ia = i0; s < n_splits(i1 - 1); ++s) {
        while (n_splits(ia) <= s) ++ia;
        for (int64_t i = ia; i < i1; ++i) ends[i - ia] = split_hi(i, s);
        internal::AttendJob job;
        job.q = q + (ia * n_head + kvh * group) * hd;
        job.nq = static_cast<int>(i1 - ia);
        job.q_stride = static_cast<int64_t>(n_head) * hd;
        job.group = group;
        job.kvh = kvh;
        job.begin = split_lo(s);
        job.ends = ends;
        job.scale = scale;
        job.state = states + ((ia - i0) * max_splits + s) * state;
        job.state_stride = max_splits * state;
        ops.attend_block(kv, job);
      }
      for (int64_t i = i0; i < i1; ++i) merge(i, kvh, states + (i - i0) * max_splits * state);
    }
  });
}

void CheckView(const KvView& kv, int n_head) {
  CT_CHECK(kv.n_kv_head > 0 && n_head % kv.n_kv_head == 0)
      << "n_head " << n_head << " n_kv_head " << kv.n_kv_head;
  CT_CHECK(kv.block_tokens > 0) << "block_tokens " << kv.block_tokens;
  CT_CHECK(kv.head_dim > 0 && kv.head_dim % KvTypeBlockElems(kv.type) == 0)
      << KvTypeName(kv.type) << " KV with head_dim " << kv.head_dim;
  if (kv.tail_begin < kv.n_tokens) {
    CT_CHECK(kv.tail_begin >= 0 &&
             (kv.type != KvType::kKivi4 || kv.tail_begin % kKiviGroup == 0) &&
             kv.n_tokens - kv.tail_begin <= kv.tail_cap && kv.tail_k != nullptr &&
             kv.tail_v != nullptr)
        << KvTypeName(kv.type) << " tail from slot " << kv.tail_begin << " of " << kv.tail_cap
        << " for " << kv.n_tokens << " tokens";
  }
  if (kv.type == KvType::kKivi4) {
    // A kivi4 key group lies in one block (a page), so a group's keys are found together.
    CT_CHECK(kv.block_tokens % kKiviGroup == 0) << "kivi4 KV in blocks of " << kv.block_tokens;
  }
}

}  // namespace

void Attention(const float* q, int64_t n_q, int n_head, int64_t q_pos0, const KvView& kv,
               float scale, float* out, ThreadPool& pool) {
  if (n_q <= 0) return;
  CheckView(kv, n_head);
  CT_CHECK(q_pos0 + n_q <= kv.n_tokens)
      << "queries reach position " << q_pos0 + n_q - 1 << " but kv holds " << kv.n_tokens;
  AttendRanges(q, n_q, n_head, kv, 0, q_pos0 + n_q, q_pos0, scale, out, nullptr, pool);
}

void AttentionLse(const float* q, int64_t n_q, int n_head, const KvView& kv, int64_t begin,
                  int64_t end, int64_t causal_slot0, float score_scale, float* out, float* lse,
                  ThreadPool& pool) {
  if (n_q <= 0) return;
  CheckView(kv, n_head);
  CT_CHECK(begin >= 0 && end <= kv.n_tokens)
      << "slots [" << begin << ", " << end << ") but kv holds " << kv.n_tokens;
  AttendRanges(q, n_q, n_head, kv, begin, end, causal_slot0, score_scale, out, lse, pool);
}

}  // namespace cachette::kernels
