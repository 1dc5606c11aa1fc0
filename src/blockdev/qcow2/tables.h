// qcow2 table entries: L1 entries, L2 entries (standard and extended with
// subclusters), compressed cluster descriptors, refcount table entries and
// refcount block entries of any width (1..64 bits). Pure decode/encode over
// in-memory table bytes (big endian on disk), part of the fuzz surface.
//
// Threading rule: pure functions; safe anywhere.
// On-disk ORDERING RULE: none here (these only describe bytes; l2_cache.h and
// refcount.h say when the bytes may reach the disk).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "blockdev/qcow2/header.h"

namespace blkmirror::qcow2 {

inline constexpr uint64_t kOffsetMask = 0x00fffffffffffe00ull;  // bits 9..55
inline constexpr uint64_t kFlagCopied = 1ull << 63;              // refcount is exactly one
inline constexpr uint64_t kFlagCompressed = 1ull << 62;
inline constexpr uint64_t kFlagZero = 1ull;                      // standard descriptor bit 0
inline constexpr uint64_t kL1ReservedMask = 0x7f000000000001ffull;
inline constexpr uint64_t kL2ReservedMask = 0x3f000000000001feull;
inline constexpr uint32_t kSubclusters = 32;

// What a guest (sub)cluster reads as.
enum class Kind : uint8_t {
  kUnallocated,  // backing file or zeroes
  kZero,         // reads as zeroes (may keep a host cluster: preallocated)
  kNormal,       // data at the host offset
  kCompressed,   // compressed data (whole cluster)
};

// One L2 entry (word) plus, with extended L2, its subcluster bitmap.
struct L2Entry {
  uint64_t word = 0;
  uint64_t bitmap = 0;  // extended L2 only: bits 0..31 allocated, 32..63 reads as zero

  bool compressed() const { return word & kFlagCompressed; }
  uint64_t host() const { return compressed() ? 0 : word & kOffsetMask; }
  bool copied() const { return word & kFlagCopied; }
};

// Kind of subcluster `sc` (ignored without extended L2) of an entry.
inline Kind entry_kind(const L2Entry& e, bool extended, uint32_t sc) {
  if (e.compressed()) return Kind::kCompressed;
  if (!extended) {
    if (e.word & kFlagZero) return Kind::kZero;
    return e.host() ? Kind::kNormal : Kind::kUnallocated;
  }
  if (e.bitmap & (1ull << sc)) return Kind::kNormal;
  if (e.bitmap & (1ull << (32 + sc))) return Kind::kZero;
  return Kind::kUnallocated;
}

// A compressed descriptor: where its bytes start and how many bytes (whole 512-byte
// sectors counted from the sector holding `offset`) may hold them.
struct Compressed {
  uint64_t offset = 0;
  uint64_t length = 0;  // bytes from offset to the end of the last sector
};
inline Compressed decode_compressed(uint64_t word, uint32_t cluster_bits) {
  const uint32_t x = 62 - (cluster_bits - 8);
  uint64_t offset = word & ((1ull << x) - 1);
  uint64_t sectors = ((word & ((1ull << 62) - 1)) >> x) + 1;
  uint64_t end = (offset & ~511ull) + sectors * 512;
  return {offset, end - offset};
}

// Table words.
inline uint64_t load_entry(std::span<const std::byte> table, uint64_t index) {
  return load_be64(table.data() + index * 8);
}
inline void store_entry(std::span<std::byte> table, uint64_t index, uint64_t v) {
  store_be64(table.data() + index * 8, v);
}

inline L2Entry load_l2(std::span<const std::byte> table, uint64_t index, bool extended) {
  if (!extended) return {load_entry(table, index), 0};
  return {load_entry(table, 2 * index), load_entry(table, 2 * index + 1)};
}
inline void store_l2(std::span<std::byte> table, uint64_t index, bool extended, const L2Entry& e) {
  if (!extended) {
    store_entry(table, index, e.word);
  } else {
    store_entry(table, 2 * index, e.word);
    store_entry(table, 2 * index + 1, e.bitmap);
  }
}

// Refcount block entries of width 2^order bits. Sub-byte widths count bit 0 as the
// least significant bit of a byte; 8..64 bits are big-endian integers.
inline uint64_t load_refcount(std::span<const std::byte> block, uint32_t order, uint64_t index) {
  const uint32_t bits = 1u << order;
  if (bits < 8) {
    uint8_t byte = static_cast<uint8_t>(block[index * bits / 8]);
    uint32_t shift = (index * bits) % 8;
    return (byte >> shift) & ((1u << bits) - 1);
  }
  const uint32_t n = bits / 8;
  uint64_t v = 0;
  for (uint32_t i = 0; i < n; ++i) v = (v << 8) | static_cast<uint8_t>(block[index * n + i]);
  return v;
}
inline void store_refcount(std::span<std::byte> block, uint32_t order, uint64_t index, uint64_t v) {
  const uint32_t bits = 1u << order;
  if (bits < 8) {
    auto& byte = block[index * bits / 8];
    uint32_t shift = (index * bits) % 8;
    uint8_t mask = static_cast<uint8_t>(((1u << bits) - 1) << shift);
    byte = static_cast<std::byte>((static_cast<uint8_t>(byte) & ~mask) |
                                  ((static_cast<uint8_t>(v) << shift) & mask));
    return;
  }
  const uint32_t n = bits / 8;
  for (int i = static_cast<int>(n) - 1; i >= 0; --i, v >>= 8)
    block[index * n + i] = static_cast<std::byte>(v & 0xff);
}
inline uint64_t max_refcount(uint32_t order) {
  return order == 6 ? ~0ull : (1ull << (1u << order)) - 1;
}

}  // namespace blkmirror::qcow2
