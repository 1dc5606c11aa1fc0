// BitmapFile: the persistent dirty bitmaps of a raw image, kept in a side file
// next to it, IMAGE.blkmirror-bitmaps (docs/design/dirty-bitmaps.md,
// "Persistence"): a BitmapStore with the qcow2 extension's semantics (in-use
// marks, inconsistent after a crash) for images that have no room for them.
//
// Format (every integer little-endian, as the journal's state file):
//   0   magic "BLKMBMAP", u32 version (1), u32 zero
//   16  the image as it was at the last clean store: u64 st_dev, u64 st_ino,
//       u64 length, u64 mtime in nanoseconds
//   48  u32 count, u32 zero
//   56  count entries: u16 name length, u16 flags (bit 0 in use, bit 1
//       recording), u8 granularity bits (9..31), 3 zero bytes, u64 data bytes
//       (ceil(ceil(length / granularity) / 8), 0 when in use), the name,
//       zeroes to a multiple of 8
//   then each entry's data (bit i of the bitmap is bit i % 8 of byte i / 8,
//   as in qcow2), zeroes to a multiple of 8; last, the XXH64 of every byte
//   before it (the journal's header checksum).
// The file is only ever replaced whole: written to a temporary name, flushed,
// renamed over the old one, directory flushed. A torn write leaves the old
// file; a checksum mismatch is refused (never half-read).
//
// The image has no autoclear bit another program would clear: a bitmap is
// loaded inconsistent when its in-use mark is set (we crashed) or when the
// image is not what the last clean store saw (other device or inode, another
// length or modification time: someone else wrote it).
//
// Threading rule: loop thread only. The side file is small and read or
// written whole at open and close only, with plain blocking calls.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "base/result.h"
#include "bitmap/bitmap_store.h"

namespace blkmirror {

inline constexpr char kBitmapFileMagic[8] = {'B', 'L', 'K', 'M', 'B', 'M', 'A', 'P'};
inline constexpr uint32_t kBitmapFileVersion = 1;
inline constexpr const char* kBitmapFileSuffix = ".blkmirror-bitmaps";

// Where an image's side file lives.
std::string bitmap_file_path(const std::string& image_path);

// What the image was (stat) when the bitmaps were last stored cleanly.
struct ImageStamp {
  uint64_t dev = 0, ino = 0, length = 0, mtime_ns = 0;
  bool operator==(const ImageStamp&) const = default;
};
Result<ImageStamp> stamp_image(const std::string& image_path);

struct BitmapFileEntry {
  std::string name;
  uint64_t granularity = 65536;
  bool in_use = false;
  bool enabled = true;
  std::vector<std::byte> data;  // empty when in use
};

struct BitmapFileContents {
  ImageStamp stamp;
  std::vector<BitmapFileEntry> entries;  // oldest first
};

// Pure encode/parse (the fuzz surface: tests/fuzz/bitmap_file_fuzz.cc). Parse
// errors name what is wrong ("not a blkmirror bitmaps file", "checksum
// mismatch", "entry 2: granularity bits 40 out of range", ...).
std::vector<std::byte> encode_bitmap_file(const BitmapFileContents& c);
Result<BitmapFileContents> parse_bitmap_file(std::span<const std::byte> bytes);

class BitmapFile final : public BitmapStore {
 public:
  // Reads IMAGE's side file (none: no bitmaps). Writable: every bitmap it
  // holds is marked in use on disk before this returns. Errors (a corrupt or
  // foreign side file) are one line naming the side file.
  static Result<std::shared_ptr<BitmapFile>> open(const std::string& image_path, bool writable);

  Task<Result<std::vector<NamedBitmap>>> load() override;
  Result<void> can_store(const BitmapSet& set, const std::string& name,
                         uint64_t granularity) const override;
  Task<Result<void>> store(const BitmapSet& set) override;
  Task<Result<void>> remove(const std::string& name) override;

  const std::string& path() const { return path_; }

 private:
  BitmapFile(std::string image, std::string path, bool writable, BitmapFileContents c, bool stale);
  Result<void> write(const BitmapFileContents& c);

  std::string image_, path_;
  bool writable_;
  BitmapFileContents contents_;  // as on disk
  BitmapFileContents loaded_;    // as read at open (the bits load() returns)
  // Entries inconsistent at open: marked in use, or the image changed.
  std::vector<std::string> stale_;
};

}  // namespace blkmirror
