// Test helpers shared by the scheduler tests (test code only): the trained model, text to
// tokens, a RAM-only chunk store, and a request's stream collected to its end.
#pragma once

#include <gtest/gtest.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "cachette/cache.h"
#include "core/check.h"
#include "model/model.h"
#include "sched/request.h"

namespace cachette::sched_test {

// A path under ../shared. Appended rather than `std::string(...) + "..."`, which trips a GCC 12
// -Warray-bounds false positive once inlined.
inline std::string SharedPath(const char* rel) {
  std::string path(CACHETTE_SHARED_DIR);
  path += rel;
  return path;
}

// The trained tiny model, F32 weights, loaded once per process.
inline const Model& Trained() {
  static std::unique_ptr<Model> m = [] {
    auto r = Model::Load(SharedPath("/models/cachette-tiny-f32.gguf"));
    CT_CHECK(r.ok()) << r.status().ToString();
    return std::move(*r);
  }();
  return *m;
}

// `s` as the trained model's tokens, BOS first.
inline std::vector<TokenId> Text(const std::string& s) {
  return Trained().tokenizer().Encode(s, /*add_bos=*/true, /*parse_special=*/false);
}

struct Collected {
  std::vector<TokenId> tokens;
  std::string text;
  sched::StreamEvent last;  // the terminal event
};

// A chunk store with a RAM tier only (64 MiB, chunks of 32 tokens), for a TierBridge.
inline std::unique_ptr<Cache> RamOnlyStore() {
  CacheOptions co;
  co.chunk_tokens = 32;
  co.ram_budget_bytes = 64 << 20;
  auto c = Cache::Open(co);
  CT_CHECK(c.ok()) << c.status().ToString();
  return std::move(*c);
}

// Every event of `s` up to its terminal one (a test failure after 60 s without one).
inline Collected Collect(sched::RequestStream& s) {
  Collected c;
  sched::StreamEvent e;
  for (;;) {
    if (!s.Next(&e, std::chrono::milliseconds(60000))) {
      ADD_FAILURE() << "no event for 60 s";
      return c;
    }
    if (e.kind == sched::StreamEvent::Kind::kToken) {
      c.tokens.push_back(e.token);
      c.text += e.text;
      continue;
    }
    c.last = e;
    return c;
  }
}

}  // namespace cachette::sched_test
