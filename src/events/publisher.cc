#include "events/publisher.h"

#include <zmq.h>

#include <algorithm>
#include <chrono>

#include "events/wire.h"

namespace cachette::events {

namespace {

using Clock = std::chrono::steady_clock;

// The longest the thread sleeps in zmq_poll, so Flush() and the destructor are served promptly
// even with a long flush interval.
constexpr int kMaxPollMs = 10;
// Requests served per wake-up before the thread checks its queue again.
constexpr int kMaxRequestsPerWake = 64;

double NowSeconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// Appends `e` to `out`, cut into events of at most kMaxEventBlocks hashes (what a reader
// accepts). A stored event's pieces chain: each piece's parent is the previous piece's last
// block. Token ids are cut along when they cover the blocks exactly, else left out.
void AppendWithinLimits(KvEvent e, std::vector<KvEvent>* out) {
  if (e.block_hashes.size() <= kMaxEventBlocks) {
    out->push_back(std::move(e));
    return;
  }
  const size_t n = e.block_hashes.size();
  const size_t tokens_per_block = static_cast<size_t>(std::max(e.block_size, 0));
  const bool cut_tokens = e.token_ids.size() == n * tokens_per_block;
  for (size_t begin = 0; begin < n; begin += kMaxEventBlocks) {
    const size_t end = std::min(n, begin + kMaxEventBlocks);
    KvEvent piece;
    piece.kind = e.kind;
    piece.medium = e.medium;
    piece.block_size = e.block_size;
    piece.block_hashes.assign(e.block_hashes.begin() + begin, e.block_hashes.begin() + end);
    if (e.kind == KvEvent::Kind::kStored) {
      piece.parent = begin == 0 ? e.parent : std::optional<uint64_t>(e.block_hashes[begin - 1]);
      if (cut_tokens) {
        piece.token_ids.assign(e.token_ids.begin() + begin * tokens_per_block,
                               e.token_ids.begin() + end * tokens_per_block);
      }
    }
    out->push_back(std::move(piece));
  }
}

}  // namespace

Result<std::unique_ptr<KvEventPublisher>> KvEventPublisher::Start(
    const KvEventPublisherOptions& options) {
  if (options.endpoint.empty())
    return InvalidArgument("kv events: the publisher needs an endpoint");
  if (options.flush_interval_ms < 1) {
    return InvalidArgument("kv events: flush_interval_ms must be at least 1, not " +
                           std::to_string(options.flush_interval_ms));
  }
  if (options.max_queue_events == 0) {
    return InvalidArgument("kv events: max_queue_events must be at least 1");
  }
  CT_ASSIGN_OR_RETURN(internal::ZmqContext context, internal::NewZmqContext());
  CT_ASSIGN_OR_RETURN(internal::ZmqSocket pub, internal::NewZmqSocket(context.get(), ZMQ_PUB));
  CT_RETURN_IF_ERROR(internal::SetZmqOption(pub.get(), ZMQ_SNDHWM, options.send_hwm, "ZMQ_SNDHWM"));
  CT_ASSIGN_OR_RETURN(std::string endpoint, internal::BindZmq(pub.get(), options.endpoint));
  internal::ZmqSocket router;
  std::string replay_endpoint;
  if (!options.replay_endpoint.empty()) {
    CT_ASSIGN_OR_RETURN(router, internal::NewZmqSocket(context.get(), ZMQ_ROUTER));
    // A whole replay answer must fit in one client's queue, or its tail (and the end marker)
    // is dropped. libzmq hands a full queue's room back in batches, later, so leave room for
    // several answers; never below libzmq's default of 1000.
    const size_t answer = options.replay_buffer_batches + 2;
    const int hwm = static_cast<int>(std::clamp<size_t>(4 * answer, 1000, size_t{1} << 30));
    CT_RETURN_IF_ERROR(internal::SetZmqOption(router.get(), ZMQ_SNDHWM, hwm, "ZMQ_SNDHWM"));
    CT_ASSIGN_OR_RETURN(replay_endpoint, internal::BindZmq(router.get(), options.replay_endpoint));
  }
  return std::unique_ptr<KvEventPublisher>(
      new KvEventPublisher(options, std::move(context), std::move(pub), std::move(router),
                           std::move(endpoint), std::move(replay_endpoint)));
}

KvEventPublisher::KvEventPublisher(const KvEventPublisherOptions& options,
                                   internal::ZmqContext context, internal::ZmqSocket pub,
                                   internal::ZmqSocket router, std::string endpoint,
                                   std::string replay_endpoint)
    : options_(options),
      context_(std::move(context)),
      pub_(std::move(pub)),
      router_(std::move(router)),
      endpoint_(std::move(endpoint)),
      replay_endpoint_(std::move(replay_endpoint)),
      mirror_(options.mirror_max_blocks) {
  thread_ = std::thread([this] { Run(); });
}

KvEventPublisher::~KvEventPublisher() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  thread_.join();
  // The sockets close, then the context terminates (member order).
}

