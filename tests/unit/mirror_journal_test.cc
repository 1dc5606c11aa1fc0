// The crash-safe state: its file format refuses what is not a whole, current
// state; a mark is durable when it returns; and, the property everything rests
// on, while a mirror runs with clients writing, at every moment (a kill -9: the
// files as the process left them; a power cut: what the disks made durable plus
// any subset of the rest) each extent the state file says is clean holds the
// same bytes on source and target. A resume from such a moment ends exact and
// copies only the extents the state names. (Checked to fail: without the mark
// before a client write, or without either flush of a checkpoint, the power-cut
// cases find clean extents that differ; without the mark, the kill -9 ones too.)
#include <fmt/format.h>
#include <gtest/gtest.h>

#include "harness.h"
#include "journal/journal.h"
#include "power_cut_file.h"

namespace blkmirror::test {
namespace {

using namespace std::chrono_literals;

JournalHeader sample_header() {
  JournalHeader h;
  h.length = 10 << 20;
  h.extent_size = 1 << 20;
  h.granularity = 64 << 10;
  h.sync = 0;
  h.source = {1, 2, 10 << 20, "src.img"};
  h.target = {3, 4, 10 << 20, "dst.img"};
  return h;
}

TEST(JournalFormat, RoundTripAndCorruptionsAreRefused) {
  JournalHeader h = sample_header();
  h.seq = 7;
  h.state = JournalState::kCancelled;
  auto bytes = encode_journal_header(h);
  auto back = parse_journal_header(bytes);
  ASSERT_TRUE(back) << back.error().message();
  EXPECT_EQ(back->seq, 7u);
  EXPECT_EQ(back->state, JournalState::kCancelled);
  EXPECT_EQ(back->source.name, "src.img");
  EXPECT_TRUE(back->target == h.target);
  EXPECT_EQ(back->bitmap_bytes(), 4096u);
  // Any single flipped byte of the header is caught.
  for (size_t i : {size_t{0}, size_t{9}, size_t{40}, size_t{130}, size_t{600}, size_t{4090}}) {
    auto bad = bytes;
    bad[i] ^= std::byte{0x10};
    EXPECT_FALSE(parse_journal_header(bad)) << "byte " << i;
  }
  auto other = bytes;
  other[8] = std::byte{2};  // version 2
  auto r = parse_journal_header(other);
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().message().find("version"), std::string::npos) << r.error().message();
  EXPECT_FALSE(parse_journal_header(std::span(bytes).first(100)));
}

TEST(JournalFormat, TheNewerValidSlotWinsAndATornOneIsSkipped) {
  JournalHeader h = sample_header();
  std::vector<std::byte> slots(kJournalBitmapOffset);
  h.seq = 4;
  auto a = encode_journal_header(h);
  h.seq = 5;
  h.state = JournalState::kCompleted;
  auto b = encode_journal_header(h);
  std::copy(a.begin(), a.end(), slots.begin());
  std::copy(b.begin(), b.end(), slots.begin() + kJournalSlotSize);
  auto got = pick_journal_header(slots);
  ASSERT_TRUE(got);
  EXPECT_EQ(got->seq, 5u);
  // The write of slot B was torn: slot A's older state stands.
  slots[kJournalSlotSize + 200] ^= std::byte{1};
  got = pick_journal_header(slots);
  ASSERT_TRUE(got);
  EXPECT_EQ(got->seq, 4u);
  slots[100] ^= std::byte{1};
  EXPECT_FALSE(pick_journal_header(slots));
}

struct JournalFixture {
  Loop loop;
  std::shared_ptr<PowerCutFile> file = std::make_shared<PowerCutFile>(std::vector<std::byte>());
  std::unique_ptr<Journal> j;
  explicit JournalFixture(BlockDevicePtr on = nullptr) {
    auto r = loop.run(Journal::create(on ? on : file, sample_header()));
    EXPECT_TRUE(r) << r.error().message();
    j = std::move(*r);
  }
  // The bitmap bit of extent x in what a power cut leaves (any subset of the
  // writes not yet flushed).
  bool durable_bit(uint64_t x, std::mt19937_64& rng) const {
    auto img = file->crash_image(rng);
    auto w = static_cast<uint8_t>(img[kJournalBitmapOffset + x / 8]);
    return (w >> (x % 8)) & 1;
  }
};

TEST(Journal, CreatedAllDirtyAndAMarkIsDurableWhenItReturns) {
  JournalFixture f;
  EXPECT_EQ(f.j->dirty_count(), 10u);
  std::mt19937_64 rng(1);
  ASSERT_TRUE(f.loop.run(f.j->clear({0, 1, 2, 3, 4, 5, 6, 7, 8, 9})));
  for (int i = 0; i < 20; ++i) EXPECT_FALSE(f.durable_bit(3, rng));
  ASSERT_TRUE(f.loop.run(f.j->mark(3 << 20, 100)));
  for (int i = 0; i < 20; ++i) EXPECT_TRUE(f.durable_bit(3, rng));
  EXPECT_TRUE(f.j->durable(3 << 20, 1 << 20));
  EXPECT_FALSE(f.j->durable(4 << 20, 1));
  // Reopened from the file: the same state.
  auto again = f.loop.run(Journal::open(f.file));
  ASSERT_TRUE(again) << again.error().message();
  EXPECT_EQ((*again)->dirty_count(), 1u);
  EXPECT_TRUE((*again)->dirty(3));
}

TEST(Journal, ConcurrentMarksShareOneFlush) {
  // A device whose I/O suspends, as a file's does: marks pile up meanwhile.
  JournalFixture f(std::make_shared<MemoryDevice>(3 * 4096));
  ASSERT_TRUE(f.loop.run(f.j->clear({0, 1, 2, 3, 4, 5, 6, 7, 8, 9})));
  const uint64_t before = f.j->flushes();
  int done = 0;
  f.loop.run([](Journal* j, int* done, Loop* loop) -> Task<void> {
    for (uint64_t x = 0; x < 10; ++x)
      asio::co_spawn(
          loop->executor(),
          [](Journal* j, uint64_t x, int* done) -> Task<void> {
            EXPECT_TRUE(co_await j->mark(x << 20, 4096));
            ++*done;
          }(j, x, done),
          asio::detached);
    co_await wait_until([done] { return *done == 10; });
  }(f.j.get(), &done, &f.loop));
  EXPECT_EQ(done, 10);
  // The first mark writes its page at once; the nine that came meanwhile share
  // the next batch.
  EXPECT_LE(f.j->flushes() - before, 2u);
  EXPECT_EQ(f.j->dirty_count(), 10u);
}

TEST(Journal, OpenRefusesTruncatedAndForeignFiles) {
  JournalFixture f;
  Loop& loop = f.loop;
  auto bytes = f.file->live();
  bytes.resize(kJournalBitmapOffset + 100);
  auto r = loop.run(Journal::open(std::make_shared<PowerCutFile>(bytes)));
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().message().find("truncated"), std::string::npos) << r.error().message();
  std::vector<std::byte> junk(3 * 4096, std::byte{0x42});
  r = loop.run(Journal::open(std::make_shared<PowerCutFile>(junk)));
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().message().find("not a blkmirror state file"), std::string::npos);
}

