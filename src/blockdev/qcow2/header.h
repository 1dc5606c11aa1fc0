// qcow2 on-disk header: the fixed fields (versions 2 and 3), the optional v3 fields,
// the header extensions and the backing file name, parsed from and serialized to
// the image's first cluster. Pure functions over bytes (no I/O): the fuzz surface
// (tests/fuzz/qcow2_fuzz.cc). Byte order: big endian, as the format says.
//
// Threading rule: pure data and functions; safe anywhere.
// On-disk ORDERING RULE: the header is rewritten in place as one write of its first
// cluster's used bytes, only after everything it points to (new L1 or refcount
// table, new backing name) is already on disk and flushed; the caller flushes after.
//
// Extensions the driver does not interpret (feature name table, bitmaps, unknown
// ones) are kept verbatim, in their order, when the header is rewritten.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "base/result.h"

namespace blkmirror::qcow2 {

inline constexpr uint32_t kMagic = 0x514649fb;  // "QFI\xfb"
inline constexpr uint32_t kMinClusterBits = 9;
inline constexpr uint32_t kMaxClusterBits = 21;  // 2 MiB, as QEMU
inline constexpr uint32_t kV2HeaderLength = 72;
inline constexpr uint32_t kV3HeaderLength = 104;
inline constexpr uint32_t kMaxBackingNameLength = 1023;
inline constexpr uint64_t kMaxL1Bytes = 32u << 20;        // QEMU's implementation limit
inline constexpr uint64_t kMaxRefcountTableBytes = 8u << 20;  // likewise

// Incompatible feature bits.
inline constexpr uint64_t kIncompatDirty = 1u << 0;
inline constexpr uint64_t kIncompatCorrupt = 1u << 1;
inline constexpr uint64_t kIncompatDataFile = 1u << 2;
inline constexpr uint64_t kIncompatCompression = 1u << 3;
inline constexpr uint64_t kIncompatExtendedL2 = 1u << 4;
inline constexpr uint64_t kIncompatKnown = 0x1f;
// Autoclear bits.
inline constexpr uint64_t kAutoclearBitmaps = 1u << 0;
inline constexpr uint64_t kAutoclearRawData = 1u << 1;

// Header extension types.
inline constexpr uint32_t kExtEnd = 0;
inline constexpr uint32_t kExtBackingFormat = 0xe2792aca;
inline constexpr uint32_t kExtFeatureTable = 0x6803f857;
inline constexpr uint32_t kExtBitmaps = 0x23852875;
inline constexpr uint32_t kExtEncryption = 0x0537be77;
inline constexpr uint32_t kExtDataFile = 0x44415441;

struct HeaderExtension {
  uint32_t type = 0;
  std::vector<std::byte> data;
};

struct Header {
  uint32_t version = 3;
  uint32_t cluster_bits = 16;
  uint64_t size = 0;
  uint32_t crypt_method = 0;
  uint32_t l1_size = 0;
  uint64_t l1_table_offset = 0;
  uint64_t refcount_table_offset = 0;
  uint32_t refcount_table_clusters = 0;
  uint32_t nb_snapshots = 0;
  uint64_t snapshots_offset = 0;
  uint64_t incompatible = 0;
  uint64_t compatible = 0;
  uint64_t autoclear = 0;
  uint32_t refcount_order = 4;
  uint32_t header_length = kV3HeaderLength;  // v3: >= 104, multiple of 8; v2: 72
  uint8_t compression_type = 0;              // 0 zlib, 1 zstd (byte 104)
  // Header bytes from 105 to header_length, kept verbatim (future optional fields).
  std::vector<std::byte> extra_fields;
  // Every extension in file order except the backing format, which lives in
  // backing_format (written first on serialize, as QEMU does).
  std::vector<HeaderExtension> extensions;
  std::optional<std::string> backing_file;
  std::optional<std::string> backing_format;

  uint64_t cluster_size() const { return uint64_t{1} << cluster_bits; }
  uint32_t refcount_bits() const { return 1u << refcount_order; }
  bool extended_l2() const { return incompatible & kIncompatExtendedL2; }
  // Bytes per L2 entry (16 with extended L2) and entries per L2 table.
  uint32_t l2_entry_bytes() const { return extended_l2() ? 16 : 8; }
  uint64_t l2_entries() const { return cluster_size() / l2_entry_bytes(); }
  // L1 entries needed to map `size` bytes.
  uint64_t l1_entries_for(uint64_t virtual_size) const;
};

// Parses the image's first cluster (or as much of the file as exists, if shorter).
// `name` goes into errors: "qcow2 header of NAME: cluster_bits 40 out of range".
// Refuses encryption, external data files, unknown incompatible bits, and any
// field that breaks the specification.
Result<Header> parse_header(std::span<const std::byte> bytes, const std::string& name);

// The bytes of the header as it should be written at offset 0: fixed fields,
// extensions, end marker, backing name. Fails with EFBIG if they do not fit in one
// cluster.
Result<std::vector<std::byte>> serialize_header(const Header& h);

// Big-endian helpers shared by the tables.
inline uint64_t load_be64(const std::byte* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}
inline uint32_t load_be32(const std::byte* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}
inline void store_be64(std::byte* p, uint64_t v) {
  for (int i = 7; i >= 0; --i, v >>= 8) p[i] = static_cast<std::byte>(v & 0xff);
}
inline void store_be32(std::byte* p, uint32_t v) {
  for (int i = 3; i >= 0; --i, v >>= 8) p[i] = static_cast<std::byte>(v & 0xff);
}

}  // namespace blkmirror::qcow2