void KvEventPublisher::Emit(KvEvent event) {
  std::lock_guard<std::mutex> lock(mu_);
  if (queue_.size() >= options_.max_queue_events) {
    ++stats_.dropped;
    return;
  }
  queue_.push_back(std::move(event));
  ++queued_total_;
}

void KvEventPublisher::Flush() {
  std::unique_lock<std::mutex> lock(mu_);
  const uint64_t target = queued_total_;
  flush_requested_ = true;
  published_cv_.wait(lock, [&] { return published_total_ >= target; });
}

KvEventPublisherStats KvEventPublisher::stats() const {
  KvEventPublisherStats s;
  {
    std::lock_guard<std::mutex> lock(mu_);
    s = stats_;
  }
  std::lock_guard<std::mutex> lock(mirror_mu_);
  s.mirror_blocks = mirror_.size();
  s.mirror_truncated = mirror_.truncated();
  return s;
}

std::vector<KvBlockRef> KvEventPublisher::MirrorBlocks() const {
  std::lock_guard<std::mutex> lock(mirror_mu_);
  return mirror_.Blocks();
}

void KvEventPublisher::Run() {
  const auto interval = std::chrono::milliseconds(options_.flush_interval_ms);
  auto next_flush = Clock::now() + interval;
  zmq_pollitem_t items[1] = {{router_.get(), 0, ZMQ_POLLIN, 0}};
  const int n_items = router_ ? 1 : 0;  // with none, zmq_poll just sleeps
  while (true) {
    const auto until_flush =
        std::chrono::duration_cast<std::chrono::milliseconds>(next_flush - Clock::now()).count();
    const int wait_ms = static_cast<int>(std::clamp<int64_t>(until_flush, 0, kMaxPollMs));
    items[0].revents = 0;
    if (zmq_poll(n_items > 0 ? items : nullptr, n_items, wait_ms) > 0 &&
        (items[0].revents & ZMQ_POLLIN)) {
      ServeRequests();
    }
    bool stop = false;
    bool flush_now = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop = stop_;
      flush_now = stop_ || flush_requested_;
    }
    if (flush_now || Clock::now() >= next_flush) {
      PublishQueued();
      next_flush = Clock::now() + interval;
    }
    // PublishQueued took everything emitted before stop_ was seen.
    if (stop) return;
  }
}

void KvEventPublisher::PublishQueued() {
  std::vector<KvEvent> taken;
  {
    std::lock_guard<std::mutex> lock(mu_);
    taken.swap(queue_);
    flush_requested_ = false;
  }
  const size_t n_taken = taken.size();
  std::vector<KvEvent> events;
  events.reserve(n_taken);
  uint64_t invalid = 0;
  for (KvEvent& e : taken) {
    // A reader refuses a whole batch over one such event: keep it out.
    const bool bad_medium =
        e.kind != KvEvent::Kind::kAllCleared && static_cast<int>(e.medium) >= kKvMediums;
    const bool bad_size =
        e.kind == KvEvent::Kind::kStored && (e.block_size < 0 || e.block_size > kMaxBlockSize);
    if (bad_medium || bad_size) {
      ++invalid;
      warnings_.Warn("kv events: dropped an event with medium " +
                     std::to_string(static_cast<int>(e.medium)) + ", block_size " +
                     std::to_string(e.block_size));
      continue;
    }
    AppendWithinLimits(std::move(e), &events);
  }
  for (size_t begin = 0; begin < events.size(); begin += kMaxBatchEvents) {
    const size_t end = std::min(events.size(), begin + kMaxBatchEvents);
    PublishBatch(std::vector<KvEvent>(std::make_move_iterator(events.begin() + begin),
                                      std::make_move_iterator(events.begin() + end)));
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    published_total_ += n_taken;
    stats_.invalid += invalid;
  }
  published_cv_.notify_all();
}

