#include "cli/cpu_info.h"

#include <fstream>
#include <sstream>

namespace cachette::cli {

namespace {

std::string_view Trim(std::string_view s) {
  const auto space = [](char c) { return c == ' ' || c == '\t' || c == '\r'; };
  while (!s.empty() && space(s.front())) s.remove_prefix(1);
  while (!s.empty() && space(s.back())) s.remove_suffix(1);
  return s;
}

}  // namespace

std::string ParseCpuModelName(std::string_view cpuinfo) {
  // Lines read "key<tabs>: value"; the key is compared without its padding.
  while (!cpuinfo.empty()) {
    const size_t eol = cpuinfo.find('\n');
    const std::string_view line = cpuinfo.substr(0, eol);
    cpuinfo.remove_prefix(eol == std::string_view::npos ? cpuinfo.size() : eol + 1);
    const size_t colon = line.find(':');
    if (colon == std::string_view::npos) continue;
    if (Trim(line.substr(0, colon)) == "model name") {
      return std::string(Trim(line.substr(colon + 1)));
    }
  }
  return "";
}

std::string CpuModelName() {
  std::ifstream in("/proc/cpuinfo");
  std::ostringstream text;
  text << in.rdbuf();
  const std::string name = in ? ParseCpuModelName(text.str()) : "";
  return name.empty() ? "unknown" : name;
}

}  // namespace cachette::cli
