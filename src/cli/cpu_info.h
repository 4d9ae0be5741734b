// The machine a benchmark ran on: its processor, as benchmark reports print it, and how much
// memory it may use beside its model.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "cachette/status.h"
#include "model/gguf.h"

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

// Where a model's weights are kept (gguf::Residence). `choice` is CACHETTE_WEIGHTS: "mmap",
// "huge-pages", or empty for automatic; anything else is an error that names the choices.
// Automatic: huge pages where the kernel gives them to an advised range (`thp`, the text of
// /sys/kernel/mm/transparent_hugepage/enabled, selects "[always]" or "[madvise]") and the file
// takes at most half of mem_available (the rest stays for the KV cache, the cache tiers and the
// page cache); else the file mapping, as also when mem_available or file_bytes is 0 (unknown).
Result<gguf::Residence> ChooseWeightResidence(std::string_view choice, std::string_view thp,
                                              uint64_t mem_available, uint64_t file_bytes);

// ChooseWeightResidence for the model file at `path` on this machine, with CACHETTE_WEIGHTS
// from the environment.
Result<gguf::Residence> WeightResidence(const std::string& path);

// "huge pages" or "mmap", as `bench engine` and the server's log print it.
std::string_view ResidenceName(gguf::Residence r);

}  // namespace cachette::cli
