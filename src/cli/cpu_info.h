// The processor a benchmark ran on, as benchmark reports print it.
#pragma once

#include <string>
#include <string_view>

namespace cachette::cli {

// The value of the first "model name" line of a /proc/cpuinfo text ("Intel(R) Xeon(R) ..."),
// with the spaces around it trimmed; empty when there is none (e.g. most ARM kernels).
std::string ParseCpuModelName(std::string_view cpuinfo);

// ParseCpuModelName of this machine's /proc/cpuinfo, or "unknown" when it cannot be read or
// names no model.
std::string CpuModelName();

}  // namespace cachette::cli
