// qcow2 write path: images written by our driver must pass `qemu-img check` (no
// errors, no leaks), equal a raw model under `qemu-img compare`, and show the
// allocation we expect under `qemu-img map`.
#include <gtest/gtest.h>

#include <random>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "qcow2_util.h"

namespace blkmirror::test {
namespace {

struct Shape {
  int version;
  uint64_t cluster;
  uint32_t refcount_bits;
  bool extended_l2;
  bool made_by_qemu;
};

std::string shape_name(const ::testing::TestParamInfo<Shape>& i) {
  const Shape& s = i.param;
  return fmt::format("v{}_c{}_r{}{}{}", s.version, s.cluster, s.refcount_bits,
                     s.extended_l2 ? "_ext" : "", s.made_by_qemu ? "_qemu" : "_ours");
}

Result<void> make_image(Loop& loop, const Shape& s, const std::string& path, uint64_t size,
                        std::optional<std::string> backing = {}) {
  if (s.made_by_qemu) {
    auto r = sh(fmt::format(
        "qemu-img create -q -f qcow2 -o compat={},cluster_size={},refcount_bits={}{} {} {} {}",
        s.version == 2 ? "0.10" : "1.1", s.cluster, s.refcount_bits,
        s.extended_l2 ? ",extended_l2=on" : "", backing ? "-F raw -b " + *backing : std::string(),
        path, size));
    if (r.status != 0) return make_error(EIO, r.out);
    return {};
  }
  if (auto r = FileDevice::create(path, 0); !r) return r;
  auto f = FileDevice::open(loop, path);
  if (!f) return make_error(f.error());
  Qcow2CreateOptions o;
  o.size = size;
  o.version = s.version;
  o.cluster_size = s.cluster;
  o.refcount_bits = s.refcount_bits;
  o.extended_l2 = s.extended_l2;
  if (backing) {
    o.backing_file = backing;
    o.backing_format = "raw";
  }
  return loop.run(Qcow2Device::create(**f, o));
}

void write_model(const std::string& path, const std::vector<std::byte>& model) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(model.data()), static_cast<std::streamsize>(model.size()));
}

class Qcow2WriteTest : public ::testing::TestWithParam<Shape> {};

// Runs a fixed script of operations through our driver and checks the result
// with qemu-img.
TEST_P(Qcow2WriteTest, ScriptedOpsPassQemuImgCheckAndCompare) {
  const Shape s = GetParam();
  TempDir dir;
  const std::string img = dir / "a.qcow2";
  const uint64_t size = 8 << 20;
  Loop loop;
  ASSERT_TRUE(make_image(loop, s, img, size));
  std::vector<std::byte> model(size);
  {
    auto dev = open_qcow2(loop, img);
    ASSERT_TRUE(dev) << dev.error().message();
    Qcow2Device& q = **dev;
    EXPECT_TRUE(q.caps().zero_init);
    EXPECT_EQ(q.caps().cluster_size, s.cluster);
    auto fill = [&](uint64_t off, uint64_t len, int pattern) {
      std::vector<std::byte> b(len, std::byte(pattern));
      auto r = loop.run(q.write(off, b, {}));
      ASSERT_TRUE(r) << r.error().message();
      std::fill_n(model.begin() + off, len, std::byte(pattern));
    };
    auto zero = [&](uint64_t off, uint64_t len, bool unmap) {
      auto r = loop.run(q.write_zeroes(off, len, ZeroFlags{.may_unmap = unmap}));
      ASSERT_TRUE(r) << r.error().message();
      std::fill_n(model.begin() + off, len, std::byte{0});
    };
    auto discard = [&](uint64_t off, uint64_t len) {
      auto r = loop.run(q.discard(off, len));
      ASSERT_TRUE(r) << r.error().message();
      // Whole clusters read as zeroes now (no backing); partial ones are unchanged.
      uint64_t a = (off + s.cluster - 1) / s.cluster * s.cluster,
               b = (off + len) / s.cluster * s.cluster;
      if (a < b) std::fill(model.begin() + a, model.begin() + b, std::byte{0});
    };
    fill(0, 4096, 1);
    fill(4096 * 3 + 17, 100000, 2);
    fill(1 << 20, 1 << 20, 3);
    fill((1 << 20) + 5000, 3000, 4);  // in place
    zero(1 << 20, 300000, false);
    zero(1536 << 10, 1 << 19, true);
    discard(5 << 20, 1 << 20);
    fill(5 << 20, 1000, 5);
    fill(size - 777, 777, 6);
    discard(4 << 20, 100);  // partial: nothing
    zero(size - 10, 10, false);
    ASSERT_TRUE(loop.run(q.flush()));
    fill(3 << 20, 2 << 20, 7);
    discard(3 << 20, 1 << 20);
    auto got = loop.run(read_all(q));
    ASSERT_TRUE(got);
    EXPECT_EQ(first_diff(*got, model), -1);
    ASSERT_TRUE(loop.run(q.close()));
  }
  EXPECT_EQ(qemu_check(img), "");
  write_model(dir / "model.raw", model);
  auto cmp = sh(fmt::format("qemu-img compare -U -f qcow2 -F raw {} {}", img, dir / "model.raw"));
  EXPECT_EQ(cmp.status, 0) << cmp.out;
  // And read back through a fresh open.
  auto dev = open_qcow2(loop, img, true);
  ASSERT_TRUE(dev);
  auto got = loop.run(read_all(**dev));
  ASSERT_TRUE(got);
  EXPECT_EQ(first_diff(*got, model), -1);
}

