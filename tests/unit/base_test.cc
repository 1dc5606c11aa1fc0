#include <gtest/gtest.h>

#include "base/align.h"
#include "base/assert.h"
#include "base/gate.h"
#include "base/size_parse.h"
#include "io/loop.h"

namespace blkmirror {
namespace {

TEST(SizeParse, Suffixes) {
  EXPECT_EQ(*parse_size("4096"), 4096u);
  EXPECT_EQ(*parse_size("64K"), 64u << 10);
  EXPECT_EQ(*parse_size("16m"), 16u << 20);
  EXPECT_EQ(*parse_size("1G"), uint64_t{1} << 30);
  EXPECT_EQ(*parse_size("2GiB"), uint64_t{2} << 30);
  EXPECT_EQ(*parse_size("1T"), uint64_t{1} << 40);
}

TEST(SizeParse, Rejects) {
  for (const char* bad : {"", "-1", "abc", "12Q", "1.5G", "K"})
    EXPECT_FALSE(parse_size(bad)) << bad;
  EXPECT_FALSE(parse_size("99999999999P"));
}

TEST(Align, Helpers) {
  EXPECT_TRUE(is_pow2(512));
  EXPECT_FALSE(is_pow2(0));
  EXPECT_FALSE(is_pow2(3000));
  EXPECT_EQ(align_up(1025, 512), 1536u);
  EXPECT_EQ(align_down(1025, 512), 1024u);
  EXPECT_TRUE(range_within(10, 0, 10));
  EXPECT_FALSE(range_within(5, 6, 10));
  EXPECT_FALSE(range_within(UINT64_MAX, 2, UINT64_MAX));
}

TEST(AssertDeathTest, AbortsNamingTheCondition) {
  int counter = 0;
  BLKMIRROR_ASSERT(counter == 0);  // holds: nothing happens
  EXPECT_DEATH(BLKMIRROR_ASSERT(counter > 0, "counter below one"),
               "assertion failed: counter > 0: counter below one");
}

TEST(AssertDeathTest, OnLoopOnlyInsideLoopRun) {
  EXPECT_FALSE(on_loop_thread());
  EXPECT_DEATH(BLKMIRROR_ASSERT_ON_LOOP(), "off the loop thread");
  Loop loop(1);
  bool inside = loop.run([]() -> Task<bool> { co_return on_loop_thread(); }());
  EXPECT_TRUE(inside);
  EXPECT_FALSE(on_loop_thread());
  // The worker pool's threads are not loop threads.
  bool on_worker = loop.run([](Loop* l) -> Task<bool> {
    co_return co_await l->blocking([] { return on_loop_thread(); });
  }(&loop));
  EXPECT_FALSE(on_worker);
}

TEST(GateDeathTest, ClosedTwiceAborts) {
  EXPECT_DEATH(
      {
        Loop loop(1);
        Gate gate;
        loop.run([](Gate* g) -> Task<void> {
          co_await g->close();
          co_await g->close();
        }(&gate));
      },
      "gate closed twice");
}

TEST(Gate, CloseWaitsForHoldersAndRefusesNewOnes) {
  Loop loop(1);
  Gate gate;
  bool closed = false;
  loop.run([](Loop* l, Gate* g, bool* closed) -> Task<void> {
    auto h = g->try_enter();
    EXPECT_TRUE(h);
    EXPECT_EQ(g->count(), 1u);
    asio::co_spawn(l->executor(), [](Gate* g, bool* closed) -> Task<void> {
      co_await g->close();
      *closed = true;
    }(g, closed), asio::detached);
    co_await yield_now();
    EXPECT_TRUE(g->closed());
    EXPECT_FALSE(*closed);  // waits for h
    EXPECT_FALSE(g->try_enter());
    h.release();
    h.release();  // a second release of one holder is a no-op
    EXPECT_EQ(g->count(), 0u);
    while (!*closed) co_await yield_now();
  }(&loop, &gate, &closed));
  EXPECT_TRUE(closed);
}

}  // namespace
}  // namespace blkmirror
