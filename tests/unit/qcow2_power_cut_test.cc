// Power-cut safety of the qcow2 driver's write ordering. A kill -9 (qcow2_crash_test)
// only loses writes still in the process; a power cut also loses, in any order,
// what the file system had not made durable. PowerCutFile keeps the image bytes
// as of the last flush plus the writes since; at many moments during a workload
// (also in the middle of a metadata flush) it makes "crash images": the durable
// bytes plus a random subset of the later writes, as a disk may leave them.
// Each must pass `qemu-img check` (leaks allowed), and every block must read as a
// value it was given, the acknowledged value for writes covered by a completed
// flush. Swapping the refcount-before-L2 order in flush.cc makes this fail.
#include <random>

#include <gtest/gtest.h>

#include <fmt/format.h>

#include "power_cut_file.h"
#include "qcow2_util.h"

namespace blkmirror::test {
namespace {


constexpr uint64_t kSize = 2 << 20;
constexpr uint64_t kBlock = 4096;
constexpr uint64_t kBlocks = kSize / kBlock;

// The workload: op i writes block (i * 37 % kBlocks) with a pattern, or (every
// 6th) zeroes a block written before with may_unmap, which frees whole clusters,
// so freed clusters get reused; a flush every 5 ops.
struct GuestOp {
  uint64_t block;
  std::byte value;  // 0: zeroed
};
GuestOp guest_op(uint64_t i) {
  if (i % 6 == 5 && i >= 40) return {(i - 40) * 37 % kBlocks, std::byte{0}};
  return {i * 37 % kBlocks, std::byte(1 + i % 251)};
}

struct Snapshot {
  std::string path;
  uint64_t acked = 0;   // ops covered by the last completed flush
  uint64_t issued = 0;  // ops started
};

void run_power_cuts(uint64_t cluster, uint64_t seed) {
  TempDir dir;
  const std::string base = dir / "base.qcow2";
  ASSERT_EQ(
      sh(fmt::format("qemu-img create -q -f qcow2 -o cluster_size={} {} {}", cluster, base, kSize))
          .status,
      0);
  auto file = std::make_shared<PowerCutFile>(read_file(base));
  std::mt19937_64 rng(seed);
  std::vector<Snapshot> snaps;
  uint64_t acked = 0, issued = 0, file_ops = 0;
  file->on_op = [&] {
    // About 80 crash images over the run, at file-op granularity.
    if (++file_ops % 23 != 0) return;
    Snapshot s{dir / fmt::format("crash{}.qcow2", snaps.size()), acked, issued};
    auto img = file->crash_image(rng);
    std::ofstream f(s.path, std::ios::binary);
    f.write(reinterpret_cast<const char*>(img.data()), static_cast<std::streamsize>(img.size()));
    snaps.push_back(s);
  };
  {
    Loop loop;
    auto dev = loop.run(Qcow2Device::open(loop, file, nullptr, {}));
    ASSERT_TRUE(dev) << dev.error().message();
    const uint64_t n = 2 * kBlocks;
    auto r = loop.run(
        [](Qcow2Device* q, uint64_t n, uint64_t* acked, uint64_t* issued) -> Task<Result<void>> {
          std::vector<std::byte> buf(kBlock);
          for (uint64_t i = 0; i < n; ++i) {
            GuestOp op = guest_op(i);
            *issued = i + 1;
            Result<void> r;
            if (op.value == std::byte{0}) {
              const ZeroFlags unmap{.may_unmap = true};  // GCC 12 rule 3 (base/task.h)
              r = co_await q->write_zeroes(op.block * kBlock, kBlock, unmap);
            } else {
              std::fill(buf.begin(), buf.end(), op.value);
              r = co_await q->write(op.block * kBlock, buf, {});
            }
            if (!r) co_return r;
            if (i % 5 == 4) {
              if (auto f = co_await q->flush(); !f) co_return f;
              *acked = i + 1;
            }
          }
          co_return co_await q->close();
        }(dev->get(), n, &acked, &issued));
    ASSERT_TRUE(r) << r.error().message();
    file->on_op = nullptr;
  }
  ASSERT_GT(snaps.size(), 40u);
  for (const Snapshot& s : snaps) {
    SCOPED_TRACE(fmt::format("{} (acked {}, issued {})", s.path, s.acked, s.issued));
    auto check = sh("qemu-img check -f qcow2 " + s.path);
    ASSERT_TRUE(check.status == 0 || check.status == 3) << check.out;
    // Allowed values per block: the last acknowledged one, and any issued later.
    std::vector<std::vector<std::byte>> allowed(kBlocks, std::vector<std::byte>{std::byte{0}});
    for (uint64_t i = 0; i < s.issued; ++i) {
      GuestOp op = guest_op(i);
      if (i < s.acked) allowed[op.block] = {op.value};
      else allowed[op.block].push_back(op.value);
    }
    Loop loop;
    auto dev = open_qcow2(loop, s.path, true);
    ASSERT_TRUE(dev) << dev.error().message();
    auto got = loop.run(read_all(**dev));
    ASSERT_TRUE(got) << got.error().message();
    for (uint64_t b = 0; b < kBlocks; ++b) {
      std::byte v = (*got)[b * kBlock];
      bool uniform = std::all_of(got->begin() + b * kBlock, got->begin() + (b + 1) * kBlock,
                                 [v](std::byte x) { return x == v; });
      bool ok = uniform && std::find(allowed[b].begin(), allowed[b].end(), v) != allowed[b].end();
      ASSERT_TRUE(ok) << "block " << b << " reads " << int(v) << (uniform ? "" : " (mixed)");
    }
    ::unlink(s.path.c_str());
  }
}

TEST(Qcow2PowerCut, CrashImagesAreConsistentAndKeepAckedWrites4K) { run_power_cuts(4096, 1); }
TEST(Qcow2PowerCut, CrashImagesAreConsistentAndKeepAckedWrites64K) { run_power_cuts(65536, 2); }

}  // namespace
}  // namespace blkmirror::test
