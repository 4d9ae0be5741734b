// Feeds arbitrary bytes to the eval harness's JSONL readers (src/eval/retrieval.h ParseQaJsonl,
// src/eval/rag.h ParseRagJsonl). Each must return items or an error naming the line, never
// crash or throw; accepted items hold what the harness relies on.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "core/check.h"
#include "eval/rag.h"
#include "eval/retrieval.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace cachette;
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  auto qa = eval::ParseQaJsonl(text, "fuzz");
  if (qa.ok()) {
    for (const eval::QaItem& it : *qa) CT_CHECK(it.line >= 1);
  } else {
    CT_CHECK(qa.status().message().rfind("fuzz:", 0) == 0) << qa.status().ToString();
  }
  auto rag = eval::ParseRagJsonl(text, "fuzz");
  if (rag.ok()) {
    for (const eval::RagItem& it : *rag) {
      CT_CHECK(!it.docs.empty() && it.hops >= 1 && it.hops <= 100 && it.line >= 1);
    }
  } else {
    CT_CHECK(rag.status().message().rfind("fuzz:", 0) == 0) << rag.status().ToString();
  }
  return 0;
}
