#include "sched/request.h"

namespace cachette::sched {

bool RequestStream::Next(StreamEvent* out, std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  if (!cv_.wait_for(lock, timeout, [&] { return !events_.empty(); })) return false;
  *out = std::move(events_.front());
  events_.pop_front();
  return true;
}

void RequestStream::Cancel() {
  if (cancelled_.exchange(true, std::memory_order_acq_rel)) return;
  if (on_cancel_) on_cancel_();
}

void RequestStream::Push(StreamEvent e) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    events_.push_back(std::move(e));
  }
  cv_.notify_one();
}

Status ValidateApeLayout(const SchedRequest& r) {
  if (r.reuse.mode != ReuseMode::kApe || r.segments.empty()) return Status::Ok();
  const auto& sg = r.segments;
  const int64_t n = static_cast<int64_t>(r.prompt.size());
  const size_t docs = sg.size() - (sg.back().offset + sg.back().length == n ? 1 : 0);
  if (docs == 0) {
    return InvalidArgument(
        "kv_reuse 'ape' needs a document segment before the query (the last segment, ending "
        "the prompt, is the query)");
  }
  for (size_t i = 0; i + 1 < docs; ++i) {
    if (sg[i].offset + sg[i].length != sg[i + 1].offset) {
      return InvalidArgument("kv_reuse 'ape' needs its document segments adjacent (text between "
                             "documents " + std::to_string(i) + " and " + std::to_string(i + 1) +
                             ")");
    }
  }
  const ApeOptions& a = r.ape;
  if (!(a.temperature > 0 && a.temperature <= 100 && a.scale > 0 && a.scale <= 100)) {
    return InvalidArgument("ape temperature and scale must be in (0, 100]");
  }
  return Status::Ok();
}

}  // namespace cachette::sched
