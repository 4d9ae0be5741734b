// KvEventSubscriber: follows one publisher's KV events (docs/formats/kv-events.md), keeping the
// receiver's view of that publisher's blocks exact across lost messages and restarts.
//
// Sockets: a SUB connected to the publisher's PUB endpoint (subscribed to `topic`), and a DEALER
// connected to its replay endpoint for replay and snapshot requests. Works with cachette's
// publisher and with vLLM's (which has no snapshots: see below).
//
// The thread's states:
//   1. kNeedSnapshot  no consistent view; PUB batches are dropped. It sends a snapshot request
//                     (start_seq -2) and waits for the answer:
//                       a snapshot    -> applied with reset = true, last = its seq -> 2
//                       only the end marker (vLLM: no snapshots) -> an empty reset batch,
//                                        then the stream as it comes -> 2
//                       a timeout or a malformed answer -> stays 1, retried answer_timeout_ms
//                                        later (the publisher may be down; ZeroMQ reconnects).
//   2. kSynced        applies PUB batches in seq order, dropping those it has (seq <= last).
//                       seq > last + 1 (a gap): a replay request from last + 1; the answer's
//                                        batches are applied in order -> 2; an answer that
//                                        cannot fill the gap -> 1. A snapshot in the answer
//                                        (the publisher's buffer no longer reached) is applied
//                                        as a reset -> 2.
//                       no PUB batch for idle_probe_ms: the same replay request (finds a lost
//                                        last batch, which no later seq would reveal).
//                       a malformed message (wrong frame count, a seq that is not 8 bytes, a
//                                        payload DecodeBatch refuses): logged (rate-limited),
//                                        counted, never applied -> 1.
//                       a new PUB connection after the first (the publisher restarted, its seq
//                                        begins at 0 again) -> 1.
// Without a replay endpoint there are no requests: the view starts with an empty reset, gaps
// are counted and skipped, and synced() is false after the first one.
//
// The callback runs on the subscriber's thread, one batch at a time, in order; reset = true
// means "forget what this publisher held, then apply the batch". It must not throw, and must
// not call Stop() or destroy the subscriber.
//
// Thread-safety: stats() and synced() may be called from any thread; Stop() and the destructor
// from one thread that is not the callback's.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "cachette/status.h"
#include "events/kv_event_codec.h"
#include "events/rate_limited_log.h"
#include "events/zmq_util.h"

namespace cachette::events {

struct KvEventSubscriberOptions {
  std::string endpoint;             // the publisher's PUB endpoint, e.g. "tcp://10.0.0.7:5557"
  std::string replay_endpoint;      // its replay (ROUTER) endpoint; empty = none
  std::string topic = "kv-events";  // vLLM's default topic is ""
  // Longest wait for each message of a replay or snapshot answer.
  int answer_timeout_ms = 500;
  // With no PUB batch for this long, ask for a replay from last + 1; 0 = never.
  int idle_probe_ms = 1000;
  // Longest the thread sleeps before it looks at Stop(): Stop() returns within about this.
  int poll_ms = 50;
  // Larger messages make libzmq drop the connection (it reconnects; we then resync).
  int64_t max_message_bytes = int64_t{256} << 20;
  int receive_hwm = 100'000;  // PUB messages queued here before libzmq drops (seen as a gap)
  // Tests only: a PUB message whose seq this returns true for is dropped before it is looked
  // at, as if the network had lost it.
  std::function<bool(int64_t seq)> test_drop_pub;
};

struct KvEventSubscriberStats {
  uint64_t batches = 0;     // batches applied (from PUB, replays and snapshots)
  uint64_t events = 0;      // events in them
  uint64_t gaps = 0;        // PUB seq jumps seen
  uint64_t replays = 0;     // replay requests sent (gaps and idle probes)
  uint64_t snapshots = 0;   // snapshots applied (including vLLM's empty stand-in)
  uint64_t malformed = 0;   // messages refused: frames, seq or payload
  uint64_t timeouts = 0;    // answers that did not come within answer_timeout_ms
  uint64_t reconnects = 0;  // PUB connections made after the first
  int64_t last_seq = -1;    // seq of the last batch applied; -1 before any
};

// (batch, reset): see the header comment.
using KvEventCallback = std::function<void(const KvEventBatch& batch, bool reset)>;

class KvEventSubscriber {
 public:
  // Connects and starts the thread (which then asks for a snapshot). Errors: kInvalidArgument
  // for an empty or unparsable endpoint or a non-positive timeout; kIOError if libzmq cannot
  // make a socket. An unreachable publisher is not an error: libzmq keeps reconnecting.
  static Result<std::unique_ptr<KvEventSubscriber>> Start(const KvEventSubscriberOptions& options,
                                                          KvEventCallback callback);
  // Stop()s.
  ~KvEventSubscriber();

  KvEventSubscriber(const KvEventSubscriber&) = delete;
  KvEventSubscriber& operator=(const KvEventSubscriber&) = delete;

  // Stops and joins the thread (within about poll_ms, or the end of a callback under way);
  // no callback runs after it returns. Idempotent.
  void Stop();

  KvEventSubscriberStats stats() const;
  // Whether the thread is in state 2 with an exact view (see the header comment).
  bool synced() const { return synced_.load(std::memory_order_acquire); }

 private:
  enum class State { kNeedSnapshot, kSynced };
  using Clock = std::chrono::steady_clock;

  KvEventSubscriber(const KvEventSubscriberOptions& options, KvEventCallback callback,
                    internal::ZmqContext context, internal::ZmqSocket sub,
                    internal::ZmqSocket dealer, internal::ZmqSocket monitor);

  void Run();
  void HandleMonitor();
  void HandlePub(const internal::ZmqMessage& message);
  // Sends [empty, start_seq] on the DEALER and applies the answer as it comes.
  void Request(int64_t start_seq);
  // Applies a batch: reset = a snapshot (or vLLM's stand-in). `seq` becomes last_.
  void Apply(const KvEventBatch& batch, bool reset, std::optional<int64_t> seq);
  void NeedSnapshot(std::chrono::milliseconds delay);
  // Counts and logs a refused message; resynchronises after `retry_delay` (an answer's
  // problems wait, so a broken publisher is not asked in a tight loop).
  void Malformed(const std::string& why, std::chrono::milliseconds retry_delay);
  // A fresh DEALER, so that the rest of an abandoned answer cannot be read as the next one's.
  void ReplaceDealer();
  void SetSynced(bool synced);

  const KvEventSubscriberOptions options_;
  const KvEventCallback callback_;
  internal::ZmqContext context_;  // before the sockets: destroyed after them
  // Owned by thread_ from Start on.
  internal::ZmqSocket sub_;
  internal::ZmqSocket dealer_;   // null without a replay endpoint
  internal::ZmqSocket monitor_;  // the SUB's connection events (ZMQ_EVENT_CONNECTED)

  // Only thread_ touches these.
  State state_ = State::kNeedSnapshot;
  std::optional<int64_t> last_;  // seq of the last applied batch; none = take the next one
  bool exact_ = true;            // false once a gap was skipped (no replay endpoint)
  uint64_t connects_ = 0;
  Clock::time_point retry_at_{};       // when kNeedSnapshot sends its next request
  Clock::time_point last_activity_{};  // the last PUB batch or answer
  internal::RateLimitedLog warnings_;

  std::atomic<bool> stop_{false};
  std::atomic<bool> synced_{false};
  mutable std::mutex stats_mu_;
  KvEventSubscriberStats stats_;  // GUARDED_BY(stats_mu_)

  std::thread thread_;  // last: started once everything above is constructed
};

}  // namespace cachette::events