void KvEventPublisher::PublishBatch(std::vector<KvEvent> events) {
  KvEventBatch batch;
  batch.ts = NowSeconds();
  batch.dp_rank = options_.dp_rank;
  batch.events = std::move(events);
  std::string payload = EncodeBatch(batch);
  const int64_t seq = ++last_seq_;
  if (!internal::SendZmq(pub_.get(), {options_.topic, EncodeSeq(seq), payload})) {
    // Subscribers see a gap and replay it from the buffer below.
    warnings_.Warn("kv events: cannot publish batch " + std::to_string(seq) + ": " +
                   internal::ZmqError());
  }
  {
    std::lock_guard<std::mutex> lock(mirror_mu_);
    for (const KvEvent& e : batch.events) mirror_.Apply(e);
  }
  if (options_.replay_buffer_batches > 0) {
    replay_buffer_.emplace_back(seq, std::move(payload));
    while (replay_buffer_.size() > options_.replay_buffer_batches) replay_buffer_.pop_front();
  }
  std::lock_guard<std::mutex> lock(mu_);
  ++stats_.batches;
  stats_.events += batch.events.size();
  stats_.last_seq = seq;
}

void KvEventPublisher::ServeRequests() {
  internal::ZmqMessage request;
  for (int i = 0; i < kMaxRequestsPerWake; ++i) {
    if (!internal::ReceiveZmq(router_.get(), 4, &request)) return;
    ServeRequest(request);
  }
}

void KvEventPublisher::ServeRequest(const internal::ZmqMessage& request) {
  // [identity, empty, start_seq]: what a DEALER's [empty, start_seq] becomes at the ROUTER.
  const std::optional<int64_t> start = request.frame_count == 3 && request.frames[1].empty()
                                           ? DecodeSeq(request.frames[2])
                                           : std::nullopt;
  if (!start) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++stats_.bad_requests;
    }
    warnings_.Warn("kv events: ignored a replay request of " + std::to_string(request.frame_count) +
                   " frames (expected identity, empty, 8-byte start_seq)");
    return;
  }
  const std::string& identity = request.frames[0];
  const std::string end_marker = EncodeSeq(kEndOfAnswerSeq);
  // The oldest seq a replay can start from; with an empty buffer, only what is yet to come.
  const int64_t oldest = replay_buffer_.empty() ? last_seq_ + 1 : replay_buffer_.front().first;
  if (*start == kSnapshotRequestSeq || (*start >= 0 && *start < oldest) || *start > last_seq_ + 1) {
    SendSnapshot(identity);
  } else if (*start >= 0) {
    {
      // Counted before the answer goes out, so a client that has it sees it counted (the
      // ROUTER never blocks: an answer it cannot deliver is dropped either way).
      std::lock_guard<std::mutex> lock(mu_);
      ++stats_.replays;
    }
    for (const auto& [seq, payload] : replay_buffer_) {
      if (seq < *start) continue;
      internal::SendZmq(router_.get(), {identity, "", EncodeSeq(seq), payload});
    }
  } else {
    // Another negative start_seq means nothing here; the end marker alone tells the client.
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.bad_requests;
  }
  // A ROUTER drops what it cannot deliver (a client gone, a full queue): never blocks.
  internal::SendZmq(router_.get(), {identity, "", end_marker, ""});
}

void KvEventPublisher::SendSnapshot(const std::string& identity) {
  KvEventBatch batch;
  batch.ts = NowSeconds();
  batch.dp_rank = options_.dp_rank;
  {
    std::lock_guard<std::mutex> lock(mirror_mu_);
    batch.events = mirror_.SnapshotEvents();
  }
  const int64_t seq = last_seq_ >= 0 ? last_seq_ : kSnapshotBeforeFirstSeq;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.snapshots;  // before the send, as replays are
  }
  internal::SendZmq(router_.get(), {identity, "", EncodeSeq(seq), EncodeBatch(batch)});
}

}  // namespace cachette::events
