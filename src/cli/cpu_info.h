// The machine a benchmark ran on: its processor, as benchmark reports print it, and how much
// memory it may use beside its model.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace cachette::cli {

// The value of the first "model name" line of a /proc/cpuinfo text ("Intel(R) Xeon(R) ..."),
// with the spaces around it trimmed; empty when there is none (e.g. most ARM kernels).
std::string ParseCpuModelName(std::string_view cpuinfo);

// ParseCpuModelName of this machine's /proc/cpuinfo, or "unknown" when it cannot be read or
// names no model.
std::string CpuModelName();

// MemAvailable of a /proc/meminfo text in bytes ("MemAvailable:   123456 kB"); 0 when there is
// no such line or its value is not a number of kB.
uint64_t ParseMemAvailable(std::string_view meminfo);

// ParseMemAvailable of this machine's /proc/meminfo (0 when it cannot be read).
uint64_t MemAvailableBytes();

// The size of the memory read probe's buffer for a benchmark of a model that maps model_bytes:
// 1 GiB, or half of what MemAvailable leaves beside the model where that is less, so that the
// probe, held during the repetitions, never pushes the model's pages out (MemAvailable counts
// them as available: they are page cache). 0 (no probe) below 256 MiB, which would sit too near
// the last-level cache of large processors to measure memory. mem_available = 0 (unknown):
// 1 GiB.
size_t ProbeBufferBytes(uint64_t mem_available, uint64_t model_bytes);

}  // namespace cachette::cli
