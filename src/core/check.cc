#include "core/check.h"

#include <cstdio>
#include <cstdlib>

namespace cachette::internal {

CheckFailure::CheckFailure(const char* cond, const char* file, int line) {
  os_ << file << ":" << line << ": CHECK failed: " << cond << " ";
}

CheckFailure::~CheckFailure() {
  std::string s = os_.str();
  std::fprintf(stderr, "%s\n", s.c_str());
  std::fflush(stderr);
  std::abort();
}

}  // namespace cachette::internal
