#include "cache/redis/redis_conn.h"

#include <sys/time.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <charconv>
#include <cstring>

namespace cachette::cache::redis {
namespace {

constexpr std::array<uint16_t, 256> MakeCrc16Table() {
  std::array<uint16_t, 256> table{};
  for (int i = 0; i < 256; ++i) {
    uint16_t crc = static_cast<uint16_t>(i << 8);
    for (int bit = 0; bit < 8; ++bit) {
      crc = (crc & 0x8000) ? static_cast<uint16_t>((crc << 1) ^ 0x1021)
                           : static_cast<uint16_t>(crc << 1);
    }
    table[i] = crc;
  }
  return table;
}
constexpr std::array<uint16_t, 256> kCrc16Table = MakeCrc16Table();

timeval ToTimeval(std::chrono::microseconds us) {
  // hiredis treats a zero timeout as "block forever"; never hand it one.
  us = std::max(us, std::chrono::microseconds(1000));
  timeval tv;
  tv.tv_sec = static_cast<time_t>(us.count() / 1000000);
  tv.tv_usec = static_cast<suseconds_t>(us.count() % 1000000);
  return tv;
}

std::chrono::microseconds Remaining(Clock::time_point deadline, std::chrono::milliseconds cap) {
  auto now = Clock::now();
  if (deadline <= now) return std::chrono::microseconds(0);
  // Compare before subtracting: deadline may be time_point::max().
  if (deadline - now > cap) return cap;
  return std::chrono::duration_cast<std::chrono::microseconds>(deadline - now);
}

bool IsTimeoutErrno(int e) { return e == EAGAIN || e == EWOULDBLOCK || e == ETIMEDOUT; }

}  // namespace

uint16_t Crc16(std::string_view bytes) {
  uint16_t crc = 0;
  for (char c : bytes) {
    crc = static_cast<uint16_t>((crc << 8) ^
                                kCrc16Table[((crc >> 8) ^ static_cast<uint8_t>(c)) & 0xff]);
  }
  return crc;
}

int KeySlot(std::string_view key) {
  size_t open = key.find('{');
  if (open != std::string_view::npos) {
    size_t close = key.find('}', open + 1);
    if (close != std::string_view::npos && close > open + 1) {
      key = key.substr(open + 1, close - open - 1);
    }
  }
  return Crc16(key) & (kClusterSlots - 1);
}

Redirect ParseRedirect(const redisReply* reply) {
  Redirect r;
  if (reply == nullptr || reply->type != REDIS_REPLY_ERROR) return r;
  std::string_view s(reply->str, reply->len);
  if (s.starts_with("MOVED ")) {
    r.kind = Redirect::kMoved;
    s.remove_prefix(6);
  } else if (s.starts_with("ASK ")) {
    r.kind = Redirect::kAsk;
    s.remove_prefix(4);
  } else {
    return r;
  }
  size_t space = s.find(' ');
  if (space == std::string_view::npos ||
      std::from_chars(s.data(), s.data() + space, r.slot).ec != std::errc() || r.slot < 0 ||
      r.slot >= kClusterSlots) {
    return Redirect{};
  }
  r.address = std::string(s.substr(space + 1));
  return r;
}

Node::Node(NodeOptions options)
    : options_(std::move(options)), address_(options_.host + ":" + std::to_string(options_.port)) {}

Node::~Node() {
  std::lock_guard lock(mu_);
  for (redisContext* ctx : idle_) redisFree(ctx);
}

NodeCounters Node::counters() const {
  std::lock_guard lock(mu_);
  return counters_;
}

void Node::NoteConnectFailure() {
  ++counters_.connect_failures;
  ++consecutive_failures_;
  int shift = std::min(consecutive_failures_ - 1, 16);
  int64_t backoff_ms =
      std::min<int64_t>(int64_t{options_.backoff_initial_ms} << shift, options_.backoff_max_ms);
  retry_after_ = Clock::now() + std::chrono::milliseconds(backoff_ms);
}

Result<Node::Conn> Node::Borrow(Clock::time_point deadline) {
  std::unique_lock lock(mu_);
  while (idle_.empty() && open_ >= options_.max_connections) {
    auto wait = Remaining(deadline, std::chrono::milliseconds(options_.command_timeout_ms));
    if (wait.count() <= 0 ||
        cv_.wait_for(lock, wait) == std::cv_status::timeout) {
      if (idle_.empty() && open_ >= options_.max_connections) {
        ++counters_.timeouts;
        return DeadlineExceeded("redis " + address_ + ": no free connection in time");
      }
    }
  }
  if (!idle_.empty()) {
    redisContext* ctx = idle_.back();
    idle_.pop_back();
    return Conn{ctx, true};
  }
  // Fail fast while backing off: a dead node costs callers nothing but this check.
  if (Clock::now() < retry_after_) {
    return Unavailable("redis " + address_ + ": down (" + std::to_string(consecutive_failures_) +
                       " failed connects), backing off");
  }
  ++open_;
  lock.unlock();

  auto budget = Remaining(deadline, std::chrono::milliseconds(options_.connect_timeout_ms));
  if (budget.count() <= 0) {
    lock.lock();
    --open_;
    cv_.notify_one();
    return DeadlineExceeded("redis " + address_ + ": deadline passed before connect");
  }
  auto start = Clock::now();
  redisContext* ctx = redisConnectWithTimeout(options_.host.c_str(), options_.port,
                                              ToTimeval(budget));
  int saved_errno = errno;
  if (ctx == nullptr || ctx->err != 0) {
    std::string why = ctx ? ctx->errstr : "out of memory";
    bool timed_out = IsTimeoutErrno(saved_errno) || Clock::now() - start >= budget;
    if (ctx) redisFree(ctx);
    lock.lock();
    --open_;
    NoteConnectFailure();
    if (timed_out) ++counters_.timeouts;
    cv_.notify_one();
    std::string msg = "redis " + address_ + ": connect: " + why;
    return timed_out ? DeadlineExceeded(msg) : Unavailable(msg);
  }
  lock.lock();
  consecutive_failures_ = 0;
  ++counters_.connects;
  return Conn{ctx, false};
}

void Node::Return(redisContext* ctx, bool healthy) {
  std::lock_guard lock(mu_);
  if (healthy) {
    idle_.push_back(ctx);
  } else {
    redisFree(ctx);
    --open_;
  }
  cv_.notify_one();
}

Result<std::vector<ReplyPtr>> Node::Pipeline(const std::vector<Command>& commands,
                                             Clock::time_point deadline) {
  const auto cmd_cap = std::chrono::milliseconds(options_.command_timeout_ms);
  std::vector<const char*> argv;
  std::vector<size_t> argvlen;
  for (int attempt = 0;; ++attempt) {
    if (Clock::now() >= deadline) {
      std::lock_guard lock(mu_);
      ++counters_.timeouts;
      return DeadlineExceeded("redis " + address_ + ": deadline passed");
    }
    CT_ASSIGN_OR_RETURN(Conn conn, Borrow(deadline));
    redisContext* ctx = conn.ctx;
    for (const Command& cmd : commands) {
      argv.clear();
      argvlen.clear();
      for (std::string_view arg : cmd) {
        argv.push_back(arg.data());
        argvlen.push_back(arg.size());
      }
      if (redisAppendCommandArgv(ctx, static_cast<int>(argv.size()), argv.data(),
                                 argvlen.data()) != REDIS_OK) {
        Return(ctx, false);
        return ResourceExhausted("redis " + address_ + ": cannot buffer command");
      }
    }
    std::vector<ReplyPtr> replies;
    replies.reserve(commands.size());
    bool failed = false, timed_out = false;
    int saved_errno = 0;
    std::chrono::microseconds timeout_set{-1};
    for (size_t i = 0; i < commands.size(); ++i) {
      // The socket timeout bounds each read/write; shrink it as the deadline nears so a stalled
      // server cannot hold us past the deadline.
      auto budget = Remaining(deadline, cmd_cap);
      if (budget.count() <= 0) {
        failed = timed_out = true;
        break;
      }
      if (budget < timeout_set || timeout_set.count() < 0) {
        redisSetTimeout(ctx, ToTimeval(budget));
        timeout_set = budget;
      }
      void* raw = nullptr;
      errno = 0;
      if (redisGetReply(ctx, &raw) != REDIS_OK) {
        saved_errno = errno;
        failed = true;
        timed_out = ctx->err == REDIS_ERR_IO && IsTimeoutErrno(saved_errno);
        break;
      }
      replies.emplace_back(static_cast<redisReply*>(raw));
    }
    if (!failed) {
      Return(ctx, true);
      return replies;
    }
    std::string why = ctx->err != 0 ? ctx->errstr : "deadline";
    // The connection has unread replies or is broken: never reuse it.
    Return(ctx, false);
    if (timed_out) {
      std::lock_guard lock(mu_);
      ++counters_.timeouts;
      return DeadlineExceeded("redis " + address_ + ": timed out: " + why);
    }
    std::vector<redisContext*> stale;
    {
      std::lock_guard lock(mu_);
      ++counters_.io_errors;
      if (conn.reused) {
        // Its idle siblings most likely died with it (server restart): drop them all.
        stale.swap(idle_);
        open_ -= static_cast<int>(stale.size());
      }
    }
    for (redisContext* c : stale) redisFree(c);
    if (!conn.reused || attempt > 0) {
      return Unavailable("redis " + address_ + ": " + why);
    }
  }
}

}  // namespace cachette::cache::redis
