// qcow2: create() for each option combination, grow, set_backing_link,
// copy-on-write from a backing file, qemu-img map of what we wrote, and bad input.
#include <gtest/gtest.h>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "blockdev/qcow2/header.h"
#include "blockdev/qcow2/tables.h"
#include "qcow2_util.h"

namespace blkmirror::test {
namespace {

Result<void> create_image(Loop& loop, const std::string& path, const Qcow2CreateOptions& o) {
  if (auto r = FileDevice::create(path, 0); !r) return r;
  auto f = FileDevice::open(loop, path);
  if (!f) return make_error(f.error());
  return loop.run(Qcow2Device::create(**f, o));
}

nlohmann::json qemu_info(const std::string& path) {
  auto r = sh("qemu-img info -U --output=json '" + path + "'");
  return nlohmann::json::parse(r.out, nullptr, false);
}

TEST(Qcow2Create, EveryOptionCombinationPassesQemuImgCheck) {
  TempDir dir;
  Loop loop;
  ASSERT_EQ(sh("qemu-img create -q -f raw " + (dir / "base.raw") + " 4M").status, 0);
  int n = 0;
  for (uint32_t version : {2u, 3u})
    for (uint64_t cluster : {512ull, 4096ull, 65536ull, 2ull << 20})
      for (uint32_t rb : {1u, 16u, 64u})
        for (bool ext : {false, true})
          for (bool backing : {false, true})
            for (auto pre :
                 {Qcow2CreateOptions::Prealloc::kOff, Qcow2CreateOptions::Prealloc::kMetadata}) {
              if (version == 2 && (rb != 16 || ext)) continue;
              if (ext && cluster < 16384) continue;
              if (pre == Qcow2CreateOptions::Prealloc::kMetadata && (backing || rb != 16)) continue;
              // Keep the run short: odd refcount widths at one cluster size.
              if (rb != 16 && cluster != 65536) continue;
              Qcow2CreateOptions o;
              o.size = (3 << 20) + 512;
              o.version = version;
              o.cluster_size = cluster;
              o.refcount_bits = rb;
              o.extended_l2 = ext;
              o.prealloc = pre;
              if (backing) {
                o.backing_file = "base.raw";
                o.backing_format = "raw";
              }
              std::string path = dir / fmt::format("img{}.qcow2", n++);
              SCOPED_TRACE(path + fmt::format(" v{} c{} r{} ext{} b{} pre{}", version, cluster, rb,
                                              ext, backing, static_cast<int>(pre)));
              auto r = create_image(loop, path, o);
              ASSERT_TRUE(r) << r.error().message();
              EXPECT_EQ(qemu_check(path), "");
              auto info = qemu_info(path);
              ASSERT_FALSE(info.is_discarded());
              EXPECT_EQ(info["virtual-size"], o.size);
              EXPECT_EQ(info["cluster-size"], cluster);
              EXPECT_EQ(info["format-specific"]["data"]["compat"], version == 2 ? "0.10" : "1.1");
              if (version == 3) {
                EXPECT_EQ(info["format-specific"]["data"]["refcount-bits"], rb);
                EXPECT_EQ(info["format-specific"]["data"]["extended-l2"], ext);
              }
              if (backing) {
                EXPECT_EQ(info["backing-filename"], "base.raw");
                EXPECT_EQ(info["backing-filename-format"], "raw");
              }
              if (pre == Qcow2CreateOptions::Prealloc::kMetadata) {
                auto map = sh("qemu-img map -U --output=json " + path);
                auto m = nlohmann::json::parse(map.out, nullptr, false);
                ASSERT_FALSE(m.is_discarded()) << map.out;
                for (auto& e : m) EXPECT_TRUE(e["present"].get<bool>()) << map.out;
              }
              auto dev = open_qcow2(loop, path, true);
              ASSERT_TRUE(dev) << dev.error().message();
              EXPECT_EQ((*dev)->length(), o.size);
            }
}

TEST(Qcow2Create, RefusesBadOptionsWithOneLine) {
  TempDir dir;
  Loop loop;
  auto bad = [&](Qcow2CreateOptions o, const std::string& want) {
    auto r = create_image(loop, dir / "bad.qcow2", o);
    ASSERT_FALSE(r);
    EXPECT_NE(r.error().message().find(want), std::string::npos) << r.error().message();
    EXPECT_EQ(r.error().message().find('\n'), std::string::npos);
    std::filesystem::remove(dir / "bad.qcow2");
  };
  bad({.size = 1 << 20, .cluster_size = 3000}, "cluster size 3000");
  bad({.size = 1 << 20, .refcount_bits = 3}, "refcount bits 3");
  bad({.size = 1 << 20, .version = 2, .refcount_bits = 1}, "need version 3");
  bad({.size = 1 << 20, .cluster_size = 4096, .extended_l2 = true}, "16 KiB");
  bad({.size = 1 << 20, .backing_format = "raw"}, "needs a backing file");
}

TEST(Qcow2Grow, GrowsVirtualSizeAndL1AndKeepsData) {
  TempDir dir;
  Loop loop;
  const std::string path = dir / "g.qcow2";
  // 512-byte clusters: an L2 table maps 32 KiB, so growing 1 MiB -> 64 MiB moves the L1.
  ASSERT_TRUE(create_image(loop, path, {.size = 1 << 20, .cluster_size = 512}));
  auto dev = open_qcow2(loop, path);
  ASSERT_TRUE(dev);
  Qcow2Device& q = **dev;
  std::vector<std::byte> a(70000, std::byte{0x42});
  ASSERT_TRUE(loop.run(q.write(1000, a, {})));
  ASSERT_TRUE(loop.run(q.grow(64 << 20)));
  EXPECT_EQ(q.length(), 64u << 20);
  ASSERT_TRUE(loop.run(q.write((64 << 20) - 70000, a, {})));
  EXPECT_FALSE(loop.run(q.grow(1 << 20)));  // shrinking is refused
  ASSERT_TRUE(loop.run(q.close()));
  EXPECT_EQ(qemu_check(path), "");
  EXPECT_EQ(qemu_info(path)["virtual-size"], 64u << 20);
  // -r -U: q still holds the image (and its image lock) until it is destroyed.
  auto r = sh(
      fmt::format("qemu-io -r -U -f qcow2 -c 'read -P 0x42 1000 70000' -c 'read -P 0x42 {} 70000' "
                  "-c 'read -P 0 71000 1M' {}",
                  (64 << 20) - 70000, path));
  EXPECT_EQ(r.status, 0);
  EXPECT_EQ(r.out.find("Pattern verification failed"), std::string::npos) << r.out;
}

TEST(Qcow2BackingLink, SetBackingLinkShowsInQemuImgInfo) {
  TempDir dir;
  Loop loop;
  const std::string path = dir / "t.qcow2";
  ASSERT_EQ(
      sh(fmt::format(
             "qemu-img create -q -f qcow2 {} 1M && qemu-img create -q -f qcow2 -b {} -F qcow2 {}",
             dir / "b.qcow2", dir / "b.qcow2", path))
          .status,
      0);
  auto dev = open_qcow2(loop, path);
  ASSERT_TRUE(dev) << dev.error().message();
  ASSERT_TRUE(loop.run((*dev)->set_backing_link("other/base.img", "raw")));
  EXPECT_EQ((*dev)->info().backing_file, "other/base.img");
  ASSERT_TRUE(loop.run((*dev)->close()));
  auto info = qemu_info(path);
  EXPECT_EQ(info["backing-filename"], "other/base.img");
  EXPECT_EQ(info["backing-filename-format"], "raw");
  // The feature name table QEMU wrote is still there.
  auto bytes = read_file(path);
  auto h = qcow2::parse_header(bytes, path);
  ASSERT_TRUE(h) << h.error().message();
  bool table = false;
  for (auto& e : h->extensions) table |= e.type == qcow2::kExtFeatureTable;
  EXPECT_TRUE(table);
  // And removing the link (the first device let go first: one writer at a time).
  dev->reset();
  auto dev2 = open_qcow2(loop, path);
  ASSERT_TRUE(dev2);
  ASSERT_TRUE(loop.run((*dev2)->set_backing_link(std::nullopt, std::nullopt)));
  ASSERT_TRUE(loop.run((*dev2)->close()));
  EXPECT_FALSE(qemu_info(path).contains("backing-filename"));
}

TEST(Qcow2Chain, PartialWritesCopyFromBackingAndLeaveItAlone) {
  for (bool ext : {false, true}) {
    SCOPED_TRACE(ext);
    TempDir dir;
    Loop loop;
    const std::string base = dir / "base.raw", top = dir / "top.qcow2";
    ASSERT_EQ(sh(fmt::format("head -c 4194304 /dev/urandom > {}", base)).status, 0);
    auto before = read_file(base);
    ASSERT_EQ(sh(fmt::format("qemu-img create -q -f qcow2 -o extended_l2={} -b {} -F raw {}",
                             ext ? "on" : "off", base, top))
                  .status,
              0);
    auto b = FileDevice::open(loop, base, FileOptions{.read_only = true});
    ASSERT_TRUE(b);
    auto dev = open_qcow2(loop, top, false, *b);
    ASSERT_TRUE(dev);
    Qcow2Device& q = **dev;
    EXPECT_FALSE(q.caps().zero_init);
    auto model = before;
    std::vector<std::byte> d(5000, std::byte{7});
    for (uint64_t off : {100ull, 70000ull, 1048575ull, 4194304ull - 5000}) {
      ASSERT_TRUE(loop.run(q.write(off, d, {})));
      std::copy(d.begin(), d.end(), model.begin() + off);
    }
    ASSERT_TRUE(loop.run(q.write_zeroes(2 << 20, 65536, {})));
    std::fill_n(model.begin() + (2 << 20), 65536, std::byte{0});
    ASSERT_TRUE(loop.run(q.discard(3 << 20, 65536)));  // reads as zeroes, not as the base
    std::fill_n(model.begin() + (3 << 20), 65536, std::byte{0});
    auto got = loop.run(read_all(q));
    ASSERT_TRUE(got);
    EXPECT_EQ(first_diff(*got, model), -1);
    auto e = loop.run(q.block_status(200000, 100000));
    ASSERT_TRUE(e);
    EXPECT_EQ(e->depth, 2u);
    ASSERT_TRUE(loop.run(q.close()));
    EXPECT_EQ(qemu_check(top), "");
    EXPECT_EQ(first_diff(read_file(base), before), -1);
    ASSERT_EQ(sh(fmt::format("qemu-img convert -U -O raw {} {}", top, dir / "out.raw")).status, 0);
    EXPECT_EQ(first_diff(read_file(dir / "out.raw"), model), -1);
  }
}

TEST(Qcow2Map, ZeroClustersShowAsZeroAndDiscardedAsUnallocated) {
  TempDir dir;
  Loop loop;
  const std::string path = dir / "m.qcow2";
  ASSERT_TRUE(create_image(loop, path, {.size = 4 << 20}));
  auto dev = open_qcow2(loop, path);
  ASSERT_TRUE(dev);
  Qcow2Device& q = **dev;
  std::vector<std::byte> d(1 << 20, std::byte{9});
  ASSERT_TRUE(loop.run(q.write(0, d, {})));
  ASSERT_TRUE(loop.run(q.write_zeroes(0, 256 << 10, {})));
  ASSERT_TRUE(loop.run(q.write_zeroes(256 << 10, 256 << 10, ZeroFlags{.may_unmap = true})));
  ASSERT_TRUE(loop.run(q.discard(512 << 10, 256 << 10)));
  ASSERT_TRUE(loop.run(q.close()));
  uint64_t used = q.allocated_bytes();  // frees count once flushed
  EXPECT_EQ(qemu_check(path), "");
  auto m = nlohmann::json::parse(sh("qemu-img map -U --output=json " + path).out);
  auto at = [&](uint64_t off) {
    for (auto& e : m)
      if (e["start"].get<uint64_t>() <= off &&
          off < e["start"].get<uint64_t>() + e["length"].get<uint64_t>())
        return e;
    return nlohmann::json();
  };
  EXPECT_EQ(at(0)["zero"], true);
  EXPECT_EQ(at(0)["data"], false);
  EXPECT_EQ(at(0)["present"], true);
  EXPECT_EQ(at(300 << 10)["zero"], true);
  EXPECT_EQ(at(300 << 10)["present"], true);
  EXPECT_EQ(at(600 << 10)["present"], false);
  EXPECT_EQ(at(800 << 10)["data"], true);
  EXPECT_EQ(at(2 << 20)["present"], false);
  // Header, refcount table and block, L1, one L2 (5), the kept zero clusters
  // (0..256K: 4) and the data left (768K..1M: 4); unmapped and discarded ones are free.
  EXPECT_EQ(used, (5 + 4 + 4) * 65536u);
}

// --- Bad input: a clear one-line error, no crash, nothing written.

std::string bad_image_error(const std::string& path, bool read_only) {
  Loop loop;
  auto before = read_file(path);
  std::string msg;
  auto dev = open_qcow2(loop, path, read_only);
  if (!dev) {
    msg = dev.error().message();
  } else {
    auto got = loop.run(read_all(**dev));
    msg = got ? "" : got.error().message();
  }
  if (read_only) {
    EXPECT_EQ(first_diff(read_file(path), before), -1) << "the image changed";
  }
  EXPECT_EQ(msg.find('\n'), std::string::npos);
  return msg;
}

void patch(const std::string& path, uint64_t off, std::vector<uint8_t> bytes) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekp(static_cast<std::streamoff>(off));
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

std::vector<uint8_t> be64(uint64_t v) {
  std::vector<uint8_t> b(8);
  for (int i = 7; i >= 0; --i, v >>= 8) b[i] = v & 0xff;
  return b;
}

TEST(Qcow2BadInput, RefusedWithClearErrors) {
  TempDir dir;
  auto fresh = [&](const std::string& name) {
    std::string p = dir / name;
    EXPECT_EQ(
        sh(fmt::format(
               "qemu-img create -q -f qcow2 {} 4M && qemu-io -f qcow2 -c 'write -P 1 0 128k' {}", p,
               p))
            .status,
        0);
    return p;
  };
  {
    auto p = fresh("trunc.qcow2");
    ASSERT_EQ(::truncate(p.c_str(), 50), 0);
    EXPECT_NE(bad_image_error(p, true).find("truncated"), std::string::npos);
  }
  {
    auto p = fresh("l1.qcow2");
    patch(p, 40, be64(1ull << 40));  // l1_table_offset far past the end
    EXPECT_NE(bad_image_error(p, true).find("L1 table"), std::string::npos);
  }
  {
    auto p = fresh("bits.qcow2");
    patch(p, 20, {0, 0, 0, 40});
    EXPECT_EQ(bad_image_error(p, true),
              "qcow2 header of " + p + ": cluster_bits 40 out of range (9..21)");
  }
  {
    auto p = fresh("crypt.qcow2");
    patch(p, 32, {0, 0, 0, 2});
    EXPECT_NE(bad_image_error(p, true).find("encryption"), std::string::npos);
  }
  {
    auto p = fresh("incompat.qcow2");
    patch(p, 72, be64(1ull << 40));
    EXPECT_NE(bad_image_error(p, true).find("unsupported incompatible feature(s): bit 40"),
              std::string::npos);
  }
  {
    auto p = fresh("datafile.qcow2");
    patch(p, 72, be64(1ull << 2));
    EXPECT_NE(bad_image_error(p, true).find("external data file"), std::string::npos);
  }
  {
    // An L2 entry pointing into the header: read-only, nothing written.
    auto p = fresh("l2hdr.qcow2");
    Loop loop;
    // Find the L2 table via the L1 table.
    auto bytes = read_file(p);
    uint64_t l1 = qcow2::load_be64(&bytes[40]);
    uint64_t l2 = qcow2::load_be64(&bytes[l1]) & qcow2::kOffsetMask;
    patch(p, l2, be64((1ull << 63) | 0));  // cluster 0 mapped "at" offset 0
    patch(p, l2 + 8, be64((1ull << 63) | 0x200));  // unaligned
    std::string msg = bad_image_error(p, true);
    EXPECT_NE(msg.find("L2 entry for guest offset"), std::string::npos) << msg;
    EXPECT_NE(msg.find(p), std::string::npos) << msg;
    // Read-write: the image gets the corrupt bit, and refuses writes afterwards.
    auto dev = open_qcow2(loop, p, false);
    ASSERT_TRUE(dev);
    std::vector<std::byte> b(512);
    auto r = loop.run((*dev)->read(0, b));
    ASSERT_FALSE(r);
    EXPECT_NE(r.error().message().find("marked corrupt"), std::string::npos) << r.error().message();
    EXPECT_FALSE(loop.run((*dev)->write(1 << 20, b, {})));
    EXPECT_NE(sh("qemu-img info -U " + p).out.find("corrupt: true"), std::string::npos);
    dev->reset();  // one writer at a time (image locks)
    auto again = open_qcow2(loop, p, false);
    ASSERT_FALSE(again);
    EXPECT_NE(again.error().message().find("marked corrupt"), std::string::npos);
  }
  {
    // A refcount of 1 bit cannot count two references.
    std::string p = dir / "rc1.qcow2";
    ASSERT_EQ(sh(fmt::format("qemu-img create -q -f qcow2 -o refcount_bits=1 {} 1M", p)).status, 0);
    Loop loop;
    auto dev = open_qcow2(loop, p, false);
    ASSERT_TRUE(dev);
    ASSERT_TRUE(loop.run((*dev)->close()));
  }
}

TEST(Qcow2BadInput, RefcountBlockPastEndIsCorrupt) {
  TempDir dir;
  std::string p = dir / "rb.qcow2";
  ASSERT_EQ(sh(fmt::format("qemu-img create -q -f qcow2 {} 4M", p)).status, 0);
  auto bytes = read_file(p);
  uint64_t rt = qcow2::load_be64(&bytes[48]);
  patch(p, rt, be64(1ull << 40));
  std::string msg = bad_image_error(p, true);
  EXPECT_NE(msg.find("refcount block 0"), std::string::npos) << msg;
}

// Refcounts that call the header's cluster free: the first allocation would
// land on it (fuzz: a bitmap's data cluster written over the header). The
// write fails as corruption, and the header is intact.
TEST(Qcow2BadInput, FreeHeaderClusterIsNotAllocated) {
  TempDir dir;
  std::string p = dir / "rc0.qcow2";
  ASSERT_EQ(sh(fmt::format("qemu-img create -q -f qcow2 {} 4M", p)).status, 0);
  auto bytes = read_file(p);
  const uint64_t rt = qcow2::load_be64(&bytes[48]);
  const uint64_t block = qcow2::load_be64(&bytes[rt]);
  patch(p, block, {0, 0});  // cluster 0's 16-bit refcount
  Loop loop;
  auto dev = open_qcow2(loop, p, false);
  ASSERT_TRUE(dev) << dev.error().message();
  std::vector<std::byte> b(65536, std::byte{0x5a});
  auto r = loop.run((*dev)->write(0, b, {}));
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().message().find("holds the header but its refcount is 0"),
            std::string::npos)
      << r.error().message();
  dev->reset();
  EXPECT_EQ(std::memcmp(read_file(p).data(), "QFI\xfb", 4), 0) << "the header was overwritten";
}

}  // namespace
}  // namespace blkmirror::test
