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

TEST(ParseMemAvailable, ReadsTheKilobytesOfItsLine) {
  const char* text =
      "MemTotal:       24568316 kB\n"
      "MemFree:         1023456 kB\n"
      "MemAvailable:   20971520 kB\n"
      "Buffers:          123456 kB\n";
  EXPECT_EQ(ParseMemAvailable(text), uint64_t{20971520} * 1024);
  EXPECT_EQ(ParseMemAvailable("MemAvailable: 1 kB"), 1024u);
}

TEST(ParseMemAvailable, ZeroWhenAbsentOrMalformed) {
  EXPECT_EQ(ParseMemAvailable(""), 0u);
  EXPECT_EQ(ParseMemAvailable("MemTotal: 1000 kB\nMemFree: 10 kB\n"), 0u);
  EXPECT_EQ(ParseMemAvailable("MemAvailable: lots kB\n"), 0u);
  EXPECT_EQ(ParseMemAvailable("MemAvailable: 1000 MB\n"), 0u);
  EXPECT_EQ(ParseMemAvailable("MemAvailable: 1000\n"), 0u);
  EXPECT_EQ(ParseMemAvailable("MemAvailable: -5 kB\n"), 0u);
  EXPECT_EQ(ParseMemAvailable("MemAvailable: 99999999999999999999999 kB\n"), 0u);
}

TEST(MemAvailableBytes, ThisMachineHasSome) { EXPECT_GT(MemAvailableBytes(), 0u); }

TEST(ProbeBufferBytes, OneGibibyteWhereThereIsRoomElseHalfTheRestElseNone) {
  constexpr uint64_t kMiB = uint64_t{1} << 20, kGiB = uint64_t{1} << 30;
  EXPECT_EQ(ProbeBufferBytes(20 * kGiB, 500 * kMiB), kGiB);
  EXPECT_EQ(ProbeBufferBytes(0, 500 * kMiB), kGiB);  // unknown: as before
  // 1.5 GiB beside a 500 MiB model: half of the 1 GiB left.
  EXPECT_EQ(ProbeBufferBytes(1536 * kMiB, 512 * kMiB), 512 * kMiB);
  EXPECT_EQ(ProbeBufferBytes(512 * kMiB + 512 * kMiB, 512 * kMiB), 256 * kMiB);
  EXPECT_EQ(ProbeBufferBytes(1000 * kMiB, 512 * kMiB), 0u);  // 244 MiB: too small to measure
  EXPECT_EQ(ProbeBufferBytes(100 * kMiB, 512 * kMiB), 0u);   // less than the model
}

TEST(ChooseWeightResidence, HugePagesWhereTheKernelGivesThemAndTheFileFitsTwice) {
  using gguf::Residence;
  constexpr uint64_t kGiB = uint64_t{1} << 30;
  const char* madvise = "always [madvise] never\n";
  EXPECT_EQ(*ChooseWeightResidence("", madvise, 8 * kGiB, 4 * kGiB), Residence::kHugePages);
  EXPECT_EQ(*ChooseWeightResidence("", "[always] madvise never", 8 * kGiB, kGiB),
            Residence::kHugePages);
  EXPECT_EQ(*ChooseWeightResidence("", madvise, 8 * kGiB, 4 * kGiB + 1), Residence::kMapped);
  EXPECT_EQ(*ChooseWeightResidence("", "always madvise [never]", 8 * kGiB, kGiB),
            Residence::kMapped);
  EXPECT_EQ(*ChooseWeightResidence("", "", 8 * kGiB, kGiB), Residence::kMapped);  // no THP
  EXPECT_EQ(*ChooseWeightResidence("", madvise, 0, kGiB), Residence::kMapped);    // unknown
  EXPECT_EQ(*ChooseWeightResidence("", madvise, 8 * kGiB, 0), Residence::kMapped);
  // CACHETTE_WEIGHTS decides whatever the machine.
  EXPECT_EQ(*ChooseWeightResidence("mmap", madvise, 8 * kGiB, kGiB), Residence::kMapped);
  EXPECT_EQ(*ChooseWeightResidence("huge-pages", "", 0, 0), Residence::kHugePages);
  const auto bad = ChooseWeightResidence("hugepages", madvise, 8 * kGiB, kGiB);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("CACHETTE_WEIGHTS=hugepages"), std::string::npos);
  EXPECT_NE(bad.status().message().find("mmap, huge-pages"), std::string::npos);
}

}  // namespace
}  // namespace cachette::cli
