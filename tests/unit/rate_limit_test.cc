#include "base/rate_limit.h"

#include <gtest/gtest.h>

namespace blkmirror {
namespace {

using Clock = RateLimiter::Clock;
using std::chrono::milliseconds;

TEST(RateLimiter, UnlimitedNeverWaits) {
  RateLimiter r;
  auto t = Clock::now();
  r.charge(uint64_t{1} << 40, t);
  EXPECT_EQ(r.delay(t), Clock::duration::zero());
}

TEST(RateLimiter, OneSliceOfQuotaThenWait) {
  RateLimiter r;
  auto t0 = Clock::now();
  r.set_speed(10 << 20, t0);  // 1 MiB per 100 ms slice
  EXPECT_EQ(r.delay(t0), Clock::duration::zero());
  r.charge(1 << 20, t0);
  auto d = r.delay(t0);
  EXPECT_GT(d, milliseconds(90));
  EXPECT_LE(d, milliseconds(100));
  // After the slice ends the budget is back.
  EXPECT_EQ(r.delay(t0 + milliseconds(101)), Clock::duration::zero());
}

TEST(RateLimiter, DebtIsPaidInLaterSlices) {
  RateLimiter r;
  auto t0 = Clock::now();
  r.set_speed(10 << 20, t0);
  r.charge(5 << 20, t0);  // five slices' worth in one go
  auto d = r.delay(t0);
  EXPECT_GE(d, milliseconds(490));
  EXPECT_LE(d, milliseconds(500));
  EXPECT_GT(r.delay(t0 + milliseconds(300)), Clock::duration::zero());
  EXPECT_EQ(r.delay(t0 + milliseconds(501)), Clock::duration::zero());
}

TEST(RateLimiter, LongRunAverageMatchesSpeed) {
  // Simulated clock: dispatch 64 KiB whenever allowed for 10 s at 5 MiB/s.
  RateLimiter r;
  auto t = Clock::now();
  r.set_speed(5 << 20, t);
  auto end = t + std::chrono::seconds(10);
  uint64_t sent = 0;
  while (t < end) {
    auto d = r.delay(t);
    if (d > Clock::duration::zero()) {
      t += d;
      continue;
    }
    r.charge(64 << 10, t);
    sent += 64 << 10;
  }
  double rate = static_cast<double>(sent) / 10.0;
  EXPECT_NEAR(rate, 5 << 20, (5 << 20) * 0.05);
}

TEST(RateLimiter, RaisingSpeedTakesEffectAtOnce) {
  RateLimiter r;
  auto t0 = Clock::now();
  r.set_speed(1 << 20, t0);  // 100 KiB per slice
  r.charge(10 << 20, t0);    // a long debt at the old speed
  EXPECT_GT(r.delay(t0), std::chrono::seconds(5));
  r.set_speed(100 << 20, t0);
  EXPECT_LE(r.delay(t0), milliseconds(100));
  r.set_speed(0, t0);
  EXPECT_EQ(r.delay(t0), Clock::duration::zero());
}

}  // namespace
}  // namespace blkmirror
