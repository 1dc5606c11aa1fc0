// qcow2 bitmaps extension (QEMU's docs/interop/qcow2.txt, "Bitmaps extension",
// "Bitmap directory", "Bitmap table", "Bitmap data"): the 24-byte header
// extension, the bitmap directory, bitmap table entries and the bit layout of
// bitmap data clusters. Pure functions over bytes (no I/O): the fuzz surface
// (tests/fuzz/qcow2_bitmaps_fuzz.cc). Byte order: big endian; within a data
// byte, bit 0 (least significant) is the first granule.
//
// The rules are QEMU's (block/qcow2-bitmap.c), so an image QEMU would refuse
// is refused here too, and what we write QEMU reads: granularity 2^9..2^31,
// type 1 (dirty tracking) only, flags in_use and auto only (any other flag,
// extra data or type is a bitmap we do not understand: the image is refused,
// never rewritten), names 1..1023 bytes and unique, a consistent (not in_use)
// bitmap's table exactly as long as its data needs.
//
// Threading rule: pure data and functions; safe anywhere.
// On-disk ORDERING RULE: see bitmap_io.cc (data and tables, flush, directory,
// flush, header, flush, then the old clusters are freed).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "base/result.h"
#include "bitmap/dirty_bitmap.h"

namespace blkmirror::qcow2 {

inline constexpr uint32_t kMaxBitmaps = 65535;
inline constexpr uint64_t kMaxBitmapDirectoryBytes = uint64_t{1024} * kMaxBitmaps;
inline constexpr uint64_t kMaxBitmapTableEntries = 0x8000000;
inline constexpr uint64_t kMaxBitmapDataBytes = 0x20000000;  // 512 MiB of bits in memory
inline constexpr uint32_t kMinBitmapGranularityBits = 9;
inline constexpr uint32_t kMaxBitmapGranularityBits = 31;
inline constexpr size_t kMaxBitmapName = 1023;
inline constexpr uint32_t kBitmapsExtensionBytes = 24;

// Directory entry flags.
inline constexpr uint32_t kBitmapInUse = 1u << 0;
inline constexpr uint32_t kBitmapAuto = 1u << 1;
inline constexpr uint32_t kBitmapKnownFlags = kBitmapInUse | kBitmapAuto;
inline constexpr uint8_t kBitmapTypeDirtyTracking = 1;

// Bitmap table entries.
inline constexpr uint64_t kBitmapTableOffsetMask = 0x00fffffffffffe00ull;
inline constexpr uint64_t kBitmapTableReservedMask = 0xff000000000001feull;
inline constexpr uint64_t kBitmapTableAllOnes = 1;

struct BitmapsExtension {
  uint32_t nb_bitmaps = 0;
  uint64_t directory_size = 0;
  uint64_t directory_offset = 0;
};

struct BitmapDirEntry {
  uint64_t table_offset = 0;
  uint32_t table_size = 0;  // entries
  uint32_t flags = 0;
  uint8_t granularity_bits = 16;
  std::string name;

  bool in_use() const { return flags & kBitmapInUse; }
  bool enabled() const { return flags & kBitmapAuto; }
  uint64_t granularity() const { return uint64_t{1} << granularity_bits; }
};

// The image's geometry the checks need.
struct BitmapGeometry {
  uint64_t cluster_size = 65536;
  uint64_t virtual_size = 0;
};

// Bytes of bitmap data, and bitmap table entries (data clusters), for a bitmap
// of `granularity` over `virtual_size` bytes.
uint64_t bitmap_data_bytes(uint64_t virtual_size, uint64_t granularity);
uint64_t bitmap_table_entries(const BitmapGeometry& g, uint64_t granularity);
// Bytes of one directory entry for a name of that length.
uint64_t bitmap_dir_entry_bytes(size_t name_length);

// QEMU's check of a bitmap it is asked to store (check_constraints_on_bitmap),
// with its texts: "Granularity exceeds maximum (2147483648 bytes)", "Too much
// space will be occupied by the bitmap. Use larger granularity", "Name length
// exceeds maximum (1023 characters)".
Result<void> check_bitmap_constraints(const BitmapGeometry& g, const std::string& name,
                                      uint64_t granularity);

// The extension's 24 bytes. Errors use QEMU's texts ("bitmaps_ext: ...").
Result<BitmapsExtension> parse_bitmaps_extension(std::span<const std::byte> data,
                                                 uint64_t cluster_size);
std::vector<std::byte> encode_bitmaps_extension(const BitmapsExtension& e);

// The directory's bytes (ext.directory_size of them). Errors name the problem
// ("Broken bitmap directory", "Bitmap 'x' doesn't satisfy the constraints",
// "Bitmap extra data is not supported", ...).
Result<std::vector<BitmapDirEntry>> parse_bitmap_directory(std::span<const std::byte> bytes,
                                                           const BitmapsExtension& ext,
                                                           const BitmapGeometry& g);
// REQUIRES: entries not empty, each passing the checks parse applies
// (asserted by returning an error rather than writing a bad directory).
Result<std::vector<std::byte>> encode_bitmap_directory(const std::vector<BitmapDirEntry>& entries,
                                                       const BitmapGeometry& g);

// A bitmap table entry: EINVAL when a reserved bit is set, the offset is not
// cluster aligned, or bit 0 is set together with an offset.
Result<void> check_bitmap_table_entry(uint64_t entry, uint64_t cluster_size);

// Bitmap data cluster `index` covers bits [index * cluster_size * 8, ...).
// Sets the bits a data cluster marks (bits past bits.size() must be clear: an
// error otherwise, as the spec asks of tail bits).
Result<void> load_bitmap_cluster(std::span<const std::byte> cluster, uint64_t index,
                                 DirtyBitmap& bits);
// Sets every bit a cluster of all ones covers (table entry bit 0).
void load_bitmap_ones(uint64_t cluster_size, uint64_t index, DirtyBitmap& bits);
// The data cluster `index` of `bits` (cluster.size() bytes, tail zero).
void store_bitmap_cluster(const DirtyBitmap& bits, uint64_t index, std::span<std::byte> cluster);
// True when data cluster `index` of `bits` has a set bit.
bool bitmap_cluster_dirty(const DirtyBitmap& bits, uint64_t index, uint64_t cluster_size);

}  // namespace blkmirror::qcow2
