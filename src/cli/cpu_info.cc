#include "cli/cpu_info.h"

#include <algorithm>
#include <charconv>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>

namespace cachette::cli {

namespace {

std::string_view Trim(std::string_view s) {
  const auto space = [](char c) { return c == ' ' || c == '\t' || c == '\r'; };
  while (!s.empty() && space(s.front())) s.remove_prefix(1);
  while (!s.empty() && space(s.back())) s.remove_suffix(1);
  return s;
}

// The trimmed value of the first "key: value" line of a /proc text whose key, without its
// padding, is `key`; nullopt when there is none.
std::optional<std::string_view> FindValue(std::string_view text, std::string_view key) {
  while (!text.empty()) {
    const size_t eol = text.find('\n');
    const std::string_view line = text.substr(0, eol);
    text.remove_prefix(eol == std::string_view::npos ? text.size() : eol + 1);
    const size_t colon = line.find(':');
    if (colon == std::string_view::npos) continue;
    if (Trim(line.substr(0, colon)) == key) return Trim(line.substr(colon + 1));
  }
  return std::nullopt;
}

std::string ReadProcFile(const char* path) {
  std::ifstream in(path);
  std::ostringstream text;
  text << in.rdbuf();
  return in ? text.str() : "";
}

}  // namespace

std::string ParseCpuModelName(std::string_view cpuinfo) {
  // Lines read "key<tabs>: value".
  return std::string(FindValue(cpuinfo, "model name").value_or(""));
}

std::string CpuModelName() {
  const std::string name = ParseCpuModelName(ReadProcFile("/proc/cpuinfo"));
  return name.empty() ? "unknown" : name;
}

uint64_t ParseMemAvailable(std::string_view meminfo) {
  const std::optional<std::string_view> v = FindValue(meminfo, "MemAvailable");
  if (!v) return 0;
  uint64_t kb = 0;
  const auto [end, ec] = std::from_chars(v->data(), v->data() + v->size(), kb);
  if (ec != std::errc() || Trim(std::string_view(end, v->data() + v->size() - end)) != "kB" ||
      kb > (uint64_t{1} << 50)) {
    return 0;
  }
  return kb * 1024;
}

uint64_t MemAvailableBytes() { return ParseMemAvailable(ReadProcFile("/proc/meminfo")); }

size_t ProbeBufferBytes(uint64_t mem_available, uint64_t model_bytes) {
  constexpr uint64_t kMax = uint64_t{1} << 30, kMin = uint64_t{256} << 20;
  if (mem_available == 0) return kMax;
  const uint64_t room = mem_available > model_bytes ? (mem_available - model_bytes) / 2 : 0;
  const uint64_t bytes = std::min(kMax, room);
  return bytes < kMin ? 0 : static_cast<size_t>(bytes);
}

Result<gguf::Residence> ChooseWeightResidence(std::string_view choice, std::string_view thp,
                                              uint64_t mem_available, uint64_t file_bytes) {
  if (choice == "mmap") return gguf::Residence::kMapped;
  if (choice == "huge-pages") return gguf::Residence::kHugePages;
  if (!choice.empty()) {
    return InvalidArgument("CACHETTE_WEIGHTS=" + std::string(choice) +
                           " is not one of mmap, huge-pages (or unset: automatic)");
  }
  const bool advised = thp.find("[always]") != std::string_view::npos ||
                       thp.find("[madvise]") != std::string_view::npos;
  if (advised && file_bytes > 0 && mem_available > 0 && file_bytes <= mem_available / 2) {
    return gguf::Residence::kHugePages;
  }
  return gguf::Residence::kMapped;
}

Result<gguf::Residence> WeightResidence(const std::string& path) {
  const char* env = std::getenv("CACHETTE_WEIGHTS");
  std::error_code ec;
  const uintmax_t bytes = std::filesystem::file_size(path, ec);
  return ChooseWeightResidence(env != nullptr ? env : "",
                               ReadProcFile("/sys/kernel/mm/transparent_hugepage/enabled"),
                               MemAvailableBytes(), ec ? 0 : static_cast<uint64_t>(bytes));
}

std::string_view ResidenceName(gguf::Residence r) {
  return r == gguf::Residence::kHugePages ? "huge pages" : "mmap";
}

}  // namespace cachette::cli
