// DepthControl against a simulated link, on a fake clock: a FIFO pipe of
// bandwidth `bw` followed by a fixed delay, the copy loop keeping budget / op
// writes of `op` bytes in flight whenever it can.
#include "mirror/depth_control.h"

#include <gtest/gtest.h>

#include <queue>
#include <vector>

namespace blkmirror {
namespace {

using Clock = DepthControl::Clock;
using std::chrono::duration_cast;
using std::chrono::milliseconds;
using std::chrono::nanoseconds;

constexpr uint64_t MiB = 1 << 20;
constexpr uint64_t GiB = 1ull << 30;

struct Link {
  double bw;                   // bytes per second through the pipe
  Clock::duration delay;       // added to every write after its transfer
  // A client that prepares writes (reads the source, hands the payload to the
  // socket) at this many bytes a second, one after another (0: instantly):
  // the rate is capped and the round trip shows nothing of it.
  double prep_bw = 0;
};

struct Outcome {
  uint64_t budget;             // at the end
  uint64_t peak;
  double rate_last_second;     // bytes per second completed in the last second
  Clock::duration base;
};

// Runs `secs` of simulated copying. limited: the copy loop always has more work
// than the budget lets it launch (a large dirty disk); otherwise it launches at
// most `floor_ops` writes (a source that cannot keep more busy).
Outcome simulate(DepthControl& dc, Link link, uint64_t op, double secs, bool limited = true,
                 unsigned floor_ops = 16, Link after = {}, double switch_at = -1) {
  struct Done {
    Clock::time_point at, issued;
    bool operator>(const Done& o) const { return at > o.at; }
  };
  std::priority_queue<Done, std::vector<Done>, std::greater<>> pending;
  const Clock::time_point t0{};
  Clock::time_point link_free = t0, prep_free = t0, now = t0;
  const Clock::time_point end =
      t0 + duration_cast<Clock::duration>(std::chrono::duration<double>(secs));
  uint64_t last_second = 0;
  auto issue = [&](Clock::time_point at) {
    Link l = switch_at >= 0 && at - t0 >= std::chrono::duration<double>(switch_at) ? after : link;
    if (l.prep_bw > 0) {
      prep_free = std::max(prep_free, at) +
                  duration_cast<Clock::duration>(std::chrono::duration<double>(op / l.prep_bw));
      at = prep_free;
    }
    auto xfer = duration_cast<Clock::duration>(std::chrono::duration<double>(op / l.bw));
    link_free = std::max(link_free, at) + xfer;
    pending.push({link_free + l.delay, at});
  };
  auto fill = [&] {
    uint64_t ops = limited ? dc.budget() / op : std::min<uint64_t>(floor_ops, dc.budget() / op);
    while (pending.size() < ops) issue(now);
    if (limited) dc.note_limited();
  };
  fill();
  while (!pending.empty() && pending.top().at <= end) {
    Done d = pending.top();
    pending.pop();
    now = d.at;
    dc.on_write(d.issued, d.at, op);
    if (end - now <= std::chrono::seconds(1)) last_second += op;
    dc.tick(now);
    fill();
  }
  return {dc.budget(), dc.peak(), static_cast<double>(last_second), dc.base_rtt()};
}

TEST(DepthControl, GrowsToCoverTheRoundTripOfAFarTarget) {
  // 100 ms away, 1 GiB/s: 16 MiB in flight would carry 160 MiB/s.
  DepthControl dc(16 * MiB, GiB, MiB);
  Link link{1.0 * GiB, milliseconds(100)};
  Outcome o = simulate(dc, link, MiB, 4.0);
  EXPECT_GE(o.rate_last_second, 0.8 * GiB) << "budget " << o.budget / MiB << " MiB";
  // About the bandwidth-delay product (~100 MiB), not the whole cap.
  EXPECT_GE(o.budget, 100 * MiB);
  EXPECT_LE(o.budget, 512 * MiB);
  EXPECT_GE(o.base, milliseconds(100));
  EXPECT_LT(o.base, milliseconds(102));
}

TEST(DepthControl, ReachesTheLinkWithinAFewRoundTrips) {
  // The ramp is a doubling per epoch (two round trips): 16 -> 128 MiB in three.
  DepthControl dc(16 * MiB, GiB, MiB);
  Link link{1.0 * GiB, milliseconds(50)};
  Outcome o = simulate(dc, link, MiB, 1.5);
  EXPECT_GE(o.rate_last_second, 0.8 * GiB) << "budget " << o.budget / MiB << " MiB";
}

TEST(DepthControl, KeepsTheDefaultWhenTheDefaultCoversTheRoundTrip) {
  // 5 ms at 500 MiB/s: 2.5 MiB per round trip, well inside 16 MiB. Writes queue
  // behind each other, so more depth would only hold memory.
  DepthControl dc(16 * MiB, GiB, MiB);
  Outcome o = simulate(dc, {500.0 * MiB, milliseconds(5)}, MiB, 3.0);
  EXPECT_EQ(o.budget, 16 * MiB);
  EXPECT_EQ(o.peak, 16 * MiB);
  EXPECT_GE(o.rate_last_second, 0.95 * 500 * MiB);
}

TEST(DepthControl, KeepsTheDefaultForALocalTarget) {
  DepthControl dc(16 * MiB, GiB, MiB);
  Outcome o = simulate(dc, {2.0 * GiB, std::chrono::microseconds(20)}, MiB, 2.0);
  EXPECT_EQ(o.peak, 16 * MiB);
}

TEST(DepthControl, DoesNotGrowWhenTheBudgetIsNotWhatHoldsTheCopyBack) {
  // A source that keeps only 8 writes busy: the budget was never full.
  DepthControl dc(16 * MiB, GiB, MiB);
  Outcome o = simulate(dc, {1.0 * GiB, milliseconds(100)}, MiB, 3.0, /*limited=*/false, 8);
  EXPECT_EQ(o.peak, 16 * MiB);
}

TEST(DepthControl, NeverPassesTheCap) {
  // One second away at 10 GiB/s would want 10 GiB in flight.
  DepthControl dc(16 * MiB, 64 * MiB + 123, MiB);
  Outcome o = simulate(dc, {10.0 * GiB, std::chrono::seconds(1)}, MiB, 8.0);
  EXPECT_EQ(o.peak, 64 * MiB);
  EXPECT_EQ(o.budget, 64 * MiB);
}

TEST(DepthControl, ShrinksBackWhenTheLinkNarrows) {
  // Grows for a 100 ms, 1 GiB/s link; then the link drops to 50 MiB/s, whose
  // round trip needs ~5 MiB: writes queue, the budget falls to the floor.
  DepthControl dc(16 * MiB, GiB, MiB);
  Link fast{1.0 * GiB, milliseconds(100)}, slow{50.0 * MiB, milliseconds(100)};
  Outcome o = simulate(dc, fast, MiB, 12.0, true, 16, slow, 3.0);
  EXPECT_GE(o.peak, 100 * MiB);
  EXPECT_EQ(o.budget, 16 * MiB);
}

TEST(DepthControl, DoesNotKeepDepthThatCarriesNoMore) {
  // 5 ms away over a 4 GiB/s link, but a client that prepares only 800 MiB/s
  // of writes (two CPUs shared with the server): every write comes back in the
  // base round trip, so latency says "grow", and the rate says it did not pay.
  // The budget returns to the default and stays there.
  DepthControl dc(16 * MiB, GiB, MiB);
  Link busy{4.0 * GiB, milliseconds(5), 800.0 * MiB};
  Outcome o = simulate(dc, busy, MiB, 3.0);
  EXPECT_EQ(o.budget, 16 * MiB) << "peak " << o.peak / MiB << " MiB";
  EXPECT_LE(o.peak, 32 * MiB);
  EXPECT_GE(o.rate_last_second, 0.95 * 800 * MiB);
}

TEST(DepthControl, TriesAgainAfterTheCeilingExpires) {
  // 100 ms away, and for the first 2 s a client that prepares only 100 MiB/s
  // (16 MiB per round trip would carry 160): a larger budget does not pay and
  // sets a ceiling. Then the client keeps up: once the ceiling has lapsed the
  // budget grows to the round trip's needs.
  Link busy{1.0 * GiB, milliseconds(100), 100.0 * MiB}, far{1.0 * GiB, milliseconds(100)};
  DepthControl first(16 * MiB, GiB, MiB);
  simulate(first, busy, MiB, 2.0);
  EXPECT_EQ(first.ceiling(), 16 * MiB);
  EXPECT_EQ(first.budget(), 16 * MiB);
  // The same start, then the fast client for 16 s more.
  DepthControl dc(16 * MiB, GiB, MiB);
  Outcome o = simulate(dc, busy, MiB, 18.0, true, 16, far, 2.0);
  EXPECT_GE(o.budget, 64 * MiB);
  EXPECT_GE(o.rate_last_second, 0.8 * GiB);
}

TEST(DepthControl, DecidesNothingWithoutWrites) {
  DepthControl dc(16 * MiB, GiB, MiB);
  dc.note_limited();
  EXPECT_FALSE(dc.tick(Clock::time_point{} + std::chrono::seconds(5)));
  EXPECT_EQ(dc.budget(), 16 * MiB);
  EXPECT_EQ(dc.base_rtt(), Clock::duration::zero());
}

TEST(DepthControl, BudgetIsAWholeNumberOfOperations) {
  DepthControl dc(3 * MiB, GiB, 3 * MiB / 2);
  Outcome o = simulate(dc, {1.0 * GiB, milliseconds(100)}, 3 * MiB / 2, 2.0);
  EXPECT_GT(o.budget, 3 * MiB);
  EXPECT_EQ(o.budget % (3 * MiB / 2), 0u);
}

}  // namespace
}  // namespace blkmirror
