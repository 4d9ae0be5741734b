// CT_CHECK(cond) << "why": always-on invariant checks. A failed check prints the condition,
// the location and the streamed message to stderr, then aborts. Use only for broken
// invariants (bugs), never for bad input: bad input gets a Status.
#pragma once

#include <sstream>

namespace cachette::internal {

class CheckFailure {
 public:
  CheckFailure(const char* cond, const char* file, int line);
  [[noreturn]] ~CheckFailure();
  std::ostream& stream() { return os_; }

 private:
  std::ostringstream os_;
};

// Lets `CT_CHECK(c) << x` compile to a void expression in both branches.
struct Voidify {
  void operator&(std::ostream&) {}
};

}  // namespace cachette::internal

#define CT_CHECK(cond)                  \
  (cond) ? (void)0                      \
         : ::cachette::internal::Voidify() & \
               ::cachette::internal::CheckFailure(#cond, __FILE__, __LINE__).stream()

#define CT_CHECK_EQ(a, b) CT_CHECK((a) == (b)) << #a " = " << (a) << ", " #b " = " << (b) << " "
#define CT_CHECK_LT(a, b) CT_CHECK((a) < (b)) << #a " = " << (a) << ", " #b " = " << (b) << " "
#define CT_CHECK_LE(a, b) CT_CHECK((a) <= (b)) << #a " = " << (a) << ", " #b " = " << (b) << " "