// --- the superset property under a live mirror ----------------------------

constexpr uint64_t kDisk = 4 << 20;
constexpr uint64_t kExtent = 16 << 10;
constexpr uint64_t kGran = 4096;

// Every extent the state file `journal` calls clean holds the same bytes in
// `src` and `dst`. Empty: the property holds; else the first extent where not.
std::string superset_violation(const std::vector<std::byte>& journal,
                               const std::vector<std::byte>& src,
                               const std::vector<std::byte>& dst) {
  auto h = pick_journal_header(std::span(journal).first(kJournalBitmapOffset));
  if (!h) return "state file unreadable: " + h.error().message();
  for (uint64_t x = 0; x < h->extents(); ++x) {
    bool dirty = (static_cast<uint8_t>(journal[kJournalBitmapOffset + x / 8]) >> (x % 8)) & 1;
    if (dirty) continue;
    uint64_t off = x * h->extent_size;
    if (std::memcmp(src.data() + off, dst.data() + off, h->extent_size) != 0)
      return fmt::format("extent {} (offset {}) is clean in the state but differs", x, off);
  }
  return "";
}

struct Moment {
  std::vector<std::byte> journal, src, dst;
};

struct LiveCase {
  uint64_t seed;
  CopyMode mode;
  bool power_cut;  // else kill -9: the files as the process left them
};

