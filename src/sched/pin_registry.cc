#include "sched/pin_registry.h"

#include <algorithm>

#include "core/log.h"
#include "core/timer.h"
#include "sched/prefix_source.h"

namespace cachette::sched {
namespace {

// The scheduler's own pins (program pins) are keyed "\x01...": not sessions of a client.
bool Journaled(const std::string& key) { return !key.empty() && key[0] != '\x01'; }

}  // namespace

PinRegistry::PinRegistry(KvManager& kv, Limits limits, ClockMs clock, PrefixSource* source)
    : PinRegistry([&kv](const Hash128&) -> KvManager& { return kv; }, limits, std::move(clock),
                  source) {}

PinRegistry::PinRegistry(PoolFn pools, Limits limits, ClockMs clock, PrefixSource* source)
    : pools_(std::move(pools)), limits_(limits), clock_(std::move(clock)), source_(source) {
  if (!clock_) clock_ = [] { return NowNanos() / 1000000; };
  limits_.max_ttl_ms = std::max<int64_t>(1, limits_.max_ttl_ms);
  limits_.max_pinned_fraction = std::clamp(limits_.max_pinned_fraction, 0.0, 1.0);
}

std::map<uint64_t, PinRegistry::Entry>::iterator PinRegistry::Take(
    std::map<uint64_t, Entry>::iterator it, Released* out) {
  const Info& info = it->second.info;
  if (info.digest != 0) {
    session_to_pin_.erase(info.digest);
    if (info.restored || Journaled(info.session)) out->journaled.push_back(info.digest);
  }
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
  if (journal_ != nullptr) {
    for (uint64_t d : r.journaled) journal_->Remove(d);
  }
  r.journaled.clear();
}

PinRegistry::Info PinRegistry::Add(const Hash128& ns, const std::string& cache_salt,
                                   std::span<const TokenId> tokens, int64_t ttl_ms,
                                   KvManager* pool) {
  return AddPin(pool, ns, cache_salt, tokens, ttl_ms, /*session=*/false);
}

PinRegistry::Info PinRegistry::AddPin(KvManager* in, const Hash128& ns,
                                      const std::string& cache_salt,
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
  KvManager& pool = in != nullptr ? *in : pools_(ns);
  KvManager::Pin pin = pool.PinPrefix(ns, tokens, ttl_ms);
  info.tokens = pin.tokens();
  if (info.tokens == 0) {  // nothing cached: the empty pin is released here
    info.status = NotFound("nothing of the prefix is cached");
    return info;
  }
  const KvManager::Stats st = pool.GetStats();
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
                                          std::span<const TokenId> tokens, int64_t ttl_ms,
                                          KvManager* pool) {
  Info info = AddPin(pool, ns, cache_salt, tokens, ttl_ms, /*session=*/true);
  const uint64_t digest = cache::SessionDigest64(session);
  Released old;  // released after the lock, once the new pin holds the shared prefix
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = session_to_pin_.find(digest);
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
      Info& held = pins_[info.id].info;
      held.session = info.session = session;
      held.digest = info.digest = digest;
      session_to_pin_[digest] = info.id;
    }
  }
  Release(old);  // erases the replaced turn's journal record...
  if (info.id != 0 && journal_ != nullptr && Journaled(session)) {
    // ... and this one is written after it (the journal keeps the latest intent per session).
    const int64_t now_unix_ms = UnixMillis();  // the journal keeps wall-clock times
    cache::SessionRecord r;
    r.digest = digest;
    r.ns = ns;
    r.updated_unix_ms = now_unix_ms;
    r.expires_unix_ms = now_unix_ms + (info.expires_at_ms - Now());
    r.tokens.assign(tokens.begin(), tokens.end());
    journal_->Write(std::move(r));
  }
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
    auto it = session_to_pin_.find(cache::SessionDigest64(session));
    if (it == session_to_pin_.end()) return false;
    id = it->second;
  }
  return Remove(id);
}

size_t PinRegistry::RemoveTenant(const std::string& cache_salt, const Hash128& ns) {
  Released old;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = pins_.begin(); it != pins_.end();) {
      const Info& i = it->second.info;
      const bool theirs = i.restored ? i.ns == ns : i.cache_salt == cache_salt;
      it = theirs ? Take(it, &old) : std::next(it);
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

PinRegistry::RestoreReport PinRegistry::AttachJournal(
    cache::SessionJournal* journal, const std::vector<cache::SessionRecord>& found,
    int64_t now_unix_ms) {
  RestoreReport rep;
  journal_ = journal;
  if (journal == nullptr) return rep;
  // The latest sessions first, so the cap keeps those.
  std::vector<const cache::SessionRecord*> order;
  for (const auto& r : found) order.push_back(&r);
  std::sort(order.begin(), order.end(), [](const auto* a, const auto* b) {
    return a->updated_unix_ms > b->updated_unix_ms;
  });
  for (const cache::SessionRecord* r : order) {
    const int64_t left = r->expires_unix_ms == 0 ? limits_.max_ttl_ms
                                                 : r->expires_unix_ms - now_unix_ms;
    if (left <= 0 || r->tokens.empty()) {
      journal->Remove(r->digest);
      ++rep.expired;
      continue;
    }
    const int64_t ttl = std::min(left, limits_.max_ttl_ms);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (session_to_pin_.size() >= std::max<size_t>(1, limits_.max_sessions) ||
          session_to_pin_.count(r->digest) != 0) {
        journal->Remove(r->digest);
        ++rep.dropped;
        continue;
      }
    }
    const uint64_t source_pin = source_ != nullptr ? source_->Pin(r->ns, r->tokens, ttl) : 0;
    Info info;
    info.digest = r->digest;
    info.restored = true;
    info.ns = r->ns;
    info.tokens = static_cast<int64_t>(r->tokens.size());
    info.expires_at_ms = Now() + ttl;
    std::lock_guard<std::mutex> lock(mu_);
    info.id = next_id_++;
    session_to_pin_[info.digest] = info.id;
    pins_.emplace(info.id, Entry{info, KvManager::Pin(), source_pin});
    ++rep.sessions;
    rep.tokens += info.tokens;
  }
  return rep;
}

std::vector<Hash128> PinRegistry::RestoredNamespaces() {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<Hash128> out;
  for (const auto& [id, e] : pins_) {
    if (e.info.restored && std::find(out.begin(), out.end(), e.info.ns) == out.end()) {
      out.push_back(e.info.ns);
    }
  }
  return out;
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
