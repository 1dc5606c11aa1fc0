// The engine's correctness proof: a client writes concurrently during the whole
// job (before ready, while ready, across complete and after the switch); the
// target must end holding exactly the model of every acknowledged write. Runs in
// every copy mode, and with a switch background -> write-blocking mid-run.
#include <gtest/gtest.h>

#include "blockdev/wrapper.h"
#include "harness.h"
#include "sanitizer_scale.h"

namespace blkmirror::test {
namespace {

using namespace std::chrono_literals;

struct RandomCase {
  uint64_t seed;
  uint64_t size;
  uint64_t granularity;
  int64_t buf_size;
  unsigned in_flight;
  bool target_zero_init;
  CopyMode mode = CopyMode::kBackground;
  bool switch_mid_run = false;  // background, then block-job-change to write-blocking
  // Every target write waits this long first (a target far away): with no
  // buf-size the job's depth control grows the budget while clients write.
  std::chrono::microseconds target_write_delay{0};
};

// A target whose writes take a while, as over a long link.
struct SlowWrites : BlockDeviceWrapper {
  SlowWrites(BlockDevicePtr inner, std::chrono::microseconds delay)
      : BlockDeviceWrapper(std::move(inner)), delay(delay) {}
  std::chrono::microseconds delay;
  Task<Result<void>> write(uint64_t off, std::span<const std::byte> buf, WriteFlags f) override {
    co_await sleep_for(delay);
    co_return co_await inner()->write(off, buf, f);
  }
};

uint64_t peak_budget = 0;  // the largest budget any case's job reached

void run_random_case(const RandomCase& c) {
  SCOPED_TRACE(::testing::Message()
               << "seed=" << c.seed << " size=" << c.size << " granularity=" << c.granularity
               << " mode=" << to_string(c.mode) << (c.switch_mid_run ? "+switch" : ""));
  std::mt19937_64 rng(c.seed);
  Loop loop(2);
  Graph graph;
  // Random extra yields shuffle the order in which concurrent I/O takes effect.
  auto src = std::make_shared<MemoryDevice>(c.size, memory_opts(true, 6, c.seed));
  auto dst = std::make_shared<MemoryDevice>(c.size, memory_opts(c.target_zero_init, 6, c.seed + 1));
  auto model = fill_random(*src, rng);
  if (!c.target_zero_init) {  // a target holding old data must be overwritten
    std::mt19937_64 junk(c.seed + 99);
    fill_random(*dst, junk);
  }
  Node* src_node = *graph.add("src", src);
  BlockDevicePtr target = dst;
  if (c.target_write_delay.count())
    target = std::make_shared<SlowWrites>(dst, c.target_write_delay);
  ASSERT_TRUE(graph.add("dst", target));

  MirrorParams p;
  p.job_id = "j";
  p.device = "src";
  p.target = "dst";
  p.granularity = c.granularity;
  p.buf_size = c.buf_size;
  p.max_in_flight = c.in_flight;
  p.copy_mode = c.mode;
  p.adaptive_window_ms = 1 + rng() % 30;
  auto job = MirrorJob::create(loop, graph, p);
  ASSERT_TRUE(job) << job.error().message();
  Recorder rec;
  rec.attach(**job);

  Client client;
  client.edge = graph.attach(src_node, "client");
  client.model = &model;
  client.rng.seed(c.seed * 31 + 7);

  bool ok = loop.run([&]() -> Task<bool> {
    asio::co_spawn(loop.executor(), client.run(), asio::detached);
    co_await sleep_for(std::chrono::microseconds(rng() % 2000));
    (*job)->start(loop.executor());
    if (c.switch_mid_run) {
      co_await sleep_for(std::chrono::microseconds(rng() % 3000));
      if (!(*job)->change_copy_mode(CopyMode::kWriteBlocking)) co_return false;
    }
    // Write-blocking converges against any writer: the client never holds off.
    // Writes race the copy; if a background job cannot converge within a while
    // (slow sanitizer builds, tiny granularity) the client holds off until it does.
    bool can_hold = c.mode == CopyMode::kBackground && !c.switch_mid_run;
    co_return co_await drive_to_switch(**job, client, rng, can_hold);
  }());
  ASSERT_TRUE(ok);
  if (const DepthControl* d = (*job)->depth()) peak_budget = std::max(peak_budget, d->peak());
  ASSERT_FALSE((*job)->failure()) << (*job)->failure()->message();
  EXPECT_TRUE((*job)->switched());
  EXPECT_EQ(&client.edge->node(), graph.find("dst"));
  EXPECT_EQ(client.failed, 0u);
  EXPECT_EQ(rec.count(JobEvent::Kind::kReady), 1);
  EXPECT_EQ(rec.count(JobEvent::Kind::kCompleted), 1);
  auto got = contents(*dst);
  int64_t diff = first_difference(got, model);
  EXPECT_EQ(diff, -1) << "target differs from the model at byte " << diff;
  // Progress: offset only grew and ended equal to len.
  auto info = (*job)->info();
  EXPECT_EQ(info.offset, info.len);
  if (c.mode == CopyMode::kWriteBlocking || c.switch_mid_run) {
    EXPECT_EQ((*job)->copy_mode(), CopyMode::kWriteBlocking);
  }
}

RandomCase random_case(uint64_t seed) {
  std::mt19937_64 r(seed);
  RandomCase c;
  c.seed = seed;
  c.granularity = uint64_t{512} << (r() % 8);                     // 512 B .. 64 KiB
  c.size = (1 + r() % 24) * 65536 + (r() % 2 ? r() % 65536 : 0);  // some unaligned
  c.buf_size = (r() % 3 == 0) ? 4096 : 0;
  c.in_flight = 1 + r() % 16;
  c.target_zero_init = r() % 2;
  return c;
}

TEST(MirrorRandom, ConcurrentWritesManySeeds) {
  for (uint64_t seed = 1; seed <= seeds(40); ++seed) {
    run_random_case(random_case(seed));
    if (HasFatalFailure() || HasFailure()) break;
  }
}

TEST(MirrorRandom, WriteBlockingManySeeds) {
  for (uint64_t seed = 201; seed <= 200 + seeds(40); ++seed) {
    RandomCase c = random_case(seed);
    c.mode = CopyMode::kWriteBlocking;
    run_random_case(c);
    if (HasFatalFailure() || HasFailure()) break;
  }
}

TEST(MirrorRandom, AdaptiveManySeeds) {
  for (uint64_t seed = 301; seed <= 300 + seeds(30); ++seed) {
    RandomCase c = random_case(seed);
    c.mode = CopyMode::kAdaptive;
    run_random_case(c);
    if (HasFatalFailure() || HasFailure()) break;
  }
}

TEST(MirrorRandom, SwitchMidRunManySeeds) {
  for (uint64_t seed = 401; seed <= 400 + seeds(30); ++seed) {
    RandomCase c = random_case(seed);
    c.switch_mid_run = true;
    run_random_case(c);
    if (HasFatalFailure() || HasFailure()) break;
  }
}

TEST(MirrorRandom, WriteBlockingLargerDisk) {
  for (uint64_t seed = 500; seed < 502; ++seed) {
    RandomCase c{seed, 16 << 20, 0, 0, 16, seed % 2 == 0};
    c.mode = CopyMode::kWriteBlocking;
    run_random_case(c);
  }
}

TEST(MirrorRandom, DelayedTargetGrowsItsDepthWhileClientsWrite) {
  // 96 MiB at 1 MiB operations: more than the 16 MiB default keeps in flight,
  // and 2 ms per write makes the round trip, not the memory, the limit; the
  // first pass spans several of the control's epochs (it grows from the second,
  // and keeps a larger budget only where it paid). 64 KiB chunks: fewer client
  // re-copies, each of which waits the delay too.
  peak_budget = 0;
  for (uint64_t seed = 600; seed < 600 + seeds(4); ++seed) {
    RandomCase c{seed, 96 << 20, 64 << 10, 0, 16, seed % 2 == 0};
    c.mode = seed % 3 == 0 ? CopyMode::kWriteBlocking : CopyMode::kBackground;
    c.target_write_delay = std::chrono::milliseconds(2);
    run_random_case(c);
    if (HasFatalFailure() || HasFailure()) break;
  }
  // Growth is a timing property: at -O0 under the sanitizers the copy loop
  // itself, not the budget, holds the copy back (one seed there), and the
  // control rightly keeps the default (DepthControl.DoesNotGrowWhen...). The
  // model check above still runs there; the release run asserts the growth.
  if (!kSanitized)
    EXPECT_GT(peak_budget, uint64_t{16} << 20) << "the budget never grew: the test proves nothing";
}

TEST(MirrorRandom, LargerDiskDefaultParams) {
  for (uint64_t seed = 100; seed < 104; ++seed)
    run_random_case(RandomCase{seed, 16 << 20, 0, 0, 16, seed % 2 == 0});
}

}  // namespace
}  // namespace blkmirror::test
