#include "blockdev/qcow2/bitmaps.h"

#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <set>

#include "base/align.h"
#include "blockdev/qcow2/header.h"

namespace blkmirror::qcow2 {

namespace {

constexpr size_t kDirEntryFixed = 24;

tl::unexpected<Error> invalid(std::string what) {
  return make_plain_error(EINVAL, std::move(what));
}

uint16_t load_be16(const std::byte* p) {
  return static_cast<uint16_t>((static_cast<uint8_t>(p[0]) << 8) | static_cast<uint8_t>(p[1]));
}

// QEMU's check_dir_entry(): the entry's fields and, for a consistent bitmap,
// a table that covers the whole disk.
bool entry_ok(const BitmapDirEntry& e, const BitmapGeometry& g) {
  if (e.table_size == 0 || e.table_offset == 0 || e.table_offset % g.cluster_size ||
      e.table_size > kMaxBitmapTableEntries || e.granularity_bits > kMaxBitmapGranularityBits ||
      e.granularity_bits < kMinBitmapGranularityBits || (e.flags & ~kBitmapKnownFlags) ||
      e.name.empty() || e.name.size() > kMaxBitmapName)
    return false;
  const uint64_t phys = uint64_t{e.table_size} * g.cluster_size;
  if (phys > kMaxBitmapDataBytes) return false;
  // Its bits for the disk's size must fit in memory, in use or not (QEMU
  // never makes a bigger one: check_bitmap_constraints).
  if (bitmap_data_bytes(g.virtual_size, e.granularity()) > kMaxBitmapDataBytes) return false;
  // A consistent bitmap's table is exactly as long as its data (QEMU's
  // load_bitmap_data() refuses any other); an in-use one may be stale.
  if (!e.in_use() && e.table_size != bitmap_table_entries(g, e.granularity())) return false;
  return true;
}

}  // namespace

uint64_t bitmap_data_bytes(uint64_t virtual_size, uint64_t granularity) {
  return div_round_up(div_round_up(virtual_size, granularity), 8);
}

uint64_t bitmap_table_entries(const BitmapGeometry& g, uint64_t granularity) {
  return div_round_up(bitmap_data_bytes(g.virtual_size, granularity), g.cluster_size);
}

uint64_t bitmap_dir_entry_bytes(size_t name_length) {
  return align_up(kDirEntryFixed + name_length, 8);
}

Result<void> check_bitmap_constraints(const BitmapGeometry& g, const std::string& name,
                                      uint64_t granularity) {
  const int bits = std::countr_zero(granularity);
  if (bits > static_cast<int>(kMaxBitmapGranularityBits))
    return invalid(fmt::format("Granularity exceeds maximum ({} bytes)",
                               uint64_t{1} << kMaxBitmapGranularityBits));
  if (bits < static_cast<int>(kMinBitmapGranularityBits))
    return invalid(fmt::format("Granularity is under minimum ({} bytes)",
                               uint64_t{1} << kMinBitmapGranularityBits));
  const uint64_t bytes = bitmap_data_bytes(g.virtual_size, granularity);
  if (bytes > kMaxBitmapDataBytes || bytes > kMaxBitmapTableEntries * g.cluster_size)
    return invalid("Too much space will be occupied by the bitmap. Use larger granularity");
  if (name.size() > kMaxBitmapName)
    return invalid(fmt::format("Name length exceeds maximum ({} characters)", kMaxBitmapName));
  return {};
}

Result<BitmapsExtension> parse_bitmaps_extension(std::span<const std::byte> d,
                                                 uint64_t cluster_size) {
  if (d.size() != kBitmapsExtensionBytes) return invalid("bitmaps_ext: Invalid extension length");
  if (load_be32(&d[4]) != 0) return invalid("bitmaps_ext: Reserved field is not zero");
  BitmapsExtension e;
  e.nb_bitmaps = load_be32(&d[0]);
  e.directory_size = load_be64(&d[8]);
  e.directory_offset = load_be64(&d[16]);
  if (e.nb_bitmaps > kMaxBitmaps)
    return invalid(
        fmt::format("bitmaps_ext: Image has {} bitmaps, exceeding the QEMU supported maximum of {}",
                    e.nb_bitmaps, kMaxBitmaps));
  if (e.nb_bitmaps == 0) return invalid("found bitmaps extension with zero bitmaps");
  if (e.directory_offset % cluster_size != 0 || e.directory_offset == 0)
    return invalid("bitmaps_ext: invalid bitmap directory offset");
  if (e.directory_size > kMaxBitmapDirectoryBytes)
    return invalid(fmt::format(
        "bitmaps_ext: bitmap directory size ({}) exceeds the maximum supported size ({})",
        e.directory_size, kMaxBitmapDirectoryBytes));
  if (e.directory_size == 0) return invalid("Requested bitmap directory size is zero");
  return e;
}

std::vector<std::byte> encode_bitmaps_extension(const BitmapsExtension& e) {
  std::vector<std::byte> d(kBitmapsExtensionBytes, std::byte{0});
  store_be32(&d[0], e.nb_bitmaps);
  store_be64(&d[8], e.directory_size);
  store_be64(&d[16], e.directory_offset);
  return d;
}

Result<std::vector<BitmapDirEntry>> parse_bitmap_directory(std::span<const std::byte> b,
                                                           const BitmapsExtension& ext,
                                                           const BitmapGeometry& g) {
  std::vector<BitmapDirEntry> out;
  std::set<std::string> names;
  size_t pos = 0;
  while (pos < b.size()) {
    if (b.size() - pos < kDirEntryFixed) return invalid("Broken bitmap directory");
    if (out.size() + 1 > ext.nb_bitmaps)
      return invalid("More bitmaps found than specified in header extension");
    const std::byte* p = &b[pos];
    BitmapDirEntry e;
    e.table_offset = load_be64(p);
    e.table_size = load_be32(p + 8);
    e.flags = load_be32(p + 12);
    const uint8_t type = static_cast<uint8_t>(p[16]);
    e.granularity_bits = static_cast<uint8_t>(p[17]);
    const uint16_t name_size = load_be16(p + 18);
    const uint32_t extra = load_be32(p + 20);
    const uint64_t size = align_up(kDirEntryFixed + uint64_t{name_size} + extra, 8);
    if (size > b.size() - pos) return invalid("Broken bitmap directory");
    const char* name = reinterpret_cast<const char*>(p + kDirEntryFixed + extra);
    e.name.assign(name, name_size);
    if (extra != 0) return invalid("Bitmap extra data is not supported");
    if (type != kBitmapTypeDirtyTracking || !entry_ok(e, g))
      return invalid(fmt::format("Bitmap '{}' doesn't satisfy the constraints", e.name));
    for (uint64_t i = kDirEntryFixed + name_size; i < size; ++i)
      if (p[i] != std::byte{0})
        return invalid(fmt::format("Bitmap '{}': directory entry padding is not zero", e.name));
    if (!names.insert(e.name).second)
      return invalid(fmt::format("Bitmap already exists: {}", e.name));
    out.push_back(std::move(e));
    pos += size;
  }
  if (out.size() != ext.nb_bitmaps)
    return invalid("Less bitmaps found than specified in header extension");
  return out;
}

Result<std::vector<std::byte>> encode_bitmap_directory(const std::vector<BitmapDirEntry>& entries,
                                                       const BitmapGeometry& g) {
  if (entries.empty() || entries.size() > kMaxBitmaps)
    return invalid(fmt::format("bitmap directory of {} entries", entries.size()));
  std::vector<std::byte> out;
  for (const auto& e : entries) {
    if (!entry_ok(e, g))
      return invalid(fmt::format("Bitmap '{}' doesn't satisfy the constraints", e.name));
    const size_t at = out.size();
    out.resize(at + bitmap_dir_entry_bytes(e.name.size()), std::byte{0});
    std::byte* p = &out[at];
    store_be64(p, e.table_offset);
    store_be32(p + 8, e.table_size);
    store_be32(p + 12, e.flags);
    p[16] = std::byte{kBitmapTypeDirtyTracking};
    p[17] = static_cast<std::byte>(e.granularity_bits);
    p[18] = static_cast<std::byte>(e.name.size() >> 8);
    p[19] = static_cast<std::byte>(e.name.size() & 0xff);
    std::copy_n(reinterpret_cast<const std::byte*>(e.name.data()), e.name.size(),
                p + kDirEntryFixed);
  }
  if (out.size() > kMaxBitmapDirectoryBytes) return invalid("Bitmap directory is too large");
  return out;
}

Result<void> check_bitmap_table_entry(uint64_t entry, uint64_t cluster_size) {
  if (entry & kBitmapTableReservedMask) return make_error(EINVAL);
  const uint64_t off = entry & kBitmapTableOffsetMask;
  if (off != 0 && ((entry & kBitmapTableAllOnes) || off % cluster_size != 0))
    return make_error(EINVAL);
  return {};
}

Result<void> load_bitmap_cluster(std::span<const std::byte> cluster, uint64_t index,
                                 DirtyBitmap& bits) {
  const uint64_t first = index * cluster.size() * 8;
  for (size_t w = 0; w < cluster.size(); w += 8) {
    uint64_t word = 0;
    const size_t n = std::min<size_t>(8, cluster.size() - w);
    for (size_t i = 0; i < n; ++i)
      word |= uint64_t{static_cast<uint8_t>(cluster[w + i])} << (8 * i);
    uint64_t at = first + w * 8;
    while (word) {
      const int skip = std::countr_zero(word);
      at += skip;
      word >>= skip;
      const int run = std::countr_one(word);
      // Tail bits past the disk's end should be zero; QEMU ignores them, so do we.
      if (at >= bits.size()) return {};
      bits.set(at, run);
      at += run;
      word = run == 64 ? 0 : word >> run;
    }
  }
  return {};
}

void load_bitmap_ones(uint64_t cluster_size, uint64_t index, DirtyBitmap& bits) {
  bits.set(index * cluster_size * 8, cluster_size * 8);
}

void store_bitmap_cluster(const DirtyBitmap& bits, uint64_t index, std::span<std::byte> cluster) {
  std::fill(cluster.begin(), cluster.end(), std::byte{0});
  const uint64_t first = index * cluster.size() * 8;
  const uint64_t end = std::min<uint64_t>(bits.size(), first + cluster.size() * 8);
  for (auto b = bits.next_set(first); b && *b < end;) {
    auto clear = bits.next_clear(*b);
    const uint64_t stop = std::min<uint64_t>(end, clear ? *clear : bits.size());
    for (uint64_t i = *b; i < stop; ++i) {
      const uint64_t rel = i - first;
      cluster[rel / 8] |= static_cast<std::byte>(1u << (rel % 8));
    }
    if (stop >= end) break;
    b = bits.next_set(stop);
  }
}

bool bitmap_cluster_dirty(const DirtyBitmap& bits, uint64_t index, uint64_t cluster_size) {
  auto b = bits.next_set(index * cluster_size * 8);
  return b && *b < (index + 1) * cluster_size * 8;
}

}  // namespace blkmirror::qcow2
