#include "sched/pin_registry.h"

#include "core/timer.h"

namespace cachette::sched {

PinRegistry::PinRegistry(KvManager& kv, ClockMs clock) : kv_(kv), clock_(std::move(clock)) {
  if (!clock_) clock_ = [] { return NowNanos() / 1000000; };
}

PinRegistry::Info PinRegistry::Add(const Hash128& ns, const std::string& cache_salt,
                                   std::span<const TokenId> tokens, int64_t ttl_ms) {
  KvManager::Pin pin = kv_.PinPrefix(ns, tokens, ttl_ms);
  Info info;
  info.tokens = pin.tokens();
  if (info.tokens == 0) return info;  // nothing cached: the empty pin is released here
  info.cache_salt = cache_salt;
  info.ns = ns;
  info.expires_at_ms = Now() + ttl_ms;
  std::lock_guard<std::mutex> lock(mu_);
  info.id = next_id_++;
  pins_.emplace(info.id, Entry{info, std::move(pin)});
  return info;
}

PinRegistry::Info PinRegistry::SetSession(const std::string& session, const Hash128& ns,
                                          const std::string& cache_salt,
                                          std::span<const TokenId> tokens, int64_t ttl_ms) {
  Info info = Add(ns, cache_salt, tokens, ttl_ms);
  KvManager::Pin old;  // released after the lock, once the new pin holds the shared prefix
  std::lock_guard<std::mutex> lock(mu_);
  auto it = session_to_pin_.find(session);
  if (it != session_to_pin_.end()) {
    auto p = pins_.find(it->second);
    if (p != pins_.end()) {
      old = std::move(p->second.pin);
      pins_.erase(p);
    }
    session_to_pin_.erase(it);
  }
  if (info.id != 0) {
    pins_[info.id].info.session = session;
    info.session = session;
    session_to_pin_[session] = info.id;
  }
  return info;
}

bool PinRegistry::Remove(uint64_t id) {
  KvManager::Pin old;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = pins_.find(id);
  if (it == pins_.end()) return false;
  if (!it->second.info.session.empty()) session_to_pin_.erase(it->second.info.session);
  old = std::move(it->second.pin);
  pins_.erase(it);
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
  std::vector<KvManager::Pin> old;
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = pins_.begin(); it != pins_.end();) {
    if (it->second.info.cache_salt != cache_salt) {
      ++it;
      continue;
    }
    if (!it->second.info.session.empty()) session_to_pin_.erase(it->second.info.session);
    old.push_back(std::move(it->second.pin));
    it = pins_.erase(it);
  }
  return old.size();
}

size_t PinRegistry::Sweep() {
  std::vector<KvManager::Pin> old;
  const int64_t now = Now();
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = pins_.begin(); it != pins_.end();) {
    if (it->second.info.expires_at_ms > now) {
      ++it;
      continue;
    }
    if (!it->second.info.session.empty()) session_to_pin_.erase(it->second.info.session);
    old.push_back(std::move(it->second.pin));
    it = pins_.erase(it);
  }
  return old.size();
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
