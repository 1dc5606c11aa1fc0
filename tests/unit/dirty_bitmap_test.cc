#include "bitmap/dirty_bitmap.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <random>
#include <vector>

#include "sanitizer_scale.h"

namespace blkmirror {
namespace {

constexpr uint64_t kMax = std::numeric_limits<uint64_t>::max();

// Obviously-correct reference: one byte per bit, linear scans everywhere.
class NaiveBitmap {
 public:
  explicit NaiveBitmap(uint64_t n) : bits_(n, 0) {}

  uint64_t size() const { return bits_.size(); }
  bool test(uint64_t i) const { return bits_[i] != 0; }
  void assign(uint64_t start, uint64_t n, bool v) {
    if (start >= size()) return;
    const uint64_t end = start + std::min(n, size() - start);
    std::memset(bits_.data() + start, v ? 1 : 0, end - start);
  }
  uint64_t count_range(uint64_t start, uint64_t n) const {
    if (start >= size()) return 0;
    const uint64_t end = start + std::min(n, size() - start);
    return std::count(bits_.begin() + start, bits_.begin() + end, 1);
  }
  // memchr, not a loop: the sanitized build runs at -O0, where a loop over a
  // quarter-million bits per query made this test take minutes.
  std::optional<uint64_t> next(uint64_t from, bool v) const {
    if (from >= size()) return std::nullopt;
    const void* at = std::memchr(bits_.data() + from, v ? 1 : 0, size() - from);
    if (at == nullptr) return std::nullopt;
    return static_cast<uint64_t>(static_cast<const uint8_t*>(at) - bits_.data());
  }

 private:
  std::vector<uint8_t> bits_;  // one byte a bit: the model is plain, not clever
};

void ExpectSameEverywhere(const DirtyBitmap& bm, const NaiveBitmap& model) {
  ASSERT_EQ(bm.size(), model.size());
  ASSERT_EQ(bm.count(), model.count_range(0, kMax));
  for (uint64_t i = 0; i < model.size(); ++i) ASSERT_EQ(bm.test(i), model.test(i)) << "bit " << i;
  // Walk every set and every clear bit; this exercises the summary levels end
  // to end (a stale summary bit would make next_set land on a wrong position).
  std::optional<uint64_t> a = bm.next_set(0), b = model.next(0, true);
  while (true) {
    ASSERT_EQ(a, b);
    if (!a) break;
    a = bm.next_set(*a + 1);
    b = model.next(*b + 1, true);
  }
  a = bm.next_clear(0);
  b = model.next(0, false);
  while (true) {
    ASSERT_EQ(a, b);
    if (!a) break;
    a = bm.next_clear(*a + 1);
    b = model.next(*b + 1, false);
  }
}

// Picks (start, n) pairs biased towards the interesting cases: word
// boundaries, tiny and huge ranges, and ranges that run past the end.
struct RangeGen {
  std::mt19937_64& rng;
  uint64_t size;

