#include "blockdev/qcow2/header.h"

#include <algorithm>
#include <cstring>

#include <fmt/format.h>

#include "base/align.h"

namespace blkmirror::qcow2 {

namespace {

// Names of the incompatible bits this driver knows, for errors about them.
std::string unknown_feature_names(const std::vector<HeaderExtension>& exts, uint64_t bits) {
  std::string out;
  for (int bit = 0; bit < 64; ++bit) {
    if (!(bits & (uint64_t{1} << bit))) continue;
    std::string name = fmt::format("bit {}", bit);
    // The feature name table (48-byte entries: type, bit, name) says what it is.
    for (const auto& e : exts) {
      if (e.type != kExtFeatureTable) continue;
      for (size_t i = 0; i + 48 <= e.data.size(); i += 48) {
        if (static_cast<uint8_t>(e.data[i]) == 0 && static_cast<uint8_t>(e.data[i + 1]) == bit) {
          const char* s = reinterpret_cast<const char*>(e.data.data() + i + 2);
          name = std::string(s, strnlen(s, 46));
        }
      }
    }
    if (!out.empty()) out += ", ";
    out += name;
  }
  return out;
}

struct Parser {
  std::span<const std::byte> b;
  const std::string& name;
  tl::unexpected<Error> fail(const std::string& what) const {
    return make_plain_error(EINVAL, fmt::format("qcow2 header of {}: {}", name, what));
  }
  tl::unexpected<Error> refuse(const std::string& what) const {
    return make_plain_error(ENOTSUP, fmt::format("qcow2 image {}: {}", name, what));
  }
};

}  // namespace

uint64_t Header::l1_entries_for(uint64_t virtual_size) const {
  return div_round_up(div_round_up(virtual_size, cluster_size()), l2_entries());
}

Result<Header> parse_header(std::span<const std::byte> b, const std::string& name) {
  Parser p{b, name};
  if (b.size() < kV2HeaderLength)
    return p.fail(fmt::format("truncated ({} bytes, a header needs at least {})", b.size(),
                              kV2HeaderLength));
  if (load_be32(b.data()) != kMagic) return p.fail("bad magic (not a qcow2 image)");
  Header h;
  h.version = load_be32(&b[4]);
  if (h.version != 2 && h.version != 3)
    return p.fail(fmt::format("version {} not supported (2 or 3)", h.version));
  uint64_t backing_off = load_be64(&b[8]);
  uint32_t backing_len = load_be32(&b[16]);
  h.cluster_bits = load_be32(&b[20]);
  h.size = load_be64(&b[24]);
  h.crypt_method = load_be32(&b[32]);
  h.l1_size = load_be32(&b[36]);
  h.l1_table_offset = load_be64(&b[40]);
  h.refcount_table_offset = load_be64(&b[48]);
  h.refcount_table_clusters = load_be32(&b[56]);
  h.nb_snapshots = load_be32(&b[60]);
  h.snapshots_offset = load_be64(&b[64]);
  if (h.cluster_bits < kMinClusterBits || h.cluster_bits > kMaxClusterBits)
    return p.fail(fmt::format("cluster_bits {} out of range ({}..{})", h.cluster_bits,
                              kMinClusterBits, kMaxClusterBits));
  const uint64_t cs = h.cluster_size();
  if (h.version == 2) {
    h.header_length = kV2HeaderLength;
    h.refcount_order = 4;
  } else {
    if (b.size() < kV3HeaderLength)
      return p.fail(fmt::format("truncated ({} bytes, a version 3 header needs {})", b.size(),
                                kV3HeaderLength));
    h.incompatible = load_be64(&b[72]);
    h.compatible = load_be64(&b[80]);
    h.autoclear = load_be64(&b[88]);
    h.refcount_order = load_be32(&b[96]);
    h.header_length = load_be32(&b[100]);
    if (h.header_length < kV3HeaderLength || h.header_length % 8 != 0 || h.header_length > cs)
      return p.fail(fmt::format("header_length {} invalid (a multiple of 8, {}..{})",
                                h.header_length, kV3HeaderLength, cs));
    if (h.header_length > b.size())
      return p.fail(fmt::format("truncated (header_length {} but the file has {} bytes)",
                                h.header_length, b.size()));
    if (h.header_length > kV3HeaderLength) {
      h.compression_type = static_cast<uint8_t>(b[104]);
      h.extra_fields.assign(b.begin() + 105, b.begin() + h.header_length);
    }
    if (h.refcount_order > 6)
      return p.fail(fmt::format("refcount_order {} out of range (0..6)", h.refcount_order));
  }
  if (h.crypt_method != 0)
    return p.refuse(fmt::format("encryption (crypt_method {}) is not supported", h.crypt_method));

  // Extensions: from the end of the header to the backing name (or the cluster end).
  uint64_t ext_end = std::min<uint64_t>(cs, b.size());
  if (backing_off != 0) {
    if (backing_off > cs || backing_len > cs - backing_off || backing_off + backing_len > b.size())
      return p.fail(fmt::format("backing file name at {}+{} lies outside the first cluster",
                                backing_off, backing_len));
    if (backing_len > kMaxBackingNameLength)
      return p.fail(fmt::format("backing file name too long ({} bytes, at most {})", backing_len,
                                kMaxBackingNameLength));
    if (backing_off < h.header_length)
      return p.fail(fmt::format("backing file name at {} overlaps the header", backing_off));
    h.backing_file = std::string(reinterpret_cast<const char*>(&b[backing_off]), backing_len);
    ext_end = std::min<uint64_t>(ext_end, backing_off);
  }
  uint64_t pos = h.header_length;
  bool seen_backing_format = false;
  while (true) {
    if (pos + 8 > ext_end) {
      // QEMU-written images always have the end marker; a v2 image without
      // extensions may have the backing name right after the header.
      if (pos == ext_end) break;
      return p.fail(fmt::format("header extension at {} runs past {}", pos, ext_end));
    }
    uint32_t type = load_be32(&b[pos]);
    uint32_t len = load_be32(&b[pos + 4]);
    if (type == kExtEnd) break;
    if (len > ext_end - pos - 8)
      return p.fail(fmt::format("header extension {:#x} at {} of {} bytes runs past {}", type, pos,
                                len, ext_end));
    HeaderExtension e{type, std::vector<std::byte>(b.begin() + pos + 8, b.begin() + pos + 8 + len)};
    if (type == kExtBackingFormat) {
      if (seen_backing_format) return p.fail("two backing format extensions");
      if (len > kMaxBackingNameLength)
        return p.fail(fmt::format("backing format name too long ({} bytes)", len));
      seen_backing_format = true;
      h.backing_format = std::string(reinterpret_cast<const char*>(e.data.data()), len);
    } else {
      h.extensions.push_back(std::move(e));
    }
    pos += 8 + align_up(len, 8);
  }

  // Features.
  uint64_t unknown = h.incompatible & ~kIncompatKnown;
  if (unknown)
    return p.refuse(fmt::format("unsupported incompatible feature(s): {}",
                                unknown_feature_names(h.extensions, unknown)));
  if (h.incompatible & kIncompatDataFile)
    return p.refuse("an external data file is not supported");
  if (h.incompatible & kIncompatCompression) {
    if (h.header_length <= 104 || h.compression_type == 0)
      return p.fail("compression type bit set but no compression_type field");
  } else if (h.compression_type != 0) {
    return p.fail(fmt::format("compression_type {} without the compression type bit",
                              h.compression_type));
  }
  if (h.compression_type > 1)
    return p.refuse(fmt::format("unknown compression_type {}", h.compression_type));
  if (h.extended_l2() && h.cluster_bits < 14)
    return p.fail(fmt::format(
        "extended L2 entries need clusters of 16 KiB or more (cluster_bits {})", h.cluster_bits));

  // Tables.
  if (!is_aligned(h.l1_table_offset, cs))
    return p.fail(fmt::format("L1 table offset {:#x} not cluster aligned", h.l1_table_offset));
  if (!is_aligned(h.refcount_table_offset, cs) || h.refcount_table_offset == 0)
    return p.fail(fmt::format("refcount table offset {:#x} invalid", h.refcount_table_offset));
  if (h.refcount_table_clusters == 0 ||
      uint64_t{h.refcount_table_clusters} * cs > kMaxRefcountTableBytes)
    return p.fail(fmt::format("refcount table of {} clusters out of range",
                              h.refcount_table_clusters));
  if (uint64_t{h.l1_size} * 8 > kMaxL1Bytes)
    return p.fail(fmt::format("L1 table of {} entries too large", h.l1_size));
  // The largest virtual size an L1 table of the maximum size can map.
  if (h.size > (kMaxL1Bytes / 8) * h.l2_entries() * cs || h.size > (uint64_t{1} << 62))
    return p.fail(fmt::format("virtual size {} too large", h.size));
  if (h.l1_entries_for(h.size) > h.l1_size)
    return p.fail(fmt::format("L1 table of {} entries too small for virtual size {}", h.l1_size,
                              h.size));
  if (h.l1_size > 0 && h.l1_table_offset == 0)
    return p.fail("L1 table at offset 0 (the header)");
  if (h.nb_snapshots && !is_aligned(h.snapshots_offset, cs))
    return p.fail(
        fmt::format("snapshot table offset {:#x} not cluster aligned", h.snapshots_offset));
  return h;
}

Result<std::vector<std::byte>> serialize_header(const Header& h) {
  std::vector<std::byte> out(h.header_length, std::byte{0});
  store_be32(&out[0], kMagic);
  store_be32(&out[4], h.version);
  // backing_file_offset / size are filled in below.
  store_be32(&out[20], h.cluster_bits);
  store_be64(&out[24], h.size);
  store_be32(&out[32], h.crypt_method);
  store_be32(&out[36], h.l1_size);
  store_be64(&out[40], h.l1_table_offset);
  store_be64(&out[48], h.refcount_table_offset);
  store_be32(&out[56], h.refcount_table_clusters);
  store_be32(&out[60], h.nb_snapshots);
  store_be64(&out[64], h.snapshots_offset);
  if (h.version >= 3) {
    store_be64(&out[72], h.incompatible);
    store_be64(&out[80], h.compatible);
    store_be64(&out[88], h.autoclear);
    store_be32(&out[96], h.refcount_order);
    store_be32(&out[100], h.header_length);
    if (h.header_length > 104) {
      out[104] = static_cast<std::byte>(h.compression_type);
      std::copy_n(h.extra_fields.begin(),
                  std::min<size_t>(h.extra_fields.size(), h.header_length - 105), &out[105]);
    }
  }
  auto put_ext = [&out](uint32_t type, std::span<const std::byte> data) {
    size_t at = out.size();
    out.resize(at + 8 + align_up(data.size(), 8), std::byte{0});
    store_be32(&out[at], type);
    store_be32(&out[at + 4], static_cast<uint32_t>(data.size()));
    std::copy(data.begin(), data.end(), &out[at + 8]);
  };
  // Version 2 images get extensions too (QEMU reads and writes them there).
  if (h.backing_format)
    put_ext(kExtBackingFormat, std::as_bytes(std::span(*h.backing_format)));
  for (const auto& e : h.extensions) put_ext(e.type, e.data);
  put_ext(kExtEnd, {});
  if (h.backing_file) {
    if (h.backing_file->size() > kMaxBackingNameLength)
      return make_plain_error(EINVAL, fmt::format("backing file name too long ({} bytes)",
                                                  h.backing_file->size()));
    store_be64(&out[8], out.size());
    store_be32(&out[16], static_cast<uint32_t>(h.backing_file->size()));
    auto name = std::as_bytes(std::span(*h.backing_file));
    out.insert(out.end(), name.begin(), name.end());
  }
  if (out.size() > h.cluster_size())
    return make_plain_error(
        EFBIG, fmt::format("qcow2 header needs {} bytes, more than a cluster ({})", out.size(),
                           h.cluster_size()));
  return out;
}

}  // namespace blkmirror::qcow2
