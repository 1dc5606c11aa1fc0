// Active mirroring (copy-mode write-blocking) and adaptive mode: client writes
// reach the target before their reply, race background copies of the same
// chunks without lost updates or torn chunks, intersect without deadlock, arrive
// while the job is created, survive a mode switch mid-run, and follow the error
// policy when the synchronous target write fails.
#include <gtest/gtest.h>

#include "harness.h"
#include "sanitizer_scale.h"

namespace blkmirror::test {
namespace {

using namespace std::chrono_literals;

// The harness's MirrorFixture with a client edge on the source.
struct ActiveFixture : MirrorFixture {
  // fill: random data in about half of the source; jitter shuffles I/O order.
  ActiveFixture(uint64_t size, uint64_t seed, bool fill, unsigned jitter = 0)
      : MirrorFixture(
            {.size = size, .seed = seed, .fill = fill, .jitter = jitter, .client = true}) {}

  MirrorParams params(CopyMode mode, uint64_t granularity = 65536) const {
    MirrorParams p = MirrorFixture::params();
    p.copy_mode = mode;
    p.granularity = granularity;
    return p;
  }
};

TEST(MirrorActive, ClientWriteReachesTargetBeforeReply) {
  // Source and target start equal (all holes): ready at once. Then pause the
  // job: the copy loop stops, so only the write path can change the target.
  ActiveFixture f(4 << 20, 1, false);
  f.make(f.params(CopyMode::kWriteBlocking));
  ASSERT_TRUE(f.loop.run([&]() -> Task<bool> {
    f.job->start(f.loop.executor());
    if (!co_await f.ready()) co_return false;
    EXPECT_TRUE(f.job->pause());
    if (!co_await wait_until([&] { return f.job->status() == JobStatus::kStandby; }))
      co_return false;
    // Aligned, whole chunks.
    EXPECT_TRUE(co_await f.write(65536, 2 * 65536, 0x11));
    EXPECT_TRUE(f.target_has(65536, 2 * 65536, 0x11));
    // The regression the issue names: one byte at 1 MiB + 42, chunk clean.
    EXPECT_TRUE(co_await f.write((1 << 20) + 42, 1, 0x22));
    EXPECT_TRUE(f.target_has((1 << 20) + 42, 1, 0x22));
    // Write-zeroes are mirrored as write-zeroes.
    EXPECT_TRUE(co_await f.client->write_zeroes(65536, 4096, ZeroFlags{.may_unmap = true}));
    std::memset(f.model.data() + 65536, 0, 4096);
    EXPECT_TRUE(f.target_has(65536, 4096, 0));
    EXPECT_EQ(f.job->dirty_bytes(), 0u);
    EXPECT_TRUE(f.job->actively_synced());
    EXPECT_EQ(first_difference(contents(*f.dst), f.model), -1);
    EXPECT_TRUE(f.job->resume());
    co_return co_await f.complete();
  }()));
  EXPECT_FALSE(f.job->failure());
  EXPECT_EQ(first_difference(contents(*f.dst), f.model), -1);
}

TEST(MirrorActive, BackgroundModeDoesNotWriteTargetWhilePaused) {
  // The control for the test above: the same writes in background mode leave
  // the paused job's target alone and the chunks dirty.
  ActiveFixture f(4 << 20, 2, false);
  f.make(f.params(CopyMode::kBackground));
  ASSERT_TRUE(f.loop.run([&]() -> Task<bool> {
    f.job->start(f.loop.executor());
    if (!co_await f.ready()) co_return false;
    EXPECT_TRUE(f.job->pause());
    if (!co_await wait_until([&] { return f.job->status() == JobStatus::kStandby; }))
      co_return false;
    EXPECT_TRUE(co_await f.write((1 << 20) + 42, 1, 0x22));
    EXPECT_TRUE(f.target_has((1 << 20) + 42, 1, 0));
    EXPECT_EQ(f.job->dirty_bytes(), 65536u);
    EXPECT_FALSE(f.job->info().actively_synced);
    EXPECT_TRUE(f.job->resume());
    co_return co_await f.complete();
  }()));
  EXPECT_EQ(first_difference(contents(*f.dst), f.model), -1);
}

TEST(MirrorActive, UnalignedPieceOfDirtyChunkLeftToBackgroundCopy) {
  // Dirty chunks first (written in background mode while paused), then switch:
  // a partial write into a dirty chunk must not reach the target (the rest of
  // the chunk still differs) and the chunk stays dirty; a partial write into a
  // clean chunk goes through.
  ActiveFixture f(4 << 20, 3, false);
  f.make(f.params(CopyMode::kBackground));
  ASSERT_TRUE(f.loop.run([&]() -> Task<bool> {
    f.job->start(f.loop.executor());
    if (!co_await f.ready()) co_return false;
    EXPECT_TRUE(f.job->pause());
    if (!co_await wait_until([&] { return f.job->status() == JobStatus::kStandby; }))
      co_return false;
    EXPECT_TRUE(co_await f.write(1 << 20, 100, 0x33));  // chunk 16 dirty
    EXPECT_TRUE(f.job->change_copy_mode(CopyMode::kWriteBlocking));
    EXPECT_EQ(f.job->copy_mode(), CopyMode::kWriteBlocking);
    // Head in dirty chunk 16, whole chunk 17, tail in clean chunk 18.
    uint64_t off = (1 << 20) + 1000, len = 2 * 65536;
    EXPECT_TRUE(co_await f.write(off, len, 0x44));
    uint64_t c17 = 17 * 65536, c18 = 18 * 65536;
    EXPECT_TRUE(f.target_has(off, c17 - off, 0));           // dirty head skipped
    EXPECT_TRUE(f.target_has(c17, 65536, 0x44));            // whole chunk written
    EXPECT_TRUE(f.target_has(c18, off + len - c18, 0x44));  // clean tail written
    EXPECT_EQ(f.job->dirty_bytes(), 65536u);                // only chunk 16
    EXPECT_FALSE(f.job->actively_synced());
    EXPECT_TRUE(f.job->resume());
    if (!co_await wait_until([&] { return f.job->actively_synced(); })) co_return false;
    EXPECT_EQ(first_difference(contents(*f.dst), f.model), -1);
    co_return co_await f.complete();
  }()));
  EXPECT_FALSE(f.job->failure());
  EXPECT_EQ(first_difference(contents(*f.dst), f.model), -1);
}

// Several writers hammer a few chunks while the background copy of those same
// chunks runs (a full source, small ops, jittery devices). Once the writers
// stop and the job is actively synced, source and target must be identical at
// that instant, with no further copying: a lost update or a torn chunk would
// show as a difference.
TEST(MirrorActive, OverlappingWritesRaceBackgroundCopies) {
  for (uint64_t seed = 1; seed <= seeds(12); ++seed) {
    SCOPED_TRACE(::testing::Message() << "seed=" << seed);
    ActiveFixture f(1 << 20, seed, true, 6);
    auto p = f.params(seed % 2 ? CopyMode::kWriteBlocking : CopyMode::kBackground, 4096);
    p.buf_size = 4 * 4096;  // small ops: many copies in flight over the hot area
    f.make(p);
    std::vector<std::unique_ptr<Child>> edges;
    for (int i = 0; i < 6; ++i) edges.push_back(f.graph.attach(f.graph.find("src"), "writer"));
    int done = 0;
    uint64_t failed = 0;
    auto writer = [&](Child* edge, uint64_t wseed) -> Task<void> {
      std::mt19937_64 rng(wseed);
      std::vector<std::byte> buf(3 * 4096 + 100);
      for (int n = 0; n < 150; ++n) {
        uint64_t len = 1 + rng() % buf.size();
        uint64_t off = 8 * 4096 + rng() % (6 * 4096);  // hot area: chunks 8..17
        for (uint64_t i = 0; i < len; ++i) buf[i] = static_cast<std::byte>(rng());
        if (!co_await edge->write(off, {buf.data(), len})) ++failed;
        if (rng() % 4 == 0) co_await yield_now();
      }
      ++done;
    };
    bool ok = f.loop.run([&]() -> Task<bool> {
      f.job->start(f.loop.executor());
      if (seed % 2 == 0) {
        EXPECT_TRUE(f.job->change_copy_mode(CopyMode::kWriteBlocking));
      }
      for (size_t i = 0; i < edges.size(); ++i)
        asio::co_spawn(f.loop.executor(), writer(edges[i].get(), seed * 100 + i), asio::detached);
      if (!co_await wait_until([&] { return done == static_cast<int>(edges.size()); }))
        co_return false;
      if (!co_await wait_until([&] { return f.job->actively_synced(); })) co_return false;
      EXPECT_EQ(first_difference(contents(*f.dst), contents(*f.src)), -1);
      co_return co_await f.complete();
    }());
    ASSERT_TRUE(ok);
    EXPECT_EQ(failed, 0u);
    EXPECT_FALSE(f.job->failure());
    EXPECT_EQ(first_difference(contents(*f.dst), contents(*f.src)), -1);
    if (HasFailure()) break;
  }
}

TEST(MirrorActive, IntersectingWritesDoNotDeadlock) {
  // 64 writes in flight at once, each crossing chunk boundaries and overlapping
  // its neighbours, while the background copy holds some of the same chunks.
  ActiveFixture f(1 << 20, 5, true, 4);
  f.make(f.params(CopyMode::kWriteBlocking, 4096));
  std::vector<std::unique_ptr<Child>> edges;
  for (int i = 0; i < 64; ++i) edges.push_back(f.graph.attach(f.graph.find("src"), "w"));
  int done = 0;
  auto one = [&](Child* edge, uint64_t off) -> Task<void> {
    std::vector<std::byte> data(3 * 4096, std::byte{0x5c});
    EXPECT_TRUE(co_await edge->write(off, data));
    ++done;
  };
  ASSERT_TRUE(f.loop.run([&]() -> Task<bool> {
    f.job->start(f.loop.executor());
    for (int round = 0; round < 5; ++round) {
      done = 0;
      for (size_t i = 0; i < edges.size(); ++i)
        asio::co_spawn(f.loop.executor(), one(edges[i].get(), 100000 + i * 2048 + round * 77),
                       asio::detached);
      if (!co_await wait_until([&] { return done == static_cast<int>(edges.size()); }))
        co_return false;
    }
    if (!co_await wait_until([&] { return f.job->actively_synced(); })) co_return false;
    co_return co_await f.complete();
  }()));
  EXPECT_EQ(first_difference(contents(*f.dst), contents(*f.src)), -1);
}

TEST(MirrorActive, WritesArrivingWhileJobIsCreated) {
  for (CopyMode mode : {CopyMode::kWriteBlocking, CopyMode::kAdaptive}) {
    SCOPED_TRACE(to_string(mode));
    ActiveFixture f(2 << 20, 6, true, 4);
    Client client;
    client.edge = f.graph.attach(f.graph.find("src"), "client2");
    client.model = &f.model;
    client.rng.seed(66);
    auto p = f.params(mode, 4096);
    p.adaptive_window_ms = 20;
    ASSERT_TRUE(f.loop.run([&]() -> Task<bool> {
      asio::co_spawn(f.loop.executor(), client.run(), asio::detached);
      co_await sleep_for(2ms);
      // Created with writes in flight; they must be tracked from here on.
      f.make(p);
      co_await sleep_for(2ms);
      f.job->start(f.loop.executor());
      if (!co_await f.ready()) co_return false;
      if (!co_await f.complete()) co_return false;
      uint64_t target = client.acked + 10;
      if (!co_await wait_until([&] { return client.acked >= target; })) co_return false;
      client.stop = true;
      co_return co_await wait_until([&] { return client.done; });
    }()));
    EXPECT_FALSE(f.job->failure());
    EXPECT_TRUE(f.job->switched());
    EXPECT_EQ(client.failed, 0u);
    EXPECT_EQ(first_difference(contents(*f.dst), f.model), -1);
  }
}

TEST(MirrorActive, ChangeCopyModeRules) {
  ActiveFixture f(1 << 20, 7, true);
  f.make(f.params(CopyMode::kBackground));
  auto& job = *f.job;
  EXPECT_EQ(job.change_copy_mode(CopyMode::kAdaptive).error().message(),
            "Change to copy mode 'adaptive' is not implemented");
  EXPECT_TRUE(job.change_copy_mode(CopyMode::kBackground));  // same mode: no-op
  ASSERT_TRUE(f.loop.run([&]() -> Task<bool> {
    job.start(f.loop.executor());
    if (!co_await f.ready()) co_return false;
    EXPECT_FALSE(job.info().actively_synced);
    EXPECT_TRUE(job.change_copy_mode(CopyMode::kWriteBlocking));
    EXPECT_TRUE(job.change_copy_mode(CopyMode::kWriteBlocking));
    EXPECT_EQ(job.change_copy_mode(CopyMode::kBackground).error().message(),
              "Change to copy mode 'background' is not implemented");
    if (!co_await wait_until([&] { return job.info().actively_synced; })) co_return false;
    co_return co_await f.complete();
  }()));
  EXPECT_EQ(job.change_copy_mode(CopyMode::kWriteBlocking).error().message(),
            "Job 'job0' in state 'null' cannot accept command verb 'change'");
  // A user switch is not announced as an automatic one.
  EXPECT_EQ(f.rec.count(JobEvent::Kind::kCopyModeChange), 0);
  EXPECT_TRUE(parse_copy_mode("adaptive"));
  EXPECT_STREQ(to_string(CopyMode::kAdaptive), "adaptive");
  EXPECT_FALSE(parse_copy_mode("sometimes"));
}

TEST(MirrorActive, SwitchToWriteBlockingMidRunConvergesUnderEndlessWrites) {
  // A writer that never pauses and a rate-limited copy loop: background mode
  // alone cannot become ready; after the switch it must.
  ActiveFixture f(2 << 20, 8, true, 2);
  auto p = f.params(CopyMode::kBackground, 4096);
  p.speed = 2 << 20;
  f.make(p);
  Client client;
  client.edge = f.graph.attach(f.graph.find("src"), "client2");
  client.model = &f.model;
  client.rng.seed(88);
  ASSERT_TRUE(f.loop.run([&]() -> Task<bool> {
    asio::co_spawn(f.loop.executor(), client.run(), asio::detached);
    f.job->start(f.loop.executor());
    co_await sleep_for(20ms);
    EXPECT_TRUE(f.job->change_copy_mode(CopyMode::kWriteBlocking));
    if (!co_await f.ready()) co_return false;
    if (!co_await wait_until([&] { return f.job->actively_synced(); })) co_return false;
    if (!co_await f.complete()) co_return false;
    client.stop = true;
    co_return co_await wait_until([&] { return client.done; });
  }()));
  EXPECT_FALSE(f.job->failure());
  EXPECT_EQ(first_difference(contents(*f.dst), f.model), -1);
}

TEST(MirrorActive, AdaptiveSwitchesItselfWhenDirtyCountStopsFalling) {
  // The copy loop crawls (64 KiB/s) while a writer dirties new chunks much
  // faster: the count cannot fall, so adaptive must switch and say why.
  ActiveFixture f(2 << 20, 9, false);
  auto p = f.params(CopyMode::kAdaptive, 4096);
  p.sync = SyncMode::kNone;
  p.speed = 64 << 10;
  p.adaptive_window_ms = 100;
  f.make(p);
  Client client;
  client.edge = f.graph.attach(f.graph.find("src"), "client2");
  client.model = &f.model;
  client.rng.seed(99);
  ASSERT_TRUE(f.loop.run([&]() -> Task<bool> {
    asio::co_spawn(f.loop.executor(), client.run(), asio::detached);
    f.job->start(f.loop.executor());
    if (!co_await wait_until([&] { return f.rec.count(JobEvent::Kind::kCopyModeChange) > 0; }))
      co_return false;
    EXPECT_EQ(f.job->copy_mode(), CopyMode::kWriteBlocking);
    EXPECT_TRUE(f.job->set_speed(0));
    if (!co_await f.ready()) co_return false;
    if (!co_await f.complete()) co_return false;
    client.stop = true;
    co_return co_await wait_until([&] { return client.done; });
  }()));
  auto* ev = f.rec.last(JobEvent::Kind::kCopyModeChange);
  ASSERT_TRUE(ev);
  EXPECT_EQ(ev->copy_mode, "write-blocking");
  EXPECT_NE(ev->message.find("has not fallen"), std::string::npos) << ev->message;
  EXPECT_EQ(f.rec.count(JobEvent::Kind::kCopyModeChange), 1);
  EXPECT_EQ(first_difference(contents(*f.dst), f.model), -1);
}

// A client that keeps rewriting what the copy has copied: adaptive switches once
// the job's copies pass the disk by kAdaptiveRecopyPercent, though the dirty
// count converges every time (the controller's window is an hour).
TEST(MirrorActive, AdaptiveSwitchesWhenClientsKeepRewritingCopiedData) {
  constexpr uint64_t kSize = 4 << 20, kWrite = 64 << 10;
  ActiveFixture f(kSize, 12, true);
  auto p = f.params(CopyMode::kAdaptive);
  p.adaptive_window_ms = 3600 * 1000;
  f.make(p);
  std::mt19937_64 rng(12);
  ASSERT_TRUE(f.loop.run([&]() -> Task<bool> {
    f.job->start(f.loop.executor());
    if (!co_await f.ready()) co_return false;
    EXPECT_EQ(f.job->copy_mode(), CopyMode::kAdaptive);
    // Each write dirties one chunk the job copies again in background mode.
    for (int i = 0; i < 200 && f.job->copy_mode() == CopyMode::kAdaptive; ++i) {
      const uint64_t off = rng() % (kSize / kWrite) * kWrite;
      EXPECT_TRUE(co_await f.write(off, kWrite, static_cast<uint8_t>(1 + i % 250)));
      if (!co_await wait_until([&] { return f.job->dirty_bytes() == 0; })) co_return false;
    }
    co_return co_await f.complete();
  }()));
  EXPECT_EQ(f.job->copy_mode(), CopyMode::kWriteBlocking);
  auto* ev = f.rec.last(JobEvent::Kind::kCopyModeChange);
  ASSERT_TRUE(ev);
  EXPECT_NE(ev->message.find("keep rewriting"), std::string::npos) << ev->message;
  const uint64_t limit = kSize + kSize / 100 * MirrorJob::kAdaptiveRecopyPercent;
  // The copy that crossed the line, and at most one more the test wrote
  // before it saw the switch.
  EXPECT_LE(f.job->stats().bytes_copied, limit + 2 * kWrite);
  EXPECT_EQ(first_difference(contents(*f.dst), f.model), -1);
}

TEST(MirrorActive, AdaptiveStaysBackgroundWhenItConverges) {
  ActiveFixture f(4 << 20, 10, true);
  auto p = f.params(CopyMode::kAdaptive);
  p.adaptive_window_ms = 3600 * 1000;  // nothing here can take an hour
  f.make(p);
  ASSERT_TRUE(f.loop.run([&]() -> Task<bool> {
    f.job->start(f.loop.executor());
    if (!co_await f.ready()) co_return false;
    EXPECT_EQ(f.job->copy_mode(), CopyMode::kAdaptive);
    EXPECT_FALSE(f.job->actively_synced());
    co_return co_await f.complete();
  }()));
  EXPECT_EQ(f.rec.count(JobEvent::Kind::kCopyModeChange), 0);
  EXPECT_EQ(first_difference(contents(*f.dst), f.model), -1);
}

// Holds writes while `hold` is set (only those whose data starts with `only`,
// when given), to force an interleaving.
class GatedDevice : public BlockDeviceWrapper {
 public:
  using BlockDeviceWrapper::BlockDeviceWrapper;
  bool hold = false;
  std::optional<std::byte> only;
  int held = 0;  // writes waiting at the gate now
  void release() {
    hold = false;
    gate_.notify_all();
  }
  Task<Result<void>> write(uint64_t off, std::span<const std::byte> buf, WriteFlags f) override {
    if (!only || (!buf.empty() && buf[0] == *only)) {
      ++held;
      while (hold) co_await gate_.wait();
      --held;
    }
    co_return co_await inner()->write(off, buf, f);
  }

