// Time helpers: monotonic (NowNanos, Stopwatch) and wall-clock (UnixMillis).
#pragma once

#include <chrono>
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

// Measures this machine's memory read bandwidth in bytes/s: the best of several passes that
// sum a buffer far larger than the last-level cache, read by `threads` threads (0 = all).
// 0 when it could not measure (no room for the buffer, or a buffer too small to split).
double MeasureMemoryReadBandwidth(size_t buffer_bytes = size_t{1} << 30, int threads = 0);

}  // namespace cachette
