// A warning that a peer can provoke (a malformed message, a bad request) is logged at most once
// per interval, so a hostile or broken peer cannot flood the log; the lines held back are
// counted in the next one. Not thread-safe: one per thread (each publisher and subscriber
// thread has its own).
#pragma once

#include <chrono>
#include <cstdint>
#include <string_view>

#include "core/log.h"

namespace cachette::events::internal {

class RateLimitedLog {
 public:
  explicit RateLimitedLog(std::chrono::milliseconds interval = std::chrono::seconds(1))
      : interval_(interval) {}

  void Warn(std::string_view message) {
    const auto now = std::chrono::steady_clock::now();
    if (now < next_) {
      ++held_back_;
      return;
    }
    next_ = now + interval_;
    if (held_back_ > 0) {
      CT_LOG(kWarning) << message << " (" << held_back_ << " more warnings held back before it)";
    } else {
      CT_LOG(kWarning) << message;
    }
    held_back_ = 0;
  }

 private:
  const std::chrono::milliseconds interval_;
  std::chrono::steady_clock::time_point next_{};
  uint64_t held_back_ = 0;
};

}  // namespace cachette::events::internal
