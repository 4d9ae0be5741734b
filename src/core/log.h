// Minimal leveled logging to stderr: CT_LOG(kInfo) << "loaded " << n << " tensors";
// One line per statement, written atomically (a single fwrite). Thread-safe.
#pragma once

#include <sstream>

namespace cachette {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

// Messages below this level are dropped. Default kInfo; CACHETTE_LOG=debug|info|warning|error.
LogLevel MinLogLevel();
void SetMinLogLevel(LogLevel level);

namespace internal {
class LogLine {
 public:
  LogLine(LogLevel level, const char* file, int line);
  ~LogLine();
  std::ostream& stream() { return os_; }

 private:
  std::ostringstream os_;
};
}  // namespace internal

}  // namespace cachette

#define CT_LOG(level)                                                           \
  if (::cachette::LogLevel::level < ::cachette::MinLogLevel()) {                \
  } else                                                                        \
    ::cachette::internal::LogLine(::cachette::LogLevel::level, __FILE__, __LINE__).stream()
