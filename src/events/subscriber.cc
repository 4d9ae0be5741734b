#include "events/subscriber.h"

#include <zmq.h>

#include <algorithm>
#include <cstring>

#include "core/log.h"
#include "events/wire.h"

namespace cachette::events {

namespace {

// PUB messages handled per wake-up before the thread looks at its other duties again.
constexpr int kMaxPubPerWake = 1024;

int MillisUntil(std::chrono::steady_clock::time_point t) {
  const auto ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(t - std::chrono::steady_clock::now())
          .count();
  return static_cast<int>(std::clamp<int64_t>(ms, 0, 1 << 30));
}

// inproc names of the SUB monitors must be unique within a context; one context per
// subscriber makes that easy, but a process-wide counter costs nothing and reads plainly.
std::atomic<uint64_t> monitor_counter{0};

}  // namespace

Result<std::unique_ptr<KvEventSubscriber>> KvEventSubscriber::Start(
    const KvEventSubscriberOptions& options, KvEventCallback callback) {
  if (options.endpoint.empty())
    return InvalidArgument("kv events: the subscriber needs an endpoint");
  if (options.answer_timeout_ms < 1 || options.poll_ms < 1) {
    return InvalidArgument("kv events: answer_timeout_ms and poll_ms must be at least 1");
  }
  if (!callback) return InvalidArgument("kv events: the subscriber needs a callback");
  CT_ASSIGN_OR_RETURN(internal::ZmqContext context, internal::NewZmqContext());
  CT_ASSIGN_OR_RETURN(internal::ZmqSocket sub, internal::NewZmqSocket(context.get(), ZMQ_SUB));
  CT_RETURN_IF_ERROR(
      internal::SetZmqOption(sub.get(), ZMQ_RCVHWM, options.receive_hwm, "ZMQ_RCVHWM"));
  CT_RETURN_IF_ERROR(internal::SetZmqOption64(sub.get(), ZMQ_MAXMSGSIZE, options.max_message_bytes,
                                              "ZMQ_MAXMSGSIZE"));
  if (zmq_setsockopt(sub.get(), ZMQ_SUBSCRIBE, options.topic.data(), options.topic.size()) != 0) {
    return InvalidArgument("kv events: cannot subscribe to topic " + options.topic + ": " +
                           internal::ZmqError());
  }
  // Connection events of the SUB: a new connection after the first is a restarted publisher.
  // The monitor's reader connects before the SUB does, so no event is lost.
  const std::string monitor_address =
      "inproc://cachette-kv-events-monitor-" + std::to_string(monitor_counter.fetch_add(1));
  if (zmq_socket_monitor(sub.get(), monitor_address.c_str(), ZMQ_EVENT_CONNECTED) != 0) {
    return IOError("kv events: cannot monitor the SUB socket: " + internal::ZmqError());
  }
  CT_ASSIGN_OR_RETURN(internal::ZmqSocket monitor, internal::NewZmqSocket(context.get(), ZMQ_PAIR));
  CT_RETURN_IF_ERROR(internal::ConnectZmq(monitor.get(), monitor_address));
  CT_RETURN_IF_ERROR(internal::ConnectZmq(sub.get(), options.endpoint));
  internal::ZmqSocket dealer;
  if (!options.replay_endpoint.empty()) {
    CT_ASSIGN_OR_RETURN(dealer, internal::NewZmqSocket(context.get(), ZMQ_DEALER));
    CT_RETURN_IF_ERROR(internal::SetZmqOption64(dealer.get(), ZMQ_MAXMSGSIZE,
                                                options.max_message_bytes, "ZMQ_MAXMSGSIZE"));
    CT_RETURN_IF_ERROR(internal::ConnectZmq(dealer.get(), options.replay_endpoint));
  }
  return std::unique_ptr<KvEventSubscriber>(
      new KvEventSubscriber(options, std::move(callback), std::move(context), std::move(sub),
                            std::move(dealer), std::move(monitor)));
}

KvEventSubscriber::KvEventSubscriber(const KvEventSubscriberOptions& options,
                                     KvEventCallback callback, internal::ZmqContext context,
                                     internal::ZmqSocket sub, internal::ZmqSocket dealer,
                                     internal::ZmqSocket monitor)
    : options_(options),
      callback_(std::move(callback)),
      context_(std::move(context)),
      sub_(std::move(sub)),
      dealer_(std::move(dealer)),
      monitor_(std::move(monitor)) {
  thread_ = std::thread([this] { Run(); });
}

KvEventSubscriber::~KvEventSubscriber() { Stop(); }

void KvEventSubscriber::Stop() {
  stop_.store(true, std::memory_order_release);
  if (thread_.joinable()) thread_.join();
}

KvEventSubscriberStats KvEventSubscriber::stats() const {
  std::lock_guard<std::mutex> lock(stats_mu_);
  return stats_;
}

void KvEventSubscriber::SetSynced(bool synced) { synced_.store(synced, std::memory_order_release); }

void KvEventSubscriber::Run() {
  last_activity_ = Clock::now();
  if (dealer_) {
    NeedSnapshot(std::chrono::milliseconds(0));
  } else {
    // No snapshots to be had: start from nothing and take the stream as it comes.
    Apply(KvEventBatch{}, /*reset=*/true, std::nullopt);
    state_ = State::kSynced;
    SetSynced(true);
  }
  zmq_pollitem_t items[2] = {{sub_.get(), 0, ZMQ_POLLIN, 0}, {monitor_.get(), 0, ZMQ_POLLIN, 0}};
  internal::ZmqMessage message;
  while (!stop_.load(std::memory_order_acquire)) {
    HandleMonitor();
    if (dealer_ && state_ == State::kNeedSnapshot && Clock::now() >= retry_at_) {
      Request(kSnapshotRequestSeq);
      continue;
    }
    int wait_ms = options_.poll_ms;
    if (dealer_ && state_ == State::kNeedSnapshot)
      wait_ms = std::min(wait_ms, MillisUntil(retry_at_));
    items[0].revents = items[1].revents = 0;
    zmq_poll(items, 2, wait_ms);
    HandleMonitor();
    for (int i = 0; i < kMaxPubPerWake && !stop_.load(std::memory_order_acquire); ++i) {
      if (!internal::ReceiveZmq(sub_.get(), 4, &message)) break;
      HandlePub(message);
    }
    if (dealer_ && state_ == State::kSynced && last_ && options_.idle_probe_ms > 0 &&
        Clock::now() - last_activity_ >= std::chrono::milliseconds(options_.idle_probe_ms)) {
      Request(*last_ + 1);
    }
  }
}

void KvEventSubscriber::HandleMonitor() {
  internal::ZmqMessage event;
  while (internal::ReceiveZmq(monitor_.get(), 2, &event)) {
    // Frame 0: the event (uint16) and its value (uint32), in host byte order.
    if (event.frames.empty() || event.frames[0].size() < 6) continue;
    uint16_t id = 0;
    std::memcpy(&id, event.frames[0].data(), sizeof(id));
    if (id != ZMQ_EVENT_CONNECTED || ++connects_ == 1) continue;
    {
      std::lock_guard<std::mutex> lock(stats_mu_);
      ++stats_.reconnects;
    }
    CT_LOG(kInfo) << "kv events: reconnected to " << options_.endpoint << ", resynchronising";
    if (dealer_) {
      NeedSnapshot(std::chrono::milliseconds(0));
    } else {
      Apply(KvEventBatch{}, /*reset=*/true, std::nullopt);
    }
  }
}

void KvEventSubscriber::HandlePub(const internal::ZmqMessage& message) {
  if (message.frame_count != 3) {
    Malformed("a PUB message has " + std::to_string(message.frame_count) +
                  " frames, expected 3 (topic, seq, payload)",
              std::chrono::milliseconds(0));
    return;
  }
  // SUB filters by prefix: "kv-events-2" reaches a "kv-events" subscriber. Not ours, not wrong.
  if (message.frames[0] != options_.topic) return;
  const std::optional<int64_t> seq = DecodeSeq(message.frames[1]);
  if (!seq) {
    Malformed("a PUB message's seq frame has " + std::to_string(message.frames[1].size()) +
                  " bytes, expected 8",
              std::chrono::milliseconds(0));
    return;
  }
  if (options_.test_drop_pub && options_.test_drop_pub(*seq)) return;
  Result<KvEventBatch> batch = DecodeBatch(message.frames[2]);
  if (!batch.ok()) {
    Malformed("PUB batch " + std::to_string(*seq) + ": " + batch.status().message(),
              std::chrono::milliseconds(0));
    return;
  }
  last_activity_ = Clock::now();
  if (state_ != State::kSynced) return;  // the coming snapshot covers it
  if (last_ && *seq <= *last_) return;   // applied already, from a snapshot or a replay
  if (!last_ || *seq == *last_ + 1) {
    Apply(*batch, /*reset=*/false, *seq);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(stats_mu_);
    ++stats_.gaps;
  }
  if (dealer_) {
    // The replay from last + 1 includes this batch, if the publisher still has it.
    Request(*last_ + 1);
    return;
  }
  exact_ = false;
  SetSynced(false);
  Apply(*batch, /*reset=*/false, *seq);
}

void KvEventSubscriber::Request(int64_t start_seq) {
  const bool want_snapshot = start_seq == kSnapshotRequestSeq;
  const auto timeout = std::chrono::milliseconds(options_.answer_timeout_ms);
  if (!want_snapshot) {
    std::lock_guard<std::mutex> lock(stats_mu_);
    ++stats_.replays;
  }
  last_activity_ = Clock::now();
  auto on_timeout = [&](const char* what) {
    {
      std::lock_guard<std::mutex> lock(stats_mu_);
      ++stats_.timeouts;
    }
    warnings_.Warn("kv events: " + std::string(what) + " " + options_.replay_endpoint +
                   " (start_seq " + std::to_string(start_seq) + "); retrying");
    ReplaceDealer();
    NeedSnapshot(timeout);
  };
  if (!internal::SendZmq(dealer_.get(), {"", EncodeSeq(start_seq)})) {
    on_timeout("cannot send a request to");
    return;
  }
  bool got_batch = false;
  bool unfilled = false;  // the answer skipped seqs we lack: only a snapshot can help
  auto deadline = Clock::now() + timeout;
  zmq_pollitem_t item = {dealer_.get(), 0, ZMQ_POLLIN, 0};
  internal::ZmqMessage message;
  while (!stop_.load(std::memory_order_acquire)) {
    if (!internal::ReceiveZmq(dealer_.get(), 4, &message)) {
      if (Clock::now() >= deadline) {
        on_timeout("no answer in time from");
        return;
      }
      item.revents = 0;
      zmq_poll(&item, 1, std::max(1, std::min(options_.poll_ms, MillisUntil(deadline))));
      continue;
    }
    deadline = Clock::now() + timeout;  // a long answer is fine while it keeps coming
    // [empty, seq, payload]: the ROUTER's [identity, empty, seq, payload] less the identity.
    const std::optional<int64_t> seq = message.frame_count == 3 && message.frames[0].empty()
                                           ? DecodeSeq(message.frames[1])
                                           : std::nullopt;
    if (!seq) {
      Malformed("an answer from the replay endpoint has " + std::to_string(message.frame_count) +
                    " frames or a bad seq (expected empty, 8-byte seq, payload)",
                timeout);
      ReplaceDealer();
      return;
    }
    if (*seq == kEndOfAnswerSeq) {
      if (want_snapshot && !got_batch) {
        // The publisher has no snapshots (vLLM): start from nothing, take the stream as it
        // comes. Conservative: the view lacks what the publisher held before.
        Apply(KvEventBatch{}, /*reset=*/true, std::nullopt);
        state_ = State::kSynced;
        SetSynced(exact_);
      } else if (unfilled) {
        NeedSnapshot(std::chrono::milliseconds(0));
      } else if (state_ == State::kNeedSnapshot) {
        NeedSnapshot(timeout);  // answered, but with no snapshot in it: ask again later
      }
      return;
    }
    Result<KvEventBatch> batch = DecodeBatch(message.frames[2]);
    if (!batch.ok()) {
      Malformed("answer batch " + std::to_string(*seq) + ": " + batch.status().message(), timeout);
      ReplaceDealer();
      return;
    }
    got_batch = true;
    // A snapshot (asked for, or sent in place of a replay the buffer could not serve) begins
    // with AllBlocksCleared; any batch that does may be applied as a reset, since it resets
    // anyway. Anything else in an answer to a snapshot request is ignored (state 1).
    const bool is_snapshot =
        !batch->events.empty() && batch->events[0].kind == KvEvent::Kind::kAllCleared;
    if (is_snapshot) {
      Apply(*batch, /*reset=*/true, *seq == kSnapshotBeforeFirstSeq ? int64_t{-1} : *seq);
      state_ = State::kSynced;
      unfilled = false;
      SetSynced(exact_);
      continue;
    }
    if (state_ != State::kSynced || unfilled) continue;
    if (last_ && *seq <= *last_) continue;
    if (!last_ || *seq == *last_ + 1) {
      Apply(*batch, /*reset=*/false, *seq);
    } else {
      unfilled = true;
    }
  }
}

void KvEventSubscriber::Apply(const KvEventBatch& batch, bool reset, std::optional<int64_t> seq) {
  callback_(batch, reset);
  last_ = seq;
  last_activity_ = Clock::now();
  std::lock_guard<std::mutex> lock(stats_mu_);
  ++stats_.batches;
  stats_.events += batch.events.size();
  if (reset) ++stats_.snapshots;
  stats_.last_seq = seq.value_or(-1);
}

void KvEventSubscriber::NeedSnapshot(std::chrono::milliseconds delay) {
  state_ = State::kNeedSnapshot;
  retry_at_ = Clock::now() + delay;
  SetSynced(false);
}

void KvEventSubscriber::Malformed(const std::string& why, std::chrono::milliseconds retry_delay) {
  {
    std::lock_guard<std::mutex> lock(stats_mu_);
    ++stats_.malformed;
  }
  warnings_.Warn("kv events from " + options_.endpoint + ": refused " + why);
  if (dealer_) {
    NeedSnapshot(retry_delay);
  } else {
    exact_ = false;
    SetSynced(false);
  }
}

void KvEventSubscriber::ReplaceDealer() {
  Result<internal::ZmqSocket> dealer = internal::NewZmqSocket(context_.get(), ZMQ_DEALER);
  Status s = dealer.status();
  if (s.ok()) {
    s = internal::SetZmqOption64(dealer->get(), ZMQ_MAXMSGSIZE, options_.max_message_bytes,
                                 "ZMQ_MAXMSGSIZE");
  }
  if (s.ok()) s = internal::ConnectZmq(dealer->get(), options_.replay_endpoint);
  if (!s.ok()) {
    // WART: keeping the old one, the rest of the abandoned answer may be read as part of the
    // next. Only reachable when libzmq cannot make a socket (out of file descriptors).
    warnings_.Warn("kv events: cannot replace the replay socket: " + s.ToString());
    return;
  }
  dealer_ = std::move(*dealer);
}

}  // namespace cachette::events
