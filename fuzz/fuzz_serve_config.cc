// Feeds arbitrary bytes as TOML to the `cachette serve` configuration parser and validator
// (src/server/config.*). Both must return a Status, never crash or throw.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "core/check.h"
#include "server/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace cachette::server;
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  ServeConfig cfg;
  const cachette::Status parsed = ParseConfigText(text, &cfg);
  if (parsed.ok()) {
    const cachette::Status valid = ValidateConfig(cfg);
    if (valid.ok()) CT_CHECK(ParseFraction(cfg.max_pinned).ok());
  } else {
    CT_CHECK(!parsed.message().empty());
  }
  (void)ParseFraction(text.substr(0, 32));
  return 0;
}
