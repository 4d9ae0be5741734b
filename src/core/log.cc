#include "core/log.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>

namespace cachette {
namespace {

LogLevel LevelFromEnv() {
  const char* e = std::getenv("CACHETTE_LOG");
  if (e == nullptr) return LogLevel::kInfo;
  if (std::strcmp(e, "debug") == 0) return LogLevel::kDebug;
  if (std::strcmp(e, "warning") == 0) return LogLevel::kWarning;
  if (std::strcmp(e, "error") == 0) return LogLevel::kError;
  // Written directly: CT_LOG would ask for the level being decided here.
  if (std::strcmp(e, "info") != 0) {
    std::fprintf(stderr, "W CACHETTE_LOG=%s is not one of debug, info, warning, error: info\n", e);
  }
  return LogLevel::kInfo;
}

std::atomic<int>& Level() {
  static std::atomic<int> level{static_cast<int>(LevelFromEnv())};
  return level;
}

}  // namespace

LogLevel MinLogLevel() { return static_cast<LogLevel>(Level().load(std::memory_order_relaxed)); }
void SetMinLogLevel(LogLevel level) { Level().store(static_cast<int>(level)); }

namespace internal {

LogLine::LogLine(LogLevel level, const char* file, int line) {
  static const char kTag[] = {'D', 'I', 'W', 'E'};
  auto now = std::chrono::system_clock::now();
  std::time_t t = std::chrono::system_clock::to_time_t(now);
  int ms = static_cast<int>(
      std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%H:%M:%S", &tm);
  const char* base = std::strrchr(file, '/');
  os_ << kTag[static_cast<int>(level)] << " " << buf << "." << (ms / 100) << ((ms / 10) % 10)
      << (ms % 10) << " " << (base ? base + 1 : file) << ":" << line << "] ";
}

LogLine::~LogLine() {
  os_ << '\n';
  std::string s = os_.str();
  std::fwrite(s.data(), 1, s.size(), stderr);
}

}  // namespace internal
}  // namespace cachette