void run_live_case(const LiveCase& c) {
  SCOPED_TRACE(::testing::Message() << "seed " << c.seed << " mode " << to_string(c.mode)
                                    << (c.power_cut ? " power cut" : " kill -9"));
  std::mt19937_64 rng(c.seed);
  std::vector<std::byte> initial(kDisk);
  for (auto& b : initial) b = static_cast<std::byte>(rng());
  auto src = std::make_shared<PowerCutFile>(initial);
  auto dst = std::make_shared<PowerCutFile>(std::vector<std::byte>(kDisk));
  auto jfile = std::make_shared<PowerCutFile>(std::vector<std::byte>());
  Loop loop(2);
  Graph graph;
  Node* src_node = *graph.add("src", src);
  ASSERT_TRUE(graph.add("dst", dst));
  JournalHeader h;
  h.length = kDisk;
  h.extent_size = kExtent;
  h.granularity = kGran;
  auto journal = loop.run(Journal::create(jfile, h));
  ASSERT_TRUE(journal);

  // Checked at every operation on any of the three files, and one early
  // moment kept for the resume below.
  uint64_t ops = 0, checks = 0;
  std::string violation;
  std::optional<Moment> kept;
  const uint64_t keep_at = 3 + rng() % 20;
  MirrorJob* running = nullptr;
  auto check = [&] {
    // Once the target took the source's place, clients write it alone: the
    // source is stale by design (and the state says completed).
    if (!running || running->switched()) return;
    if (!violation.empty()) return;
    ++ops;
    Moment m;
    if (c.power_cut) {
      m = {jfile->crash_image(rng), src->crash_image(rng), dst->crash_image(rng)};
    } else {
      m = {jfile->live(), src->live(), dst->live()};
    }
    violation = superset_violation(m.journal, m.src, m.dst);
    ++checks;
    if (checks == keep_at && !kept) kept = std::move(m);
  };
  src->on_op = dst->on_op = jfile->on_op = check;

  MirrorParams p;
  p.job_id = "m";
  p.device = "src";
  p.target = "dst";
  p.granularity = kGran;
  p.copy_mode = c.mode;
  p.speed = 8 << 20;  // half a second of copying: the client writes across it
  p.journal = std::move(*journal);
  p.checkpoint_interval = 5ms;
  auto job = MirrorJob::create(loop, graph, p);
  ASSERT_TRUE(job) << job.error().message();
  running = job->get();
  std::vector<std::byte> model = initial;
  Client client;
  client.edge = graph.attach(src_node, "client");
  client.model = &model;
  client.rng.seed(c.seed * 13 + 5);
  bool ok = loop.run([&]() -> Task<bool> {
    asio::co_spawn(loop.executor(), client.run(), asio::detached);
    (*job)->start(loop.executor());
    co_return co_await drive_to_switch(**job, client, rng, c.mode == CopyMode::kBackground);
  }());
  ASSERT_TRUE(ok);
  ASSERT_FALSE((*job)->failure()) << (*job)->failure()->message();
  EXPECT_EQ(violation, "");
  EXPECT_GT(checks, 10u);
  EXPECT_GT(client.acked, 0u);

  // Resume from the kept moment: the state's dirty extents are all it copies,
  // and the target ends equal to the source.
  ASSERT_TRUE(kept);
  auto src2 = std::make_shared<PowerCutFile>(kept->src);
  auto dst2 = std::make_shared<PowerCutFile>(kept->dst);
  auto j2 = loop.run(Journal::open(std::make_shared<PowerCutFile>(kept->journal)));
  ASSERT_TRUE(j2) << j2.error().message();
  const uint64_t owed = (*j2)->dirty_count() * kExtent;
  Graph g2;
  ASSERT_TRUE(g2.add("src", src2));
  ASSERT_TRUE(g2.add("dst", dst2));
  MirrorParams p2;
  p2.job_id = "resume";
  p2.device = "src";
  p2.target = "dst";
  p2.granularity = kGran;
  p2.journal = std::move(*j2);
  p2.resume = true;
  auto resume = MirrorJob::create(loop, g2, p2);
  ASSERT_TRUE(resume) << resume.error().message();
  ASSERT_TRUE(loop.run([&]() -> Task<bool> {
    (*resume)->start(loop.executor());
    if (!co_await wait_until([&] { return (*resume)->info().ready; })) co_return false;
    if (!(*resume)->complete()) co_return false;
    co_return co_await wait_until([&] { return (*resume)->concluded(); });
  }()));
  ASSERT_FALSE((*resume)->failure()) << (*resume)->failure()->message();
  EXPECT_TRUE(src2->live() == dst2->live());
  EXPECT_LE((*resume)->stats().bytes_copied, owed);
}

TEST(MirrorJournal, CleanExtentsAgreeAtEveryMomentManySeeds) {
  for (uint64_t seed = 1; seed <= 3; ++seed) {
    run_live_case({seed, CopyMode::kBackground, false});
    run_live_case({seed + 10, CopyMode::kWriteBlocking, false});
    run_live_case({seed + 20, CopyMode::kBackground, true});
    run_live_case({seed + 30, CopyMode::kWriteBlocking, true});
  }
}

}  // namespace
}  // namespace blkmirror::test
