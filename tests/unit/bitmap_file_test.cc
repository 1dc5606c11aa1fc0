// The raw image's side file (journal/bitmap_file.h): encode/parse round trip,
// each corruption refused with its line, and the store's semantics: in use
// while open writable, inconsistent after a crash or a foreign write, stored
// and removed.
#include "journal/bitmap_file.h"

#include <gtest/gtest.h>
#include <xxhash.h>

#include <fstream>

#include "qcow2_util.h"

namespace blkmirror::test {
namespace {

BitmapFileContents sample() {
  BitmapFileContents c;
  c.stamp = {1, 2, 4096 * 100, 12345};
  c.entries.push_back({"a", 4096, false, true, std::vector<std::byte>(13, std::byte{0x81})});
  c.entries.push_back({"in-use", 65536, true, false, {}});
  return c;
}

TEST(BitmapFile, RoundTrip) {
  auto bytes = encode_bitmap_file(sample());
  EXPECT_EQ(bytes.size() % 8, 0u);
  auto back = parse_bitmap_file(bytes);
  ASSERT_TRUE(back) << back.error().message();
  EXPECT_EQ(back->stamp, sample().stamp);
  ASSERT_EQ(back->entries.size(), 2u);
  EXPECT_EQ(back->entries[0].name, "a");
  EXPECT_EQ(back->entries[0].granularity, 4096u);
  EXPECT_TRUE(back->entries[0].enabled);
  EXPECT_EQ(back->entries[0].data, sample().entries[0].data);
  EXPECT_TRUE(back->entries[1].in_use);
  EXPECT_FALSE(back->entries[1].enabled);
}

TEST(BitmapFile, CorruptionsAreRefused) {
  const auto good = encode_bitmap_file(sample());
  auto expect = [](std::vector<std::byte> b, const std::string& text) {
    auto r = parse_bitmap_file(b);
    ASSERT_FALSE(r) << text;
    EXPECT_EQ(r.error().message(), text);
  };
  expect({}, "not a blkmirror bitmaps file");
  auto magic = good;
  magic[0] = std::byte{'X'};
  expect(magic, "not a blkmirror bitmaps file");
  auto version = good;
  version[8] = std::byte{2};
  expect(version, "version 2 (this blkmirror reads 1)");
  for (size_t at : {size_t{20}, size_t{60}, good.size() - 30, good.size() - 1}) {
    auto flip = good;
    flip[at] ^= std::byte{0x10};
    expect(flip, "checksum mismatch");
  }
  // Re-checksummed corruptions: the fields themselves are checked.
  auto c = sample();
  c.entries[0].data.resize(3);
  expect(encode_bitmap_file(c), "entry 0: 3 bytes of data, 13 expected");
  c = sample();
  c.entries[1].name = "a";
  expect(encode_bitmap_file(c), "entry 1: bitmap 'a' twice");
  c = sample();
  c.entries[0].granularity = 256;
  expect(encode_bitmap_file(c), "entry 0: granularity bits 8 out of range");
  c = sample();
  c.entries[0].name = "";
  expect(encode_bitmap_file(c), "entry 0: name of 0 bytes");
  // A data size no file could hold is refused before anything is allocated
  // (fuzz: a 2^52-byte resize).
  c = sample();
  c.stamp.length = uint64_t{1} << 62;
  auto huge = encode_bitmap_file(c);
  for (int i = 0; i < 8; ++i) huge[56 + 8 + i] = std::byte{0xff};
  const uint64_t sum = XXH64(huge.data(), huge.size() - 8, 0);
  for (int i = 0; i < 8; ++i) huge[huge.size() - 8 + i] = std::byte((sum >> (8 * i)) & 0xff);
  expect(huge, "entry 0: truncated");
  auto trunc = good;
  trunc.resize(good.size() - 16);
  expect(trunc, "checksum mismatch");
}

TEST(BitmapFile, StoreInUseCrashAndForeignWrites) {
  TempDir dir;
  const std::string img = dir / "a.img";
  ASSERT_EQ(sh("truncate -s 1M '" + img + "'").status, 0);
  Loop loop;
  {
    auto f = BitmapFile::open(img, true);
    ASSERT_TRUE(f) << f.error().message();
    EXPECT_TRUE(loop.run((*f)->load())->empty());
    BitmapSet set;
    NamedBitmap& b = set.add("b", 4096, 1 << 20);
    b.persistent = true;
    b.mark(8192, 100);
    set.add("temp", 4096, 1 << 20);  // not persistent: not stored
    ASSERT_TRUE(loop.run((*f)->store(set)));
  }
  ASSERT_TRUE(std::filesystem::exists(img + ".blkmirror-bitmaps"));
  {
    auto f = BitmapFile::open(img, true);  // marks it in use...
    ASSERT_TRUE(f);
    auto l = loop.run((*f)->load());
    ASSERT_EQ(l->size(), 1u);
    EXPECT_EQ((*l)[0].name(), "b");
    EXPECT_EQ((*l)[0].next_dirty(0), (std::pair<uint64_t, uint64_t>{8192, 4096}));
    EXPECT_FALSE((*l)[0].inconsistent);
    // ... and the process dies here.
  }
  {
    auto f = BitmapFile::open(img, false);
    auto l = loop.run((*f)->load());
    ASSERT_EQ(l->size(), 1u);
    EXPECT_TRUE((*l)[0].inconsistent);
    EXPECT_TRUE((*l)[0].read_only);
  }
  {
    auto f = BitmapFile::open(img, true);
    ASSERT_TRUE(loop.run((*f)->remove("b")));
    EXPECT_FALSE(std::filesystem::exists(img + ".blkmirror-bitmaps"));
    BitmapSet set;
    set.add("c", 65536, 1 << 20).persistent = true;
    ASSERT_TRUE(loop.run((*f)->store(set)));
  }
  // Another program writes the image: nothing stored can be trusted.
  ASSERT_EQ(sh("printf x | dd of='" + img + "' conv=notrunc status=none").status, 0);
  auto f = BitmapFile::open(img, false);
  auto l = loop.run((*f)->load());
  ASSERT_EQ(l->size(), 1u);
  EXPECT_TRUE((*l)[0].inconsistent);
  // A corrupt side file refuses the open, naming it.
  std::ofstream(img + ".blkmirror-bitmaps", std::ios::binary | std::ios::app) << "junk";
  auto bad = BitmapFile::open(img, true);
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().message(), img + ".blkmirror-bitmaps: checksum mismatch");
}

}  // namespace
}  // namespace blkmirror::test
