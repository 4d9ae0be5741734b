// Parsing and printing of human-written quantities (byte sizes).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "cachette/status.h"

namespace cachette {

// "512MiB", "4GiB", "1.5G", "64k", "1000" (bytes). Binary and decimal suffixes are both taken
// as powers of 1024 (K/M/G/T with optional "i" and "B", any case): memory budgets are binary.
// kInvalidArgument naming the text for anything else, zero, or overflow.
Result<uint64_t> ParseBytes(std::string_view text);

// 1536 -> "1.5 KiB".
std::string FormatBytes(uint64_t bytes);

}  // namespace cachette
