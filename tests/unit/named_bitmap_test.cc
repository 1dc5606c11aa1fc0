#include "bitmap/named_bitmap.h"

#include <gtest/gtest.h>

#include <random>
#include <vector>

namespace blkmirror {
namespace {

using Range = std::pair<uint64_t, uint64_t>;

std::vector<Range> ranges(const NamedBitmap& b) {
  std::vector<Range> out;
  for (auto r = b.next_dirty(0); r; r = b.next_dirty(r->first + r->second)) out.push_back(*r);
  return out;
}

TEST(NamedBitmap, MarksWholeGranulesClippedToTheEnd) {
  NamedBitmap b("b", 4096, 10000);  // last granule is partial
  b.mark(4095, 2);
  b.mark(9000, 5000);
  EXPECT_EQ(ranges(b), (std::vector<Range>{{0, 10000}}));  // granules 0, 1, 2 (the partial one)
  EXPECT_EQ(b.count(), 3 * 4096u);  // QEMU counts whole granules
  b.mark(20000, 10);                // past the end: nothing
  EXPECT_EQ(b.count(), 3 * 4096u);
}

TEST(NamedBitmap, DisabledDoesNotRecord) {
  NamedBitmap b("b", 512, 1 << 20);
  b.enabled = false;
  b.record(0, 512);
  EXPECT_EQ(b.count(), 0u);
  b.enabled = true;
  b.record(0, 512);
  EXPECT_EQ(b.count(), 512u);
}

TEST(NamedBitmap, NextDirtyStartsAtTheAskedOffset) {
  NamedBitmap b("b", 65536, 1 << 20);
  b.mark(0, 1);
  auto r = b.next_dirty(1000);
  ASSERT_TRUE(r);
  EXPECT_EQ(*r, (Range{1000, 65536 - 1000}));
}

// Differential: merging a bitmap of any granularity marks exactly the granules
// of the destination that a byte model of the source touches.
TEST(NamedBitmap, MergeAcrossGranularitiesMatchesByteModel) {
  std::mt19937_64 rnd(7);
  const uint64_t len = 1 << 20;
  for (int round = 0; round < 50; ++round) {
    const uint64_t gs = 512u << (rnd() % 8), gd = 512u << (rnd() % 8);
    NamedBitmap src("s", gs, len), dst("d", gd, len);
    std::vector<bool> model(len / 512);
    for (int i = 0; i < 5; ++i) {
      uint64_t off = rnd() % len, n = 1 + rnd() % 100000;
      src.mark(off, n);
    }
    for (auto [o, n] : ranges(src))
      for (uint64_t s = o / 512; s < (o + n + 511) / 512; ++s) model[s] = true;
    dst.merge_from(src);
    for (uint64_t g = 0; g < len / gd; ++g) {
      bool want = false;
      for (uint64_t s = g * gd / 512; s < (g + 1) * gd / 512; ++s) want = want || model[s];
      ASSERT_EQ(dst.bits().test(g), want) << "round " << round << " granule " << g;
    }
  }
}

TEST(NamedBitmap, ResizeKeepsBitsBelowTheNewEnd) {
  NamedBitmap b("b", 4096, 64 * 4096);
  b.mark(0, 4096);
  b.mark(60 * 4096, 4 * 4096);
  b.resize(62 * 4096);
  EXPECT_EQ(ranges(b), (std::vector<Range>{{0, 4096}, {60 * 4096, 2 * 4096}}));
  b.resize(100 * 4096);
  EXPECT_EQ(b.count(), 3 * 4096u);
  EXPECT_EQ(b.length(), 100 * 4096u);
}

TEST(BitmapSet, NewestFirstAndRecordsEnabledOnly) {
  BitmapSet set;
  set.add("a", 512, 4096);
  set.add("b", 512, 4096).enabled = false;
  std::vector<std::string> names;
  for (auto& b : set) names.push_back(b.name());
  EXPECT_EQ(names, (std::vector<std::string>{"b", "a"}));
  set.record(0, 512);
  EXPECT_EQ(set.find("a")->count(), 512u);
  EXPECT_EQ(set.find("b")->count(), 0u);
  set.remove("a");
  EXPECT_EQ(set.find("a"), nullptr);
}

}  // namespace
}  // namespace blkmirror
