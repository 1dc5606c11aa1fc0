// qcow2 read path against images made and written by the real qemu-img / qemu-io:
// every read must equal `qemu-img convert -O raw` byte for byte.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include "qcow2_util.h"

namespace blkmirror::test {
namespace {

struct Shape {
  int version;
  int cluster;
  int refcount_bits;
  bool extended_l2;
};

std::string create_opts(const Shape& s) {
  return fmt::format("compat={},cluster_size={},refcount_bits={}{}",
                     s.version == 2 ? "0.10" : "1.1", s.cluster, s.refcount_bits,
                     s.extended_l2 ? ",extended_l2=on" : "");
}

class Qcow2ReadTest : public ::testing::TestWithParam<Shape> {};

TEST_P(Qcow2ReadTest, WrittenByQemuIoReadsAsQemuImgConvert) {
  const Shape s = GetParam();
  TempDir dir;
  const std::string img = dir / "a.qcow2", raw = dir / "a.raw";
  ASSERT_EQ(sh(fmt::format("qemu-img create -q -f qcow2 -o {} {} 8M", create_opts(s), img)).status,
            0);
  // Data at odd places, zeroes (kept and unmapped), a discard, compressed writes.
  std::string cmds =
      "-c 'write -P 0x11 0 64k' -c 'write -P 0x22 100k 3k' -c 'write -P 0x33 1M 1M' "
      "-c 'write -P 0x44 3M 100k' -c 'write -z 1M 128k' -c 'write -z -u 1536k 64k' "
      "-c 'discard 3M 64k' -c 'write -P 0x55 7M 4k' -c 'write -z 6M 1M' -c 'write -P 0x66 6M 512'";
  // A compressed cluster (qemu-io writes whole, aligned clusters compressed).
  const uint64_t coff = (5u << 20) / s.cluster * s.cluster;
  cmds += fmt::format(" -c 'write -c -P 0x77 {} {}'", coff, s.cluster);
  auto w = sh(fmt::format("qemu-io -f qcow2 {} {}", cmds, img));
  ASSERT_EQ(w.status, 0) << w.out;
  ASSERT_EQ(sh(fmt::format("qemu-img convert -f qcow2 -O raw {} {}", img, raw)).status, 0);
  auto want = read_file(raw);

  Loop loop;
  auto dev = open_qcow2(loop, img, true);
  ASSERT_TRUE(dev) << dev.error().message();
  EXPECT_EQ((*dev)->info().version, static_cast<uint32_t>(s.version));
  EXPECT_EQ((*dev)->info().cluster_size(), static_cast<uint64_t>(s.cluster));
  EXPECT_EQ((*dev)->info().refcount_bits, static_cast<uint32_t>(s.refcount_bits));
  EXPECT_EQ((*dev)->info().extended_l2, s.extended_l2);
  auto got = loop.run(read_all(**dev));
  ASSERT_TRUE(got) << got.error().message();
  EXPECT_EQ(first_diff(*got, want), -1);
  // Unaligned reads across cluster boundaries too.
  std::vector<std::byte> part(200000);
  for (uint64_t off : {1u, 99999u, 1048000u, 3100000u, 5242000u}) {
    auto r = loop.run((*dev)->read(off, part));
    ASSERT_TRUE(r) << r.error().message();
    EXPECT_EQ(0, std::memcmp(part.data(), want.data() + off, part.size())) << off;
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, Qcow2ReadTest,
                         ::testing::Values(Shape{2, 65536, 16, false}, Shape{3, 65536, 16, false},
                                           Shape{3, 512, 16, false}, Shape{2, 512, 16, false},
                                           Shape{3, 4096, 1, false}, Shape{3, 2 << 20, 16, false},
                                           Shape{3, 65536, 64, false}, Shape{3, 65536, 16, true},
                                           Shape{3, 16384, 1, true}));

TEST(Qcow2Read, ConvertedWithZlibAndZstdCompression) {
  TempDir dir;
  const std::string src = dir / "src.raw";
  // Compressible and incompressible areas.
  ASSERT_EQ(
      sh(fmt::format("qemu-img create -q -f raw {} 4M && qemu-io -f raw -c 'write -P 0x5a 0 1M' "
                     "-c 'write -P 0x01 2M 4k' {} && head -c 1048576 /dev/urandom | dd of={} "
                     "bs=1M seek=3 conv=notrunc status=none",
                     src, src, src))
          .status,
      0);
  for (std::string type : {"zlib", "zstd"}) {
    const std::string img = dir / ("c-" + type + ".qcow2");
    auto c = sh(fmt::format("qemu-img convert -c -f raw -O qcow2 -o compression_type={} {} {}",
                            type, src, img));
    ASSERT_EQ(c.status, 0) << c.out;
    Loop loop;
    auto dev = open_qcow2(loop, img, true);
    ASSERT_TRUE(dev) << dev.error().message();
    EXPECT_EQ((*dev)->info().compression_zstd, type == "zstd");
    auto got = loop.run(read_all(**dev));
    ASSERT_TRUE(got) << got.error().message();
    EXPECT_EQ(first_diff(*got, read_file(src)), -1) << type;
  }
}

TEST(Qcow2Read, BlockStatusReportsLayersAndZeroes) {
  TempDir dir;
  const std::string base = dir / "base.qcow2", top = dir / "top.qcow2";
  ASSERT_EQ(sh(fmt::format(
                   "qemu-img create -q -f qcow2 {} 4M && qemu-io -f qcow2 -c 'write -P 1 0 1M' {}",
                   base, base))
                .status,
            0);
  ASSERT_EQ(sh(fmt::format("qemu-img create -q -f qcow2 -b {} -F qcow2 {} && qemu-io -f qcow2 "
                           "-c 'write -P 2 512k 64k' -c 'write -z 2M 64k' {}",
                           base, top, top))
                .status,
            0);
  Loop loop;
  auto b = open_qcow2(loop, base, true);
  ASSERT_TRUE(b);
  auto t = open_qcow2(loop, top, true, *b);
  ASSERT_TRUE(t) << t.error().message();
  EXPECT_EQ((*t)->info().backing_file, base);
  EXPECT_EQ((*t)->info().backing_format, "qcow2");
  struct Want {
    uint64_t off;
    bool allocated, zero;
    uint32_t depth;
    uint64_t len;
  };
  for (Want w : {Want{0, true, false, 2, 512 << 10}, Want{512 << 10, true, false, 1, 64 << 10},
                 Want{576 << 10, true, false, 2, 448 << 10}, Want{1 << 20, false, true, 0, 1 << 20},
                 Want{2 << 20, true, true, 1, 64 << 10}}) {
    auto e2 = loop.run((*t)->block_status(w.off, (4 << 20) - w.off));
    ASSERT_TRUE(e2) << e2.error().message();
    EXPECT_EQ(e2->allocated, w.allocated) << w.off;
    EXPECT_EQ(e2->zero, w.zero) << w.off;
    EXPECT_EQ(e2->depth, w.depth) << w.off;
    EXPECT_EQ(e2->length, w.len) << w.off;
  }
  auto got = loop.run(read_all(**t));
  ASSERT_TRUE(got);
  ASSERT_EQ(sh(fmt::format("qemu-img convert -O raw {} {}", top, dir / "top.raw")).status, 0);
  EXPECT_EQ(first_diff(*got, read_file(dir / "top.raw")), -1);
}

}  // namespace
}  // namespace blkmirror::test
