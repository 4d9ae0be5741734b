#include "cli/cpu_info.h"

#include <gtest/gtest.h>

namespace cachette::cli {
namespace {

TEST(ParseCpuModelName, TakesTheFirstModelNameLineTrimmed) {
  const char* text =
      "processor\t: 0\n"
      "vendor_id\t: GenuineIntel\n"
      "model\t\t: 143\n"
      "model name\t: Intel(R) Xeon(R) Platinum 8480+  \n"
      "processor\t: 1\n"
      "model name\t: Some Other CPU\n";
  EXPECT_EQ(ParseCpuModelName(text), "Intel(R) Xeon(R) Platinum 8480+");
}

TEST(ParseCpuModelName, IgnoresKeysThatOnlyStartLikeIt) {
  // "model" alone is a number, and a key merely containing the words does not count.
  EXPECT_EQ(ParseCpuModelName("model\t\t: 85\nmodel names\t: x\n"), "");
}

TEST(ParseCpuModelName, EmptyWhenAbsentOrMalformed) {
  EXPECT_EQ(ParseCpuModelName(""), "");
  EXPECT_EQ(ParseCpuModelName("CPU implementer\t: 0x41\nCPU part\t: 0xd0c\n"), "");
  EXPECT_EQ(ParseCpuModelName("model name without a colon\n"), "");
}

TEST(ParseCpuModelName, ValueWithColonsAndNoTrailingNewline) {
  EXPECT_EQ(ParseCpuModelName("model name : AMD EPYC 9654: 96-Core"), "AMD EPYC 9654: 96-Core");
  EXPECT_EQ(ParseCpuModelName("model name\t:\n"), "");
}

TEST(CpuModelName, NeverEmpty) { EXPECT_FALSE(CpuModelName().empty()); }

}  // namespace
}  // namespace cachette::cli