// Random writes, zeroes, discards and flushes of random sizes and alignments,
// many at once (overlapping too), against a model.
TEST_P(Qcow2WriteTest, RandomConcurrentOpsMatchModel) {
  const Shape s = GetParam();
  const int seeds = s.cluster <= 4096 ? 2 : 3;
  for (int seed = 1; seed <= seeds; ++seed) {
    SCOPED_TRACE(seed);
    TempDir dir;
    const std::string img = dir / "r.qcow2";
    const uint64_t size = (6 << 20) + 512 * (seed % 3);
    Loop loop;
    ASSERT_TRUE(make_image(loop, s, img, size));
    std::vector<std::byte> model(size);
    auto dev = open_qcow2(loop, img);
    ASSERT_TRUE(dev) << dev.error().message();
    Qcow2Device& q = **dev;
    std::mt19937_64 rng(seed * 7919 + s.cluster);
    // A batch of requests runs concurrently; requests inside a batch do not
    // overlap each other's bytes unless they write the same data, so the model
    // is exact. Overlap at cluster granularity is the point.
    for (int batch = 0; batch < 25; ++batch) {
      struct Op {
        int kind;  // 0 write, 1 zero, 2 zero+unmap, 3 discard, 4 flush
        uint64_t off, len;
        std::vector<std::byte> data;
      };
      std::vector<Op> ops;
      std::vector<std::pair<uint64_t, uint64_t>> taken;
      for (int i = 0; i < 8; ++i) {
        Op op;
        op.kind = static_cast<int>(rng() % 10);
        op.kind = op.kind < 6 ? 0 : op.kind - 5;
        if (op.kind > 4) op.kind = 0;
        uint64_t maxlen = rng() % 4 == 0 ? (600 << 10) : 20000;
        op.len = 1 + rng() % maxlen;
        if (rng() % 2) op.len = (op.len + 511) / 512 * 512;
        op.off = rng() % (size - op.len + 1);
        if (rng() % 2) op.off = op.off / 512 * 512;
        if (op.off + op.len > size) op.len = size - op.off;
        // Discard changes whole clusters around it: keep those apart too.
        uint64_t lo = op.off / s.cluster * s.cluster,
                 hi = (op.off + op.len + s.cluster - 1) / s.cluster * s.cluster;
        bool clash = false;
        for (auto [a, b] : taken) clash |= a < hi && lo < b;
        if (clash && op.kind != 4) continue;
        taken.emplace_back(op.kind == 3 ? lo : op.off, op.kind == 3 ? hi : op.off + op.len);
        if (op.kind == 0) {
          op.data.resize(op.len);
          uint8_t p = static_cast<uint8_t>(rng());
          for (uint64_t k = 0; k < op.len; ++k) op.data[k] = std::byte(p + k / 512);
        }
        ops.push_back(std::move(op));
      }
      int done = 0, failed = 0;
      auto run = [](Qcow2Device* q, Op* op, int* done, int* failed) -> Task<void> {
        Result<void> r;
        switch (op->kind) {
          case 0: r = co_await q->write(op->off, op->data, {}); break;
          case 1: r = co_await q->write_zeroes(op->off, op->len, {}); break;
          case 2:
            r = co_await q->write_zeroes(op->off, op->len, ZeroFlags{.may_unmap = true});
            break;
          case 3: r = co_await q->discard(op->off, op->len); break;
          case 4: r = co_await q->flush(); break;
        }
        if (!r) {
          ADD_FAILURE() << r.error().message();
          ++*failed;
        }
        ++*done;
      };
      loop.run([&]() -> Task<void> {
        auto ex = co_await asio::this_coro::executor;
        for (auto& op : ops) asio::co_spawn(ex, run(&q, &op, &done, &failed), asio::detached);
        while (done < static_cast<int>(ops.size())) co_await yield_now();
      }());
      ASSERT_EQ(failed, 0);
      for (auto& op : ops) {
        if (op.kind == 0) std::copy(op.data.begin(), op.data.end(), model.begin() + op.off);
        if (op.kind == 1 || op.kind == 2) std::fill_n(model.begin() + op.off, op.len, std::byte{0});
        if (op.kind == 3) {
          uint64_t a = (op.off + s.cluster - 1) / s.cluster * s.cluster;
          uint64_t b = op.off + op.len == size ? size : (op.off + op.len) / s.cluster * s.cluster;
          if (a < b) std::fill(model.begin() + a, model.begin() + b, std::byte{0});
        }
      }
      if (batch % 5 == 4) {
        auto got = loop.run(read_all(q));
        ASSERT_TRUE(got);
        ASSERT_EQ(first_diff(*got, model), -1) << "batch " << batch;
      }
    }
    ASSERT_TRUE(loop.run(q.close()));
    EXPECT_EQ(qemu_check(img), "");
    write_model(dir / "model.raw", model);
    auto cmp = sh(fmt::format("qemu-img compare -U -f qcow2 -F raw {} {}", img, dir / "model.raw"));
    EXPECT_EQ(cmp.status, 0) << cmp.out;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, Qcow2WriteTest,
    ::testing::Values(Shape{3, 65536, 16, false, true}, Shape{3, 65536, 16, false, false},
                      Shape{2, 65536, 16, false, true}, Shape{2, 4096, 16, false, false},
                      Shape{3, 512, 16, false, false}, Shape{3, 4096, 1, false, true},
                      Shape{3, 65536, 64, false, false}, Shape{3, 2 << 20, 16, false, true},
                      Shape{3, 65536, 16, true, true}, Shape{3, 16384, 2, true, false},
                      // Outgrows its refcount table (64 entries of 64 blocks of 64 clusters).
                      Shape{3, 512, 64, false, true}),
    shape_name);

}  // namespace
}  // namespace blkmirror::test
