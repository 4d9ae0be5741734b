#include "sched/prefix_source.h"

#include <algorithm>
#include <string>

#include "core/check.h"

namespace cachette::sched {

PendingSegments::PendingSegments(std::vector<SegmentRef> refs, std::vector<int> band_ends)
    : refs_(std::move(refs)), band_ends_(std::move(band_ends)), found_(refs_.size()) {
  CT_CHECK(!band_ends_.empty() && std::is_sorted(band_ends_.begin(), band_ends_.end()) &&
           band_ends_.front() > 0);
}

bool PendingSegments::ready() const {
  std::lock_guard lock(mu_);
  return done_;
}

bool PendingSegments::WaitUntil(Time deadline) {
  std::unique_lock lock(mu_);
  return cv_.wait_until(lock, deadline, [&] { return done_; });
}

bool PendingSegments::published() const {
  std::lock_guard lock(mu_);
  return !band_done_us_.empty() || done_;
}

bool PendingSegments::WaitPublished(Time deadline) {
  std::unique_lock lock(mu_);
  return cv_.wait_until(lock, deadline, [&] { return !band_done_us_.empty() || done_; });
}

std::shared_ptr<const SegmentKv> PendingSegments::Found(std::span<const TokenId> tokens,
                                                        uint64_t context) const {
  std::lock_guard lock(mu_);
  if (band_done_us_.empty()) return nullptr;
  for (size_t i = 0; i < refs_.size(); ++i) {
    if (found_[i] != nullptr && refs_[i].context == context &&
        std::equal(tokens.begin(), tokens.end(), refs_[i].tokens.begin(),
                   refs_[i].tokens.end())) {
      return found_[i];
    }
  }
  return nullptr;
}

Status PendingSegments::AwaitLayer(int layer, Time deadline) {
  std::unique_lock lock(mu_);
  ++waiting_;
  const bool in_time = cv_.wait_until(
      lock, deadline, [&] { return LayersLocked() > layer || done_ || failed_; });
  --waiting_;
  if (!in_time) {
    return DeadlineExceeded("segment KV layer " + std::to_string(layer) +
                            " not loaded by the deadline");
  }
  if (LayersLocked() > layer) return Status::Ok();
  return Unavailable("segment KV layer " + std::to_string(layer) + " could not be loaded");
}

int PendingSegments::waiting() const {
  std::lock_guard lock(mu_);
  return waiting_;
}

double PendingSegments::load_left_us() const {
  std::lock_guard lock(mu_);
  const size_t in = band_done_us_.size();
  if (done_ || failed_ || in == 0 || in == band_ends_.size()) return 0;
  // took = fixed + per_layer x layers over the bands in, least squares, both kept >= 0.
  std::vector<double> layers(in), took(in);
  double mean_l = 0, mean_t = 0;
  for (size_t b = 0; b < in; ++b) {
    layers[b] = band_ends_[b] - (b == 0 ? 0 : band_ends_[b - 1]);
    took[b] = band_done_us_[b] - (b == 0 ? 0 : band_done_us_[b - 1]);
    mean_l += layers[b] / static_cast<double>(in);
    mean_t += took[b] / static_cast<double>(in);
  }
  double cov = 0, var = 0;
  for (size_t b = 0; b < in; ++b) {
    cov += (layers[b] - mean_l) * (took[b] - mean_t);
    var += (layers[b] - mean_l) * (layers[b] - mean_l);
  }
  double per_layer = var > 0 ? std::max(0.0, cov / var) : 0;
  double fixed = mean_t - per_layer * mean_l;
  if (fixed < 0) {
    fixed = 0;
    per_layer = mean_t / mean_l;
  }
  double left = 0;
  for (size_t b = in; b < band_ends_.size(); ++b) {
    left += fixed + per_layer * (band_ends_[b] - band_ends_[b - 1]);
  }
  const double since =
      std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - updated_)
          .count();
  return std::max(0.0, left - since);
}

std::vector<std::shared_ptr<SegmentKv>> PendingSegments::Take() {
  std::lock_guard lock(mu_);
  if (!done_) return {};
  if (LayersLocked() < band_ends_.back() || failed_) found_.assign(found_.size(), nullptr);
  return std::move(found_);
}

void PendingSegments::Publish(std::vector<std::shared_ptr<SegmentKv>> found,
                              double elapsed_us) {
  {
    std::lock_guard lock(mu_);
    CT_CHECK(band_done_us_.empty() && found.size() == refs_.size());
    found_ = std::move(found);
    band_done_us_.push_back(elapsed_us);
    updated_ = std::chrono::steady_clock::now();
  }
  cv_.notify_all();
}

void PendingSegments::Advance(double elapsed_us) {
  {
    std::lock_guard lock(mu_);
    CT_CHECK(!band_done_us_.empty() && band_done_us_.size() < band_ends_.size());
    band_done_us_.push_back(elapsed_us);
    updated_ = std::chrono::steady_clock::now();
  }
  cv_.notify_all();
}

void PendingSegments::Fail() {
  {
    std::lock_guard lock(mu_);
    failed_ = true;
  }
  cv_.notify_all();
}

void PendingSegments::Finish() {
  {
    std::lock_guard lock(mu_);
    done_ = true;
  }
  cv_.notify_all();
}

}  // namespace cachette::sched