  uint64_t pick(uint64_t lo, uint64_t hi) {
    return std::uniform_int_distribution<uint64_t>(lo, hi)(rng);
  }
  uint64_t start() {
    switch (pick(0, 4)) {
      case 0:
        return pick(0, size + 2) / 64 * 64;  // word aligned
      case 1:
        return size == 0 ? 0 : size - pick(0, std::min<uint64_t>(size, 3));  // near end
      case 2:
        return size + pick(0, 100);  // past end
      default:
        return pick(0, size + 1);
    }
  }
  uint64_t length() {
    switch (pick(0, 6)) {
      case 0:
        return 0;
      case 1:
        return kMax;  // must clip without overflow
      case 2:
        return pick(1, 3) * 64;  // whole words
      case 3:
        return pick(0, size + 200);  // anything up to past the end
      case 4:
        return pick(1, 4096);
      default:
        return pick(1, 130);
    }
  }
};

void RunRandomSeed(uint64_t seed, uint64_t size) {
  SCOPED_TRACE(testing::Message() << "seed=" << seed << " size=" << size);
  std::mt19937_64 rng(seed);
  RangeGen gen{rng, size};
  DirtyBitmap bm(size);
  NaiveBitmap model(size);

  const int ops = 120;
  for (int op = 0; op < ops; ++op) {
    // Mostly sets and resets so the bitmap stays a mix of dirty and clean.
    const uint64_t kind = gen.pick(0, 40);
    if (kind == 0) {
      bm.set_all();
      model.assign(0, kMax, true);
    } else if (kind == 1) {
      bm.reset_all();
      model.assign(0, kMax, false);
    } else {
      const uint64_t s = gen.start(), n = gen.length();
      const bool v = kind % 2 == 0;
      if (v) {
        bm.set(s, n);
      } else {
        bm.reset(s, n);
      }
      model.assign(s, n, v);
    }

    ASSERT_EQ(bm.count(), model.count_range(0, kMax)) << "op " << op;
    for (int q = 0; q < 4; ++q) {
      const uint64_t from = gen.start();
      ASSERT_EQ(bm.next_set(from), model.next(from, true)) << "next_set from " << from;
      ASSERT_EQ(bm.next_clear(from), model.next(from, false)) << "next_clear from " << from;
      const uint64_t n = gen.length();
      ASSERT_EQ(bm.count_range(from, n), model.count_range(from, n))
          << "count_range " << from << "+" << n;
      if (size > 0) {
        const uint64_t bit = gen.pick(0, size - 1);
        ASSERT_EQ(bm.test(bit), model.test(bit)) << "bit " << bit;
      }
    }
    if (op % 40 == 39) {
      ExpectSameEverywhere(bm, model);
      if (testing::Test::HasFatalFailure()) return;
    }
  }
  ExpectSameEverywhere(bm, model);
}

TEST(DirtyBitmap, RandomVsModel) {
  // Fixed sizes cover empty, sub-word, word boundaries, the level-1/level-2
  // boundary (4096 = 64 * 64 bits) and a three-summary-level bitmap (> 64^3).
  const std::vector<uint64_t> sizes = {0,    1,    2,    63,     64,     65,     127,   128,
                                       4095, 4096, 4097, 100000, 262143, 262144, 262145};
  const uint64_t kSeeds = blkmirror::test::seeds(200);  // the fixed sizes come first
  for (uint64_t seed = 0; seed < kSeeds; ++seed) {
    uint64_t size;
    if (seed < sizes.size() * (blkmirror::test::kSanitized ? 1 : 2)) {
      size = sizes[seed % sizes.size()];
    } else {
      std::mt19937_64 size_rng(seed * 7919);
      size = std::uniform_int_distribution<uint64_t>(0, 20000)(size_rng);
    }
    RunRandomSeed(seed, size);
    if (HasFatalFailure()) return;
  }
}

TEST(DirtyBitmap, EmptyBitmap) {
  DirtyBitmap bm(0);
  EXPECT_EQ(bm.size(), 0u);
  EXPECT_EQ(bm.count(), 0u);
  bm.set(0, 10);
  bm.set_all();
  EXPECT_EQ(bm.count(), 0u);
  bm.reset(0, kMax);
  bm.reset_all();
  EXPECT_EQ(bm.next_set(0), std::nullopt);
  EXPECT_EQ(bm.next_clear(0), std::nullopt);
  EXPECT_EQ(bm.count_range(0, kMax), 0u);
  EXPECT_GT(bm.memory_bytes(), 0u);
}

TEST(DirtyBitmap, SingleBit) {
  DirtyBitmap bm(1);
  EXPECT_EQ(bm.next_clear(0), 0u);
  bm.set(0, 1);
  EXPECT_TRUE(bm.test(0));
  EXPECT_EQ(bm.count(), 1u);
  EXPECT_EQ(bm.next_set(0), 0u);
  EXPECT_EQ(bm.next_set(1), std::nullopt);
  EXPECT_EQ(bm.next_clear(0), std::nullopt);
  bm.reset(0, 1);
  EXPECT_FALSE(bm.test(0));
  EXPECT_EQ(bm.next_set(0), std::nullopt);
}

TEST(DirtyBitmap, ZeroLengthIsNoOp) {
  DirtyBitmap bm(100);
  bm.set(10, 0);
  EXPECT_EQ(bm.count(), 0u);
  bm.set_all();
  bm.reset(10, 0);
  EXPECT_EQ(bm.count(), 100u);
  EXPECT_EQ(bm.count_range(10, 0), 0u);
}

TEST(DirtyBitmap, WordBoundaries) {
  DirtyBitmap bm(256);
  bm.set(63, 2);  // straddles words 0 and 1
  EXPECT_EQ(bm.count(), 2u);
  EXPECT_FALSE(bm.test(62));
  EXPECT_TRUE(bm.test(63));
  EXPECT_TRUE(bm.test(64));
  EXPECT_FALSE(bm.test(65));
  EXPECT_EQ(bm.next_set(0), 63u);
  EXPECT_EQ(bm.next_set(64), 64u);
  EXPECT_EQ(bm.next_set(65), std::nullopt);
  EXPECT_EQ(bm.next_clear(63), 65u);

  bm.set(128, 64);  // exactly one whole word
  EXPECT_EQ(bm.count(), 66u);
  EXPECT_EQ(bm.count_range(128, 64), 64u);
  EXPECT_EQ(bm.count_range(127, 66), 64u);
  EXPECT_EQ(bm.next_set(65), 128u);
  EXPECT_EQ(bm.next_clear(128), 192u);

  bm.reset(64, 128);  // clears word 1 tail bit and all of word 2
  EXPECT_EQ(bm.count(), 1u);
  EXPECT_EQ(bm.next_set(0), 63u);
  EXPECT_EQ(bm.next_set(64), std::nullopt);
}

TEST(DirtyBitmap, LastBitAndClipping) {
  for (uint64_t size : {63u, 64u, 65u, 4097u}) {
    SCOPED_TRACE(size);
    DirtyBitmap bm(size);
    bm.set(size - 1, kMax);  // clips to the single last bit
    EXPECT_EQ(bm.count(), 1u);
    EXPECT_TRUE(bm.test(size - 1));
    EXPECT_EQ(bm.next_set(0), size - 1);
    EXPECT_EQ(bm.next_set(size - 1), size - 1);
    EXPECT_EQ(bm.next_set(size), std::nullopt);
    EXPECT_EQ(bm.next_set(kMax), std::nullopt);
    bm.set(size, 10);  // entirely past the end
    bm.set(kMax, kMax);
    EXPECT_EQ(bm.count(), 1u);

    bm.set_all();
    EXPECT_EQ(bm.count(), size);  // padding bits in the last word stay clear
    EXPECT_EQ(bm.next_clear(0), std::nullopt);
    bm.reset(size - 1, 1);
    EXPECT_EQ(bm.next_clear(0), size - 1);
    EXPECT_EQ(bm.count_range(0, kMax), size - 1);
    EXPECT_EQ(bm.count_range(size - 2, kMax), 1u);
  }
}

TEST(DirtyBitmap, SetIsIdempotentAndCountsOnce) {
  DirtyBitmap bm(1000);
  bm.set(10, 100);
  bm.set(50, 100);
  EXPECT_EQ(bm.count(), 140u);
  bm.reset(0, 20);
  bm.reset(0, 20);
  EXPECT_EQ(bm.count(), 130u);
}

TEST(DirtyBitmap, HugeSparseIteration) {
  // 16 TiB at 64 KiB granularity: four summary levels above level 0.
  const uint64_t kBits = uint64_t{1} << 28;
  DirtyBitmap bm(kBits);
  const std::vector<uint64_t> dirty = {0, 4095, 4096, 262144, 12345678, kBits - 1};
  for (uint64_t b : dirty) bm.set(b, 1);
  EXPECT_EQ(bm.count(), dirty.size());

  std::vector<uint64_t> seen;
  for (auto b = bm.next_set(0); b; b = bm.next_set(*b + 1)) seen.push_back(*b);
  EXPECT_EQ(seen, dirty);

  // Clearing must propagate all the way up, or next_set would find a stale
  // summary bit.
  bm.reset(kBits - 1, 1);
  EXPECT_EQ(bm.next_set(12345679), std::nullopt);
  bm.reset(0, kBits);
  EXPECT_EQ(bm.count(), 0u);
  EXPECT_EQ(bm.next_set(0), std::nullopt);

  bm.set_all();
  EXPECT_EQ(bm.count(), kBits);
  EXPECT_EQ(bm.count_range(1, kBits - 2), kBits - 2);
  bm.reset(1000, kBits - 2000);
  EXPECT_EQ(bm.count(), 2000u);
  EXPECT_EQ(bm.next_set(1000), kBits - 1000);
  EXPECT_EQ(bm.next_clear(0), 1000u);
}

TEST(DirtyBitmap, MemoryOverheadUnderTwoPercent) {
  const uint64_t kBits = uint64_t{1} << 28;
  DirtyBitmap bm(kBits);
  const double level0_bytes = static_cast<double>(kBits) / 8;
  EXPECT_GE(bm.memory_bytes(), kBits / 8);
  EXPECT_LT(static_cast<double>(bm.memory_bytes()), 1.02 * level0_bytes);

  for (uint64_t bits : {uint64_t{100000}, uint64_t{1} << 20, (uint64_t{1} << 24) + 1}) {
    DirtyBitmap b(bits);
    EXPECT_LT(static_cast<double>(b.memory_bytes()), 1.02 * static_cast<double>(bits) / 8 + 512)
        << bits;
  }
}

}  // namespace
}  // namespace blkmirror
