// Time helpers: monotonic (NowNanos, Stopwatch) and wall-clock (UnixMillis).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>

namespace cachette {

inline int64_t NowNanos() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Wall-clock milliseconds since 1970: for times kept across restarts (not for durations).
inline int64_t UnixMillis() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

class Stopwatch {
 public:
  Stopwatch() : start_(NowNanos()) {}
  void Reset() { start_ = NowNanos(); }
  double Seconds() const { return static_cast<double>(NowNanos() - start_) * 1e-9; }
  double Millis() const { return static_cast<double>(NowNanos() - start_) * 1e-6; }

 private:
  int64_t start_;
};

// Memory read bandwidth in bytes/s over several passes: the best pass, and the median one. On a
// shared machine the two can differ by 40% with short passes, a few percent with long ones (the
// best catches a quiet moment); a benchmark quoting a median of its own repetitions should show
// both.
struct ReadBandwidth {
  double best = 0;
  double median = 0;
};

// A memory read probe: a buffer far larger than the last-level cache, allocated and touched once,
// that `threads` threads (0 = all) sum in passes on demand. A benchmark can then time a pass
// right after each of its repetitions, so that its figure and the bandwidth it is compared with
// see the same minute of a shared machine (MeasureMemoryReadBandwidth's passes come after all
// of them). ok() is false when there was no room for the buffer, or it is too small to split.
class MemoryReadProbe {
 public:
  MemoryReadProbe(size_t buffer_bytes, int threads);
  ~MemoryReadProbe();
  MemoryReadProbe(const MemoryReadProbe&) = delete;
  MemoryReadProbe& operator=(const MemoryReadProbe&) = delete;

  bool ok() const { return buf_ != nullptr; }
  // One pass of as many sweeps over the buffer as take about `seconds` at the rate of the last
  // pass (one sweep for the first pass, or seconds <= 0; at most 1000): bytes/s, 0 if !ok() or
  // the clock did not move.
  double Pass(double seconds);

 private:
  uint64_t* buf_ = nullptr;
  size_t per_ = 0;  // words per thread
  int threads_ = 1;
  double last_rate_ = 0;
};

// Measures this machine's memory read bandwidth: five passes that sum a buffer far larger than
// the last-level cache, read by `threads` threads (0 = all). A pass sweeps the buffer once, or
// as many times as take about pass_seconds: on a shared VM one-sweep passes (20 ms for 1 GiB)
// catch moments of other tenants' load and swing by 30% within one measurement, where passes as
// long as a benchmark's repetitions agree within a few percent. Zeros when it could not measure
// (no room for the buffer, or a buffer too small to split).
ReadBandwidth MeasureMemoryReadBandwidth(size_t buffer_bytes = size_t{1} << 30, int threads = 0,
                                         double pass_seconds = 0);
// The same five passes over a probe's buffer (a benchmark's, after its paired passes).
ReadBandwidth MeasureMemoryReadBandwidth(MemoryReadProbe& probe, double pass_seconds);

}  // namespace cachette
