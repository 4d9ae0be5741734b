// KvEventPublisher: a KvEventSink that publishes a server's KV events over ZeroMQ in vLLM's
// format (docs/formats/kv-events.md), with vLLM's replay channel and cachette's snapshots.
//
// Sockets:
//   PUB    bound at `endpoint`: one message per batch, [topic, seq (8 bytes BE), msgpack batch],
//          seq 0, 1, 2, ... A subscriber that is slow past the PUB queue (send_hwm) loses
//          messages; it sees a gap in seq and asks for a replay.
//   ROUTER bound at `replay_endpoint` (optional): a request [empty, start_seq] is answered with
//          the buffered batches whose seq >= start_seq, one message each, then an end marker
//          (seq -1, empty payload). start_seq -2, or one the buffer no longer reaches, or one
//          past the last published + 1 (the client saw an earlier incarnation of this
//          publisher), is answered with a snapshot instead: one batch, AllBlocksCleared then
//          BlockStored for every block the publisher knows to be stored, whose seq is the last
//          published seq (kSnapshotBeforeFirstSeq, -3, before the first), then the end marker.
//
// Threads: Emit only takes a mutex and appends to a vector, so producers may call it under
// their own locks. One background thread owns both sockets (ZeroMQ sockets are not
// thread-safe): it answers requests as they come and, every flush_interval_ms, publishes what
// was emitted since the last flush as one batch (or several, past kMaxBatchEvents). Every
// other method is safe to call from any thread, except that nothing may be called once the
// destructor has begun.
//
// The mirror (block_mirror.h) that snapshots come from is updated from the batches as they are
// published, so a snapshot's seq and content agree. It is exact unless Emit dropped events
// (queue full: stats().dropped) or the mirror hit its cap (stats().mirror_truncated).
// WART: dropped events are lost for every subscriber too, and nothing re-sends them; the
// serving path is never affected (a router only routes less well).
// A snapshot is built and encoded on the thread (the whole mirror: tens of MB at the default
// cap), so batches wait while one is answered.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "cachette/status.h"
#include "core/kv_events.h"
#include "events/block_mirror.h"
#include "events/kv_event_codec.h"
#include "events/rate_limited_log.h"
#include "events/zmq_util.h"

namespace cachette::events {

struct KvEventPublisherOptions {
  // Where the PUB socket binds: "tcp://*:5557", "tcp://127.0.0.1:0" (an ephemeral port: read
  // endpoint()), "ipc:///run/cachette/kv-events".
  std::string endpoint = "tcp://*:5557";
  // Where the ROUTER socket answering replay and snapshot requests binds; empty = none.
  std::string replay_endpoint;
  std::string topic = "kv-events";      // the first frame of every PUB message
  size_t replay_buffer_batches = 1024;  // the newest batches kept for replay
  int flush_interval_ms = 5;            // events emitted within one interval share a batch
  // Emit drops events (counted in stats().dropped) while this many wait to be published.
  size_t max_queue_events = 1'000'000;
  std::optional<int64_t> dp_rank;  // written into every batch when set (vLLM's DP rank)
  size_t mirror_max_blocks = kDefaultMirrorMaxBlocks;
  // Messages the PUB socket queues per subscriber before it drops (the subscriber then sees a
  // gap and replays).
  int send_hwm = 100'000;
};

struct KvEventPublisherStats {
  uint64_t batches = 0;           // batches published (one seq each)
  uint64_t events = 0;            // events in them
  uint64_t dropped = 0;           // events Emit refused because the queue was full
  uint64_t invalid = 0;           // events refused: block_size outside 0..kMaxBlockSize, bad medium
  uint64_t replays = 0;           // requests answered from the replay buffer
  uint64_t snapshots = 0;         // requests answered with a snapshot
  uint64_t bad_requests = 0;      // malformed requests on the ROUTER (ignored)
  int64_t last_seq = -1;          // seq of the last published batch; -1 before the first
  uint64_t mirror_blocks = 0;     // blocks the mirror holds now
  uint64_t mirror_truncated = 0;  // stored blocks the mirror did not keep (it was full)
};

class KvEventPublisher final : public KvEventSink {
 public:
  // Binds the sockets and starts the thread. Errors name the endpoint: kUnavailable ("kv events:
  // cannot bind tcp://127.0.0.1:5557: Address already in use"), kInvalidArgument for an endpoint
  // libzmq cannot parse or an option out of range (flush_interval_ms < 1, max_queue_events 0,
  // empty endpoint).
  static Result<std::unique_ptr<KvEventPublisher>> Start(const KvEventPublisherOptions& options);

  // Publishes what is still queued, stops the thread and closes the sockets (unsent messages
  // are dropped: ZMQ_LINGER 0).
  ~KvEventPublisher() override;

  KvEventPublisher(const KvEventPublisher&) = delete;
  KvEventPublisher& operator=(const KvEventPublisher&) = delete;

  // Queues `event` for the next batch; never blocks on I/O.
  void Emit(KvEvent event) override;

  // Returns once every event emitted before the call is published (or dropped). For tests and
  // for an orderly shutdown.
  void Flush();

  KvEventPublisherStats stats() const;

  // The endpoints actually bound ("tcp://127.0.0.1:40123" for "tcp://127.0.0.1:0"); the
  // replay one is empty when there is none.
  const std::string& endpoint() const { return endpoint_; }
  const std::string& replay_endpoint() const { return replay_endpoint_; }

  // The blocks the mirror holds: what a snapshot taken now would name.
  std::vector<KvBlockRef> MirrorBlocks() const;

 private:
  KvEventPublisher(const KvEventPublisherOptions& options, internal::ZmqContext context,
                   internal::ZmqSocket pub, internal::ZmqSocket router, std::string endpoint,
                   std::string replay_endpoint);

  void Run();
  // Publishes everything queued (nothing when the queue is empty).
  void PublishQueued();
  void PublishBatch(std::vector<KvEvent> events);
  void ServeRequests();
  void ServeRequest(const internal::ZmqMessage& request);
  void SendSnapshot(const std::string& identity);

  const KvEventPublisherOptions options_;
  // Declared before the sockets: destroyed after them (zmq_ctx_term waits for its sockets).
  internal::ZmqContext context_;
  // Owned by thread_ from Start on.
  internal::ZmqSocket pub_;
  internal::ZmqSocket router_;  // null without a replay endpoint
  const std::string endpoint_;
  const std::string replay_endpoint_;

  // Only thread_ touches these.
  int64_t last_seq_ = -1;
  std::deque<std::pair<int64_t, std::string>> replay_buffer_;  // (seq, payload), oldest first
  internal::RateLimitedLog warnings_;

  mutable std::mutex mirror_mu_;
  KvBlockMirror mirror_;  // GUARDED_BY(mirror_mu_); written only by thread_

  mutable std::mutex mu_;
  std::condition_variable published_cv_;  // signalled when published_total_ grows
  std::vector<KvEvent> queue_;            // GUARDED_BY(mu_)
  uint64_t queued_total_ = 0;             // GUARDED_BY(mu_): events Emit accepted, ever
  uint64_t published_total_ = 0;          // GUARDED_BY(mu_): of which taken and published
  bool flush_requested_ = false;          // GUARDED_BY(mu_)
  bool stop_ = false;                     // GUARDED_BY(mu_)
  KvEventPublisherStats stats_;           // GUARDED_BY(mu_); mirror_* filled in by stats()

  std::thread thread_;  // last: started once everything above is constructed
};

}  // namespace cachette::events