 private:
  Notifier gate_;
};

// A write that started in background mode (W1) lands on the source while an
// active write (W2) holds the same chunk after the switch: the source ends with
// W1's data, the target with W2's. W2 must leave the chunk dirty, or the job
// would call a differing chunk clean.
TEST(MirrorActive, WriteFromBeforeTheSwitchKeepsChunkDirty) {
  Loop loop{2};
  Graph graph;
  auto src_mem = std::make_shared<MemoryDevice>(1 << 20, memory_opts());
  auto dst_mem = std::make_shared<MemoryDevice>(1 << 20, memory_opts());
  auto src = std::make_shared<GatedDevice>(src_mem);
  auto dst = std::make_shared<GatedDevice>(dst_mem);
  ASSERT_TRUE(graph.add("src", src));
  ASSERT_TRUE(graph.add("dst", dst));
  MirrorParams p;
  p.job_id = "j";
  p.device = "src";
  p.target = "dst";
  p.granularity = 65536;
  auto job = *MirrorJob::create(loop, graph, p);
  auto e1 = graph.attach(graph.find("src"), "w1");
  auto e2 = graph.attach(graph.find("src"), "w2");
  std::vector<std::byte> a(65536, std::byte{0xaa}), b(65536, std::byte{0xbb});
  bool w1_done = false, w2_done = false;
  auto w = [](Child* e, std::span<const std::byte> d, bool* done) -> Task<void> {
    EXPECT_TRUE(co_await e->write(0, d));
    *done = true;
  };
  ASSERT_TRUE(loop.run([&]() -> Task<bool> {
    job->start(loop.executor());
    if (!co_await wait_until([&] { return job->info().ready; })) co_return false;
    EXPECT_TRUE(job->pause());  // the copy loop stays out of the way
    if (!co_await wait_until([&] { return job->status() == JobStatus::kStandby; })) co_return false;
    src->hold = true;
    src->only = std::byte{0xaa};
    asio::co_spawn(loop.executor(), w(e1.get(), a, &w1_done), asio::detached);  // background
    if (!co_await wait_until([&] { return src->held == 1; })) co_return false;
    EXPECT_TRUE(job->change_copy_mode(CopyMode::kWriteBlocking));
    dst->hold = true;
    asio::co_spawn(loop.executor(), w(e2.get(), b, &w2_done), asio::detached);  // active
    // W2 lands on the source and waits at the target; then W1 lands.
    if (!co_await wait_until([&] { return dst->held == 1; })) co_return false;
    src->release();
    if (!co_await wait_until([&] { return w1_done; })) co_return false;
    dst->release();
    if (!co_await wait_until([&] { return w2_done; })) co_return false;
    EXPECT_GT(job->dirty_bytes(), 0u) << "a chunk that differs was called clean";
    EXPECT_TRUE(job->resume());
    if (!co_await wait_until([&] { return job->actively_synced(); })) co_return false;
    EXPECT_EQ(first_difference(contents(*dst_mem), contents(*src_mem)), -1);
    (void)job->cancel(true);
    co_await job->wait_concluded();
    co_return true;
  }()));
}

// The source and target halves of an active write run at once: when the
// source half fails, the client gets the error and the target (which may hold
// the new data) is resynchronised from the source.
TEST(MirrorActive, SourceWriteErrorReturnedAndRangeResynced) {
  ActiveFixture f(2 << 20, 12, true);
  f.make(f.params(CopyMode::kWriteBlocking));
  ASSERT_TRUE(f.loop.run([&]() -> Task<bool> {
    f.job->start(f.loop.executor());
    if (!co_await wait_until([&] { return f.job->actively_synced(); })) co_return false;
    f.src_fault->add_rule(
        FaultRule{.ops = FaultRule::kWrite, .offset = 65536, .length = 65536, .remaining = 1});
    std::vector<std::byte> data(65536, std::byte{0x99});
    auto r = co_await f.client->write(65536, data);
    EXPECT_FALSE(r);
    EXPECT_FALSE(f.rec.last(JobEvent::Kind::kError));  // the job's own I/O did not fail
    if (!co_await wait_until([&] { return f.job->actively_synced(); })) co_return false;
    EXPECT_EQ(first_difference(contents(*f.dst), contents(*f.src)), -1);
    co_return co_await f.complete();
  }()));
  EXPECT_FALSE(f.job->failure());
  EXPECT_EQ(first_difference(contents(*f.dst), f.model), -1);
}

// A failing synchronous target write: the client still gets the source's
// success; the range is dirty again; the policy decides what the job does.
TEST(MirrorActive, TargetWriteErrorUnderEachPolicy) {
  for (ErrorPolicy policy :
       {ErrorPolicy::kReport, ErrorPolicy::kIgnore, ErrorPolicy::kStop, ErrorPolicy::kEnospc}) {
    SCOPED_TRACE(static_cast<int>(policy));
    // enospc is tried with ENOSPC (stops, io-status nospace); with EIO it
    // would report, as kReport shows.
    int errnum = policy == ErrorPolicy::kEnospc ? ENOSPC : EIO;
    ActiveFixture f(2 << 20, 11, false);
    auto p = f.params(CopyMode::kWriteBlocking);
    p.on_target_error = policy;
    f.make(p);
    ASSERT_TRUE(f.loop.run([&]() -> Task<bool> {
      f.job->start(f.loop.executor());
      if (!co_await f.ready()) co_return false;
      if (!co_await wait_until([&] { return f.job->actively_synced(); })) co_return false;
      f.dst_fault->add_rule(FaultRule{.ops = FaultRule::kAllWrites,
                                      .offset = 1 << 20,
                                      .length = 65536,
                                      .remaining = 1,
                                      .errnum = errnum});
      EXPECT_TRUE(co_await f.write(1 << 20, 65536, 0x66));  // client sees the source's success
      EXPECT_TRUE(f.target_has(1 << 20, 65536, 0));
      auto* err = f.rec.last(JobEvent::Kind::kError);
      EXPECT_TRUE(err);
      if (err) {
        EXPECT_EQ(err->operation, "write");
      }
      switch (policy) {
        case ErrorPolicy::kReport:
          co_return co_await wait_until([&] { return f.job->concluded(); });
        case ErrorPolicy::kIgnore:
          EXPECT_EQ(err ? err->action : "", "ignore");
          // The range was re-dirtied and the copy loop retries it.
          if (!co_await wait_until([&] { return f.job->actively_synced(); })) co_return false;
          EXPECT_TRUE(f.target_has(1 << 20, 65536, 0x66));
          co_return co_await f.complete();
        default: {
          EXPECT_EQ(err ? err->action : "", "stop");
          if (!co_await wait_until([&] { return f.job->status() == JobStatus::kStandby; }))
            co_return false;
          EXPECT_EQ(f.job->info().io_status,
                    errnum == ENOSPC ? IoStatus::kNoSpace : IoStatus::kFailed);
          EXPECT_FALSE(f.job->actively_synced());
          // Stopped: writes are only tracked, not mirrored, until resume.
          EXPECT_TRUE(co_await f.write(0, 4096, 0x77));
          EXPECT_TRUE(f.target_has(0, 4096, 0));
          EXPECT_TRUE(f.job->resume());
          if (!co_await wait_until([&] { return f.job->actively_synced(); })) co_return false;
          co_return co_await f.complete();
        }
      }
    }()));
    if (policy == ErrorPolicy::kReport) {
      ASSERT_TRUE(f.job->failure());
      EXPECT_NE(f.job->failure()->message().find("Input/output error"), std::string::npos)
          << f.job->failure()->message();
    } else {
      EXPECT_FALSE(f.job->failure());
      EXPECT_EQ(first_difference(contents(*f.dst), f.model), -1);
    }
  }
}

// Counts the reads it passes on, by their uncached hint.
class ReadHintCounter : public BlockDeviceWrapper {
 public:
  using BlockDeviceWrapper::BlockDeviceWrapper;
  uint64_t uncached = 0, cached = 0;
  Task<Result<void>> read(uint64_t off, std::span<std::byte> buf, ReadFlags f) override {
    ++(f.uncached ? uncached : cached);
    return inner()->read(off, buf, f);
  }
};

// The copy reads the source uncached when a client can write to it (their small
// writes would otherwise land in the large page-cache folios of its reads),
// and cached when nobody can (readahead makes an idle copy faster).
// MirrorJob::clients_may_write.
void count_read_hints(bool with_client, uint64_t* uncached, uint64_t* cached) {
  constexpr uint64_t kSize = 4 << 20;
  Loop loop{2};
  Graph graph;
  std::mt19937_64 rng(21);
  auto src = std::make_shared<MemoryDevice>(kSize, memory_opts());
  fill_random(*src, rng);
  auto counter = std::make_shared<ReadHintCounter>(src);
  ASSERT_TRUE(graph.add("src", counter));
  ASSERT_TRUE(graph.add("dst", std::make_shared<MemoryDevice>(kSize, memory_opts())));
  std::unique_ptr<Child> client;
  if (with_client) client = graph.attach(graph.find("src"), "client");
  MirrorParams p;
  p.job_id = "job0";
  p.device = "src";
  p.target = "dst";
  p.granularity = 65536;
  p.speed = 8 << 20;  // half a second, while the client writes
  auto job = MirrorJob::create(loop, graph, p);
  ASSERT_TRUE(job) << job.error().message();
  ASSERT_TRUE(loop.run([&]() -> Task<bool> {
    (*job)->start(loop.executor());
    if (with_client) {
      std::vector<std::byte> data(4096, std::byte{0x5a});
      EXPECT_TRUE(co_await client->write(kSize - 4096, data));
    }
    if (!co_await wait_until([&] { return (*job)->info().ready; })) co_return false;
    EXPECT_TRUE((*job)->complete());
    co_return co_await wait_until([&] { return (*job)->concluded(); });
  }()));
  *uncached = counter->uncached;
  *cached = counter->cached;
}

TEST(MirrorActive, CopyReadsTheSourceUncachedWhenClientsMayWrite) {
  uint64_t uncached = 0, cached = 0;
  count_read_hints(true, &uncached, &cached);
  EXPECT_GT(uncached, 0u);
  EXPECT_EQ(cached, 0u);
  count_read_hints(false, &uncached, &cached);
  EXPECT_EQ(uncached, 0u);
  EXPECT_GT(cached, 0u);
}

}  // namespace
}  // namespace blkmirror::test
