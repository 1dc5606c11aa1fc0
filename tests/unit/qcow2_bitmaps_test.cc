// qcow2 bitmaps extension: the format (bitmaps.h: extension, directory, table
// entries, data clusters) round trip and its refusals; the device's load,
// store, in-use marking and removal against qemu-img (bitmap --add/--merge,
// info, check).
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <random>

#include "blockdev/qcow2/bitmaps.h"
#include "blockdev/qcow2/header.h"
#include "power_cut_file.h"
#include "qcow2_util.h"

namespace blkmirror::test {
namespace {

using namespace qcow2;

const BitmapGeometry kGeo{65536, 64ull << 20};

std::vector<BitmapDirEntry> two_entries() {
  BitmapDirEntry a{.table_offset = 0x30000,
                   .table_size = 1,
                   .flags = kBitmapAuto,
                   .granularity_bits = 16,
                   .name = "a"};
  BitmapDirEntry b{.table_offset = 0x50000,
                   .table_size = 1,
                   .flags = kBitmapInUse,
                   .granularity_bits = 9,
                   .name = std::string(1023, 'n')};
  return {a, b};
}

TEST(Qcow2BitmapFormat, ExtensionRoundTripAndRefusals) {
  BitmapsExtension e{3, 200, 0x20000};
  auto bytes = encode_bitmaps_extension(e);
  ASSERT_EQ(bytes.size(), 24u);
  auto back = parse_bitmaps_extension(bytes, 65536);
  ASSERT_TRUE(back) << back.error().message();
  EXPECT_EQ(back->nb_bitmaps, 3u);
  EXPECT_EQ(back->directory_size, 200u);
  EXPECT_EQ(back->directory_offset, 0x20000u);

  auto refuse = [](std::vector<std::byte> b, const std::string& text) {
    auto r = parse_bitmaps_extension(b, 65536);
    ASSERT_FALSE(r);
    EXPECT_EQ(r.error().message(), text);
  };
  refuse(std::vector<std::byte>(16), "bitmaps_ext: Invalid extension length");
  auto reserved = bytes;
  reserved[5] = std::byte{1};
  refuse(reserved, "bitmaps_ext: Reserved field is not zero");
  refuse(encode_bitmaps_extension({0, 200, 0x20000}), "found bitmaps extension with zero bitmaps");
  refuse(encode_bitmaps_extension({70000, 200, 0x20000}),
         "bitmaps_ext: Image has 70000 bitmaps, exceeding the QEMU supported maximum of 65535");
  refuse(encode_bitmaps_extension({1, 200, 0x20200}),
         "bitmaps_ext: invalid bitmap directory offset");
  refuse(encode_bitmaps_extension({1, 1ull << 30, 0x20000}),
         "bitmaps_ext: bitmap directory size (1073741824) exceeds the maximum supported size "
         "(67107840)");
}

TEST(Qcow2BitmapFormat, DirectoryRoundTrip) {
  auto entries = two_entries();
  auto bytes = encode_bitmap_directory(entries, kGeo);
  ASSERT_TRUE(bytes) << bytes.error().message();
  EXPECT_EQ(bytes->size(), bitmap_dir_entry_bytes(1) + bitmap_dir_entry_bytes(1023));
  auto back = parse_bitmap_directory(*bytes, {2, bytes->size(), 0x10000}, kGeo);
  ASSERT_TRUE(back) << back.error().message();
  ASSERT_EQ(back->size(), 2u);
  EXPECT_EQ((*back)[0].name, "a");
  EXPECT_TRUE((*back)[0].enabled());
  EXPECT_FALSE((*back)[0].in_use());
  EXPECT_EQ((*back)[1].name, std::string(1023, 'n'));
  EXPECT_TRUE((*back)[1].in_use());
  EXPECT_EQ((*back)[1].granularity(), 512u);
  EXPECT_EQ((*back)[1].table_offset, 0x50000u);
}

// Each corruption of a good directory is refused with a clear line.
TEST(Qcow2BitmapFormat, CorruptDirectoriesAreRefused) {
  auto good = *encode_bitmap_directory(two_entries(), kGeo);
  const BitmapsExtension ext{2, good.size(), 0x10000};
  auto expect = [&](std::vector<std::byte> b, BitmapsExtension x, const std::string& text) {
    auto r = parse_bitmap_directory(b, x, kGeo);
    ASSERT_FALSE(r) << text;
    EXPECT_EQ(r.error().message(), text);
  };
  expect(std::vector<std::byte>(good.begin(), good.begin() + 40), ext, "Broken bitmap directory");
  expect(good, {1, good.size(), 0x10000}, "More bitmaps found than specified in header extension");
  expect(good, {3, good.size(), 0x10000}, "Less bitmaps found than specified in header extension");
  auto flags = good;
  flags[15] = std::byte{0x06};  // extra_data_compatible: not understood
  expect(flags, ext, "Bitmap 'a' doesn't satisfy the constraints");
  auto type = good;
  type[16] = std::byte{2};
  expect(type, ext, "Bitmap 'a' doesn't satisfy the constraints");
  auto gran = good;
  gran[17] = std::byte{8};
  expect(gran, ext, "Bitmap 'a' doesn't satisfy the constraints");
  auto extra = good;
  extra[23] = std::byte{8};
  expect(extra, ext, "Bitmap extra data is not supported");
  auto table = good;
  table[11] = std::byte{2};  // a consistent bitmap's table must fit its data exactly
  expect(table, ext, "Bitmap 'a' doesn't satisfy the constraints");
  auto unaligned = good;
  unaligned[6] = std::byte{0x01};
  expect(unaligned, ext, "Bitmap 'a' doesn't satisfy the constraints");
  auto pad = good;
  pad[25] = std::byte{'x'};
  expect(pad, ext, "Bitmap 'a': directory entry padding is not zero");
  auto noname = good;
  noname[19] = std::byte{0};
  expect(noname, ext, "Bitmap '' doesn't satisfy the constraints");
  auto dup = two_entries();
  dup[1].name = "a";
  auto dup_bytes = *encode_bitmap_directory(dup, kGeo);
  expect(dup_bytes, {2, dup_bytes.size(), 0x10000}, "Bitmap already exists: a");
  // In use or not, a bitmap whose bits for the disk would not fit in memory
  // (2^50 bytes at 512 per bit) is refused, not allocated.
  const BitmapGeometry huge{65536, 1ull << 50};
  auto big = two_entries();
  big.resize(2);
  auto big_bytes = *encode_bitmap_directory({big[1]}, kGeo);
  auto r = parse_bitmap_directory(big_bytes, {1, big_bytes.size(), 0x10000}, huge);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().message(), "Bitmap '" + big[1].name + "' doesn't satisfy the constraints");
  // An in-use bitmap may have a stale table size (a resize it did not see).
  auto stale = two_entries();
  stale[1].table_size = 7;
  EXPECT_TRUE(encode_bitmap_directory(stale, kGeo));
}

TEST(Qcow2BitmapFormat, TableEntriesAndConstraints) {
  EXPECT_TRUE(check_bitmap_table_entry(0, 65536));
  EXPECT_TRUE(check_bitmap_table_entry(1, 65536));  // all ones
  EXPECT_TRUE(check_bitmap_table_entry(0x30000, 65536));
  EXPECT_FALSE(check_bitmap_table_entry(0x30001, 65536));
  EXPECT_FALSE(check_bitmap_table_entry(0x30200, 65536));
  EXPECT_FALSE(check_bitmap_table_entry(1ull << 60, 65536));
  EXPECT_FALSE(check_bitmap_table_entry(0x30002, 65536));
  EXPECT_EQ(check_bitmap_constraints(kGeo, "x", 256).error().message(),
            "Granularity is under minimum (512 bytes)");
  EXPECT_EQ(check_bitmap_constraints(kGeo, "x", 1ull << 32).error().message(),
            "Granularity exceeds maximum (2147483648 bytes)");
  EXPECT_EQ(check_bitmap_constraints(kGeo, std::string(1024, 'x'), 65536).error().message(),
            "Name length exceeds maximum (1023 characters)");
  EXPECT_EQ(check_bitmap_constraints({512, 1ull << 50}, "x", 512).error().message(),
            "Too much space will be occupied by the bitmap. Use larger granularity");
  // 64 MiB at 64 KiB: 1024 bits, 128 bytes, one cluster.
  EXPECT_EQ(bitmap_table_entries(kGeo, 65536), 1u);
  EXPECT_EQ(bitmap_table_entries({512, 64ull << 20}, 512), 32u);
}

TEST(Qcow2BitmapFormat, DataClustersRoundTripAgainstAModel) {
  std::mt19937_64 rng(13);
  for (int round = 0; round < 20; ++round) {
    const uint64_t cs = 512u << (rng() % 3);
    const uint64_t nbits = 1 + rng() % (cs * 8 * 3);
    DirtyBitmap bits(nbits);
    std::vector<bool> model(nbits);
    for (int k = 0; k < 10; ++k) {
      uint64_t s = rng() % nbits, n = 1 + rng() % 300;
      bits.set(s, n);
      for (uint64_t i = s; i < std::min(nbits, s + n); ++i) model[i] = true;
    }
    DirtyBitmap back(nbits);
    const uint64_t clusters = (nbits + cs * 8 - 1) / (cs * 8);
    std::vector<std::byte> buf(cs);
    for (uint64_t c = 0; c < clusters; ++c) {
      if (!bitmap_cluster_dirty(bits, c, cs)) continue;
      store_bitmap_cluster(bits, c, buf);
      ASSERT_TRUE(load_bitmap_cluster(buf, c, back));
    }
    for (uint64_t i = 0; i < nbits; ++i) ASSERT_EQ(back.test(i), model[i]) << i;
    // The on-disk layout: bit i of the bitmap is bit i % 8 of byte i / 8.
    if (bits.test(0) && bitmap_cluster_dirty(bits, 0, cs)) {
      store_bitmap_cluster(bits, 0, buf);
      EXPECT_EQ(static_cast<uint8_t>(buf[0]) & 1, 1);
    }
  }
}

// --- The device, against qemu-img.

std::string q(const std::string& s) { return "'" + s + "'"; }

nlohmann::json info_bitmaps(const std::string& path) {
  auto r = sh("qemu-img info -U --output=json " + q(path));
  auto j = nlohmann::json::parse(r.out, nullptr, false);
  if (j.is_discarded() || !j.contains("format-specific")) return nlohmann::json::array();
  return j["format-specific"]["data"].value("bitmaps", nlohmann::json::array());
}

// A 4 MiB qcow2 image at `img` holding one bitmap "b", both made by qemu-img.
bool make_image_with_bitmap(const std::string& img) {
  return sh("qemu-img create -q -f qcow2 " + q(img) + " 4M").status == 0 &&
         sh("qemu-img bitmap --add " + q(img) + " b").status == 0;
}

NamedBitmap* find(std::vector<NamedBitmap>& v, const std::string& name) {
  for (auto& b : v)
    if (b.name() == name) return &b;
  return nullptr;
}

TEST(Qcow2Bitmaps, ReadsWhatQemuImgWroteAndQemuReadsWhatWeStore) {
  TempDir dir;
  const std::string img = dir / "a.qcow2";
  ASSERT_EQ(sh("qemu-img create -q -f qcow2 " + q(img) + " 16M").status, 0);
  ASSERT_EQ(sh("qemu-img bitmap --add -g 65536 " + q(img) + " b0").status, 0);
  ASSERT_EQ(sh("qemu-io -c 'write 1M 64k' -c 'write 5M 1' " + q(img)).status, 0);
  ASSERT_EQ(sh("qemu-img bitmap --add --disable " + q(img) + " off").status, 0);
  Loop loop;
  {
    auto dev = open_qcow2(loop, img);
    ASSERT_TRUE(dev) << dev.error().message();
    // A writable open marks them in use before anything else.
    for (auto& b : info_bitmaps(img))
      EXPECT_NE(b["flags"].dump().find("in-use"), std::string::npos) << b.dump();
    auto loaded = loop.run((*dev)->load_bitmaps());
    ASSERT_TRUE(loaded) << loaded.error().message();
    ASSERT_EQ(loaded->size(), 2u);
    NamedBitmap* b0 = find(*loaded, "b0");
    ASSERT_TRUE(b0);
    EXPECT_TRUE(b0->enabled);
    EXPECT_TRUE(b0->persistent);
    EXPECT_FALSE(b0->inconsistent);
    EXPECT_EQ(b0->count(), 2u * 65536);
    EXPECT_EQ(b0->next_dirty(0), (std::pair<uint64_t, uint64_t>{1 << 20, 65536}));
    EXPECT_EQ(b0->next_dirty(2 << 20), (std::pair<uint64_t, uint64_t>{5 << 20, 65536}));
    NamedBitmap* off = find(*loaded, "off");
    ASSERT_TRUE(off);
    EXPECT_FALSE(off->enabled);
    EXPECT_EQ(off->count(), 0u);
    // We change them and add one, then store and close.
    b0->mark(8 << 20, 4096);
    BitmapSet set;
    for (auto& b : *loaded) set.adopt(std::move(b));
    set.remove("off");
    ASSERT_TRUE((*dev)->can_store_bitmap(set, "new", 4096));
    NamedBitmap& n = set.add("new", 4096, 16 << 20);
    n.persistent = true;
    n.mark(0, 10000);
    ASSERT_TRUE(loop.run((*dev)->store_bitmaps(set)));
    ASSERT_TRUE(loop.run((*dev)->close()));
  }
  EXPECT_EQ(qemu_check(img), "");
  auto bitmaps = info_bitmaps(img);
  ASSERT_EQ(bitmaps.size(), 2u) << bitmaps.dump();
  EXPECT_EQ(bitmaps[0]["name"], "b0");
  EXPECT_EQ(bitmaps[0]["flags"], nlohmann::json::array({"auto"}));
  EXPECT_EQ(bitmaps[1]["name"], "new");
  EXPECT_EQ(bitmaps[1]["granularity"], 4096);
  // QEMU reads the bits: merge them into a new bitmap and export its map.
  ASSERT_EQ(sh("qemu-img bitmap --add " + q(img) + " sum").status, 0);
  ASSERT_EQ(sh("qemu-img bitmap --merge b0 " + q(img) + " sum").status, 0);
  auto map =
      sh("nbdinfo --map=qemu:dirty-bitmap:b0 -- [ qemu-nbd -r -f qcow2 -B b0 " + q(img) + " ]");
  EXPECT_NE(map.out.find("1048576       65536    1  dirty"), std::string::npos) << map.out;
  EXPECT_NE(map.out.find("5242880       65536    1  dirty"), std::string::npos) << map.out;
  EXPECT_NE(map.out.find("8388608       65536    1  dirty"), std::string::npos) << map.out;
  auto nmap =
      sh("nbdinfo --map=qemu:dirty-bitmap:new -- [ qemu-nbd -r -f qcow2 -B new " + q(img) + " ]");
  EXPECT_NE(nmap.out.find("0       12288    1  dirty"), std::string::npos) << nmap.out;
  EXPECT_EQ(qemu_check(img), "");
}

TEST(Qcow2Bitmaps, AWriterThatDiesLeavesThemInUseAndTheyLoadInconsistent) {
  TempDir dir;
  const std::string img = dir / "a.qcow2";
  ASSERT_TRUE(make_image_with_bitmap(img));
  Loop loop;
  {
    auto dev = open_qcow2(loop, img);
    ASSERT_TRUE(dev);
    std::vector<std::byte> data(4096, std::byte{1});
    ASSERT_TRUE(loop.run((*dev)->write(0, data, {})));
    ASSERT_TRUE(loop.run((*dev)->flush()));
    // No close: the process "died" here.
  }
  auto bitmaps = info_bitmaps(img);
  ASSERT_EQ(bitmaps.size(), 1u);
  EXPECT_NE(bitmaps[0]["flags"].dump().find("in-use"), std::string::npos);
  {
    auto dev = open_qcow2(loop, img);
    ASSERT_TRUE(dev);
    auto loaded = loop.run((*dev)->load_bitmaps());
    ASSERT_TRUE(loaded);
    ASSERT_EQ(loaded->size(), 1u);
    EXPECT_TRUE((*loaded)[0].inconsistent);
    // Stored as found (still in use) at a clean close; removable.
    BitmapSet set;
    set.adopt(std::move((*loaded)[0]));
    ASSERT_TRUE(loop.run((*dev)->store_bitmaps(set)));
    EXPECT_TRUE((*dev)->stored_bitmaps().at(0).in_use);
    ASSERT_TRUE(loop.run((*dev)->remove_bitmap("b")));
    EXPECT_TRUE((*dev)->stored_bitmaps().empty());
    ASSERT_TRUE(loop.run((*dev)->close()));
  }
  EXPECT_EQ(info_bitmaps(img).size(), 0u);
  EXPECT_EQ(qemu_check(img), "");
}

TEST(Qcow2Bitmaps, AnUnwrittenImageClosedWithoutStoringKeepsThemConsistent) {
  TempDir dir;
  const std::string img = dir / "a.qcow2";
  ASSERT_TRUE(make_image_with_bitmap(img));
  Loop loop;
  {
    auto dev = open_qcow2(loop, img);
    ASSERT_TRUE(dev);
    ASSERT_TRUE(loop.run((*dev)->close()));
  }
  EXPECT_EQ(info_bitmaps(img)[0]["flags"], nlohmann::json::array({"auto"}));
  {
    // Written but never stored: they did not record the write.
    auto dev = open_qcow2(loop, img);
    ASSERT_TRUE(dev);
    std::vector<std::byte> data(512, std::byte{1});
    ASSERT_TRUE(loop.run((*dev)->write(0, data, {})));
    ASSERT_TRUE(loop.run((*dev)->close()));
  }
  EXPECT_NE(info_bitmaps(img)[0]["flags"].dump().find("in-use"), std::string::npos);
  EXPECT_EQ(qemu_check(img), "");
}

TEST(Qcow2Bitmaps, ImagesWithBitmapsWeDoNotUnderstandAreRefusedUntouched) {
  TempDir dir;
  const std::string img = dir / "a.qcow2";
  ASSERT_TRUE(make_image_with_bitmap(img));
  // Set flag bit 2 (extra_data_compatible) in the directory entry.
  Loop loop;
  auto h = parse_header(read_file(img), "img");
  ASSERT_TRUE(h);
  uint64_t dir_off = 0;
  for (auto& e : h->extensions)
    if (e.type == kExtBitmaps) dir_off = load_be64(&e.data[16]);
  ASSERT_NE(dir_off, 0u);
  auto before = read_file(img);
  ASSERT_EQ(sh(fmt::format("printf '\\006' | dd of={} bs=1 seek={} conv=notrunc status=none", img,
                           dir_off + 15))
                .status,
            0);
  auto changed = read_file(img);
  auto dev = open_qcow2(loop, img);
  ASSERT_FALSE(dev);
  EXPECT_NE(dev.error().message().find("Bitmap 'b' doesn't satisfy the constraints"),
            std::string::npos)
      << dev.error().message();
  EXPECT_EQ(read_file(img), changed);  // not one byte written
  EXPECT_NE(before, changed);
}

// A bitmap table pointing outside the file fails the load with a clear line;
// the image is not marked corrupt (its guest data is fine) and is not written
// by a read-only open.
TEST(Qcow2Bitmaps, ABadBitmapTableFailsTheLoadWithoutMarkingTheImageCorrupt) {
  TempDir dir;
  const std::string img = dir / "a.qcow2";
  ASSERT_TRUE(make_image_with_bitmap(img));
  ASSERT_EQ(sh("qemu-io -c 'write 0 4k' " + q(img)).status, 0);
  auto bytes = read_file(img);
  auto h = parse_header(bytes, "img");
  ASSERT_TRUE(h);
  uint64_t dir_off = 0;
  for (auto& e : h->extensions)
    if (e.type == kExtBitmaps) dir_off = load_be64(&e.data[16]);
  const uint64_t table = load_be64(&bytes[dir_off]);
  ASSERT_EQ(sh(fmt::format("printf '\\000\\000\\000\\001\\000\\000\\000\\000' | dd "
                           "of={} bs=1 seek={} conv=notrunc status=none",
                           img, table))
                .status,
            0);
  const auto patched = read_file(img);
  Loop loop;
  for (bool ro : {true, false}) {
    auto dev = open_qcow2(loop, img, ro);
    ASSERT_TRUE(dev) << dev.error().message();
    auto l = loop.run((*dev)->load_bitmaps());
    ASSERT_FALSE(l);
    EXPECT_NE(l.error().message().find("Could not read bitmap 'b' from image: data cluster "
                                       "0x100000000 lies past the end of the file"),
              std::string::npos)
        << l.error().message();
    EXPECT_FALSE((*dev)->info().corrupt);
    ASSERT_TRUE(loop.run((*dev)->close()));
    if (ro) EXPECT_EQ(read_file(img), patched);
  }
  auto info = sh("qemu-img info " + q(img));
  EXPECT_NE(info.out.find("corrupt: false"), std::string::npos) << info.out;
}

// A power cut at any moment of the in-use marking at open, guest writes, and
// the store at close leaves an image qemu-img check accepts (leaks allowed)
// whose bitmaps are each either as they were, in use (inconsistent), or as
// stored: never a consistent bitmap with other bits.
TEST(Qcow2Bitmaps, PowerCutsLeaveOldInUseOrNewBitmapsNeverWrongOnes) {
  TempDir dir;
  const std::string base = dir / "base.qcow2";
  ASSERT_EQ(sh("qemu-img create -q -f qcow2 -o cluster_size=4096 " + q(base) + " 2M").status, 0);
  ASSERT_EQ(sh("qemu-img bitmap --add -g 4096 " + q(base) + " b").status, 0);
  ASSERT_EQ(sh("qemu-io -c 'write 0 4k' " + q(base)).status, 0);  // b: block 0
  auto file = std::make_shared<PowerCutFile>(read_file(base));
  std::mt19937_64 rng(5);
  std::vector<std::string> snaps;
  file->on_op = [&] {
    const std::string path = dir / fmt::format("crash{}.qcow2", snaps.size());
    auto img = file->crash_image(rng);
    std::ofstream f(path, std::ios::binary);
    f.write(reinterpret_cast<const char*>(img.data()), static_cast<std::streamsize>(img.size()));
    snaps.push_back(path);
  };
  {
    Loop loop;
    auto dev = loop.run(Qcow2Device::open(loop, file, nullptr, {}));
    ASSERT_TRUE(dev) << dev.error().message();
    auto loaded = loop.run((*dev)->load_bitmaps());
    ASSERT_TRUE(loaded);
    BitmapSet set;
    for (auto& b : *loaded) set.adopt(std::move(b));
    NamedBitmap& n = set.add("n", 4096, 2 << 20);
    n.persistent = true;
    std::vector<std::byte> buf(4096, std::byte{9});
    for (uint64_t blk : {7u, 100u, 300u}) {
      ASSERT_TRUE(loop.run((*dev)->write(blk * 4096, buf, {})));
      set.record(blk * 4096, 4096);
    }
    ASSERT_TRUE(loop.run((*dev)->store_bitmaps(set)));
    ASSERT_TRUE(loop.run((*dev)->close()));
    file->on_op = nullptr;
  }
  ASSERT_GT(snaps.size(), 10u);
  const std::vector<uint64_t> b_old = {0}, b_new = {0, 7, 100, 300}, n_new = {7, 100, 300};
  for (const std::string& path : snaps) {
    SCOPED_TRACE(path);
    auto check = sh("qemu-img check -f qcow2 " + q(path));
    ASSERT_TRUE(check.status == 0 || check.status == 3) << check.out;
    Loop loop;
    auto dev = open_qcow2(loop, path, true);
    ASSERT_TRUE(dev) << dev.error().message();
    auto loaded = loop.run((*dev)->load_bitmaps());
    ASSERT_TRUE(loaded) << loaded.error().message();
    ASSERT_TRUE(find(*loaded, "b"));
    for (auto& bm : *loaded) {
      if (bm.inconsistent) continue;
      std::vector<uint64_t> got;
      for (auto r = bm.next_dirty(0); r; r = bm.next_dirty(r->first + r->second))
        for (uint64_t o = r->first; o < r->first + r->second; o += 4096) got.push_back(o / 4096);
      if (bm.name() == "b")
        EXPECT_TRUE(got == b_old || got == b_new) << got.size();
      else
        EXPECT_EQ(got, n_new);
    }
    ::unlink(path.c_str());
  }
}

}  // namespace
}  // namespace blkmirror::test
