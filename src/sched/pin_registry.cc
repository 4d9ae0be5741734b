#include "sched/pin_registry.h"

#include <algorithm>

#include "core/timer.h"
#include "sched/prefix_source.h"

namespace cachette::sched {

PinRegistry::PinRegistry(KvManager& kv, Limits limits, ClockMs clock, PrefixSource* source)
    : kv_(kv), limits_(limits), clock_(std::move(clock)), source_(source) {
  if (!clock_) clock_ = [] { return NowNanos() / 1000000; };
  limits_.max_ttl_ms = std::max<int64_t>(1, limits_.max_ttl_ms);
  limits_.max_pinned_fraction = std::clamp(limits_.max_pinned_fraction, 0.0, 1.0);
}

std::map<uint64_t, PinRegistry::Entry>::iterator PinRegistry::Take(
    std::map<uint64_t, Entry>::iterator it, Released* out) {
  if (!it->second.info.session.empty()) session_to_pin_.erase(it->second.info.session);
  out->pins.push_back(std::move(it->second.pin));
  if (it->second.source_pin != 0) out->source_pins.push_back(it->second.source_pin);
  return pins_.erase(it);
}

void PinRegistry::Release(Released& r) {
  r.pins.clear();  // unpins the pages
  if (source_ != nullptr) {
    for (uint64_t id : r.source_pins) source_->Unpin(id);
  }
  r.source_pins.clear();
}

PinRegistry::Info PinRegistry::Add(const Hash128& ns, const std::string& cache_salt,
                                   std::span<const TokenId> tokens, int64_t ttl_ms) {
  return AddPin(ns, cache_salt, tokens, ttl_ms, /*session=*/false);
}

PinRegistry::Info PinRegistry::AddPin(const Hash128& ns, const std::string& cache_salt,
                                      std::span<const TokenId> tokens, int64_t ttl_ms,
                                      bool session) {
  Info info;
  ttl_ms = std::clamp<int64_t>(ttl_ms, 1, limits_.max_ttl_ms);
  if (!session) {
    std::lock_guard<std::mutex> lock(mu_);
    if (pins_.size() - session_to_pin_.size() >= limits_.max_pins) {
      info.status = ResourceExhausted("too many pins (" + std::to_string(limits_.max_pins) +
                                      "); unpin some or let them expire");
      return info;
    }
  }
  KvManager::Pin pin = kv_.PinPrefix(ns, tokens, ttl_ms);
  info.tokens = pin.tokens();
  if (info.tokens == 0) {  // nothing cached: the empty pin is released here
    info.status = NotFound("nothing of the prefix is cached");
    return info;
  }
  const KvManager::Stats st = kv_.GetStats();
  const double cap = limits_.max_pinned_fraction * static_cast<double>(st.pages_total);
  if (static_cast<double>(st.pages_pinned) > cap) {
    pin.Reset();
    info.tokens = 0;
    info.status = ResourceExhausted(
        "pinning this prefix would hold more than " +
        std::to_string(static_cast<int>(limits_.max_pinned_fraction * 100)) +
        "% of the KV pool (--max-pinned)");
    return info;
  }
  info.cache_salt = cache_salt;
  info.ns = ns;
  info.expires_at_ms = Now() + ttl_ms;
  const uint64_t source_pin = source_ != nullptr ? source_->Pin(ns, tokens, ttl_ms) : 0;
  std::lock_guard<std::mutex> lock(mu_);
  info.id = next_id_++;
  pins_.emplace(info.id, Entry{info, std::move(pin), source_pin});
  return info;
}

PinRegistry::Info PinRegistry::SetSession(const std::string& session, const Hash128& ns,
                                          const std::string& cache_salt,
                                          std::span<const TokenId> tokens, int64_t ttl_ms) {
  Info info = AddPin(ns, cache_salt, tokens, ttl_ms, /*session=*/true);
  Released old;  // released after the lock, once the new pin holds the shared prefix
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = session_to_pin_.find(session);
    if (it != session_to_pin_.end()) {
      auto p = pins_.find(it->second);
      if (p != pins_.end()) {
        Take(p, &old);
      } else {
        session_to_pin_.erase(it);
      }
    }
    if (info.id != 0) {
      // Bounded: a new session beyond max_sessions replaces the one that expires first.
      while (session_to_pin_.size() >= std::max<size_t>(1, limits_.max_sessions)) {
        auto victim = std::min_element(
            session_to_pin_.begin(), session_to_pin_.end(), [&](const auto& a, const auto& b) {
              return pins_.at(a.second).info.expires_at_ms < pins_.at(b.second).info.expires_at_ms;
            });
        Take(pins_.find(victim->second), &old);
      }
      pins_[info.id].info.session = session;
      info.session = session;
      session_to_pin_[session] = info.id;
    }
  }
  Release(old);
  return info;
}

bool PinRegistry::Remove(uint64_t id) {
  Released old;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = pins_.find(id);
    if (it == pins_.end()) return false;
    Take(it, &old);
  }
  Release(old);
  return true;
}

bool PinRegistry::RemoveSession(const std::string& session) {
  uint64_t id = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = session_to_pin_.find(session);
    if (it == session_to_pin_.end()) return false;
    id = it->second;
  }
  return Remove(id);
}

size_t PinRegistry::RemoveTenant(const std::string& cache_salt) {
  Released old;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = pins_.begin(); it != pins_.end();) {
      it = it->second.info.cache_salt == cache_salt ? Take(it, &old) : std::next(it);
    }
  }
  const size_t n = old.pins.size();
  Release(old);
  return n;
}

size_t PinRegistry::Sweep() {
  Released old;
  const int64_t now = Now();
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = pins_.begin(); it != pins_.end();) {
      it = it->second.info.expires_at_ms <= now ? Take(it, &old) : std::next(it);
    }
  }
  const size_t n = old.pins.size();
  Release(old);
  return n;
}

std::vector<PinRegistry::Info> PinRegistry::List() {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<Info> out;
  for (const auto& [id, e] : pins_) out.push_back(e.info);
  return out;
}

size_t PinRegistry::sessions() {
  std::lock_guard<std::mutex> lock(mu_);
  return session_to_pin_.size();
}

}  // namespace cachette::sched
