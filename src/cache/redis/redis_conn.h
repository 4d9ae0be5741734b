// The Redis wire layer under RedisTier: one Node per server address, each with a pool of
// blocking hiredis connections, exponential reconnect backoff and per-call deadlines; plus the
// cluster slot function (CRC16/XMODEM with hash tags).
//
// Internal to src/cache/redis (RedisTier is the public face). Thread-safety: a Node is safe to
// use from many threads at once; each caller borrows a whole connection for one pipeline.
#pragma once

#include <hiredis/hiredis.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "cachette/status.h"

namespace cachette::cache::redis {

using Clock = std::chrono::steady_clock;

inline constexpr int kClusterSlots = 16384;

// CRC16/XMODEM (poly 0x1021, init 0), the checksum Redis Cluster hashes keys with.
uint16_t Crc16(std::string_view bytes);

// The cluster slot of `key`: CRC16 of the hash tag (the bytes between the first '{' and the
// next '}', when non-empty) or of the whole key, modulo 16384.
int KeySlot(std::string_view key);

struct ReplyDeleter {
  void operator()(redisReply* r) const { freeReplyObject(r); }
};
using ReplyPtr = std::unique_ptr<redisReply, ReplyDeleter>;

// One command as its arguments; binary safe.
using Command = std::vector<std::string_view>;

// A server error reply that redirects the command ("MOVED 3999 127.0.0.1:7002" or "ASK ...").
struct Redirect {
  enum Kind { kNone, kMoved, kAsk } kind = kNone;
  int slot = -1;
  std::string address;  // "host:port"
};
Redirect ParseRedirect(const redisReply* reply);

struct NodeOptions {
  std::string host;
  int port = 0;
  int connect_timeout_ms = 200;
  int command_timeout_ms = 1000;
  int max_connections = 8;        // borrowed + idle; further callers wait (with their deadline)
  int backoff_initial_ms = 20;    // after a failed connect, no new attempt for this long...
  int backoff_max_ms = 1000;      // ...doubling per consecutive failure up to this
};

struct NodeCounters {
  uint64_t connects = 0, connect_failures = 0, io_errors = 0, timeouts = 0;
};

class Node {
 public:
  explicit Node(NodeOptions options);
  ~Node();
  Node(const Node&) = delete;
  Node& operator=(const Node&) = delete;

  const std::string& address() const { return address_; }  // "host:port"

  // Sends `commands` in one pipeline and returns one reply per command, in order. Server error
  // replies (e.g. MOVED) are replies, not failures. Errors: kUnavailable when the node cannot
  // be reached (refused, reset, in backoff after earlier failures); kDeadlineExceeded when the
  // deadline (or the command timeout, whichever is first) passes. A broken connection is
  // dropped and, if it had been idle in the pool (likely killed by a server restart), the
  // pipeline is retried once on a fresh one: every command cachette sends is idempotent.
  Result<std::vector<ReplyPtr>> Pipeline(const std::vector<Command>& commands,
                                         Clock::time_point deadline);

  NodeCounters counters() const;

 private:
  struct Conn {
    redisContext* ctx = nullptr;
    bool reused = false;  // came from the idle pool rather than a fresh connect
  };
  Result<Conn> Borrow(Clock::time_point deadline);
  void Return(redisContext* ctx, bool healthy);
  void NoteConnectFailure();

  const NodeOptions options_;
  const std::string address_;

  mutable std::mutex mu_;
  std::condition_variable cv_;                 // signalled when a connection slot frees up
  std::vector<redisContext*> idle_;            // GUARDED_BY(mu_)
  int open_ = 0;                               // GUARDED_BY(mu_): borrowed + idle
  int consecutive_failures_ = 0;               // GUARDED_BY(mu_)
  Clock::time_point retry_after_{};            // GUARDED_BY(mu_): backoff end
  NodeCounters counters_;                      // GUARDED_BY(mu_)
};

}  // namespace cachette::cache::redis
