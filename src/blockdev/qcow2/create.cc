// Qcow2Device::create: formats an empty file as a new image. Layout (as QEMU's):
// cluster 0 the header, then the refcount table, the refcount blocks covering the
// metadata, then the L1 table. With preallocation=metadata every guest cluster
// gets an L2 entry and a host cluster (the file grows sparse to hold them).
//
// On-disk ORDERING RULE: tables and blocks are written before the header, and the
// header is flushed last: a crash leaves either no image (no magic) or a whole one.
#include <algorithm>
#include <bit>

#include <fmt/format.h>

#include "base/align.h"
#include "blockdev/qcow2/qcow2_impl.h"

namespace blkmirror {

using namespace qcow2;

namespace {

tl::unexpected<Error> bad(const std::string& what) {
  return make_plain_error(EINVAL, "qcow2 create: " + what);
}

// QEMU's feature name table, so tools that do not know a bit can name it.
std::vector<std::byte> feature_table() {
  struct F {
    uint8_t type, bit;
    const char* name;
  };
  static constexpr F kFeatures[] = {
      {0, 0, "dirty bit"},        {0, 1, "corrupt bit"},        {0, 2, "external data file"},
      {0, 3, "compression type"}, {0, 4, "extended L2 entries"}, {1, 0, "lazy refcounts"},
      {2, 0, "bitmaps"},          {2, 1, "raw external data"},
  };
  std::vector<std::byte> out;
  for (const auto& f : kFeatures) {
    std::byte entry[48] = {};
    entry[0] = std::byte{f.type};
    entry[1] = std::byte{f.bit};
    std::string n = f.name;
    std::copy_n(reinterpret_cast<const std::byte*>(n.data()), std::min<size_t>(n.size(), 46),
                entry + 2);
    out.insert(out.end(), entry, entry + 48);
  }
  return out;
}

Result<Header> header_for(const Qcow2CreateOptions& o) {
  if (o.version != 2 && o.version != 3) return bad(fmt::format("version {} (2 or 3)", o.version));
  if (!is_pow2(o.cluster_size) || o.cluster_size < 512 || o.cluster_size > (2u << 20))
    return bad(fmt::format("cluster size {} must be a power of two between 512 and 2097152",
                           o.cluster_size));
  if (!is_pow2(o.refcount_bits) || o.refcount_bits > 64)
    return bad(fmt::format("refcount bits {} must be a power of two up to 64", o.refcount_bits));
  if (o.version == 2 && o.refcount_bits != 16)
    return bad("refcount widths other than 16 bits need version 3");
  if (o.extended_l2 && o.version < 3) return bad("extended L2 entries need version 3");
  if (o.extended_l2 && o.cluster_size < 16384)
    return bad("extended L2 entries need clusters of 16 KiB or more");
  if (o.backing_format && !o.backing_file) return bad("a backing format needs a backing file");
  if (o.backing_file && o.backing_file->size() > kMaxBackingNameLength)
    return bad("backing file name too long");
  if (o.backing_file && o.backing_file->empty()) return bad("empty backing file name");
  Header h;
  h.version = o.version;
  h.cluster_bits = static_cast<uint32_t>(std::countr_zero(o.cluster_size));
  h.size = o.size;
  h.refcount_order = static_cast<uint32_t>(std::countr_zero(o.refcount_bits));
  if (o.version == 3) {
    h.header_length = 112;  // with the compression_type field, as QEMU writes it
    h.extra_fields.assign(7, std::byte{0});
    if (o.extended_l2) h.incompatible |= kIncompatExtendedL2;
    h.extensions.push_back(HeaderExtension{kExtFeatureTable, feature_table()});
  } else {
    h.header_length = kV2HeaderLength;
  }
  h.backing_file = o.backing_file;
  h.backing_format = o.backing_format;
  uint64_t l1 = h.l1_entries_for(o.size);
  if (l1 * 8 > kMaxL1Bytes || o.size > (uint64_t{1} << 62))
    return bad(fmt::format("size {} too large for {}-byte clusters", o.size, o.cluster_size));
  h.l1_size = static_cast<uint32_t>(l1);
  return h;
}

}  // namespace

Task<Result<void>> Qcow2Device::create(BlockDevice& file, const Qcow2CreateOptions& o) {
  auto hr = header_for(o);
  if (!hr) co_return make_error(hr.error());
  Header h = std::move(*hr);
  if (file.caps().read_only) co_return make_error(EROFS, "qcow2 create: " + file.describe());
  const uint64_t cs = h.cluster_size();
  const uint64_t epb = cs * 8 / h.refcount_bits();
  const uint64_t l1_clusters = std::max<uint64_t>(1, div_round_up(uint64_t{h.l1_size} * 8, cs));
  // Metadata: header, refcount table (rt clusters), blocks (nb), L1.
  uint64_t rt = 1, nb = 1;
  while (true) {
    uint64_t total = 1 + rt + nb + l1_clusters;
    uint64_t need_nb = div_round_up(total, epb);
    uint64_t need_rt = div_round_up(need_nb * 8, cs);
    if (need_nb == nb && need_rt == rt) break;
    nb = std::max(nb, need_nb);
    rt = std::max(rt, need_rt);
  }
  const uint64_t total = 1 + rt + nb + l1_clusters;
  h.refcount_table_offset = cs;
  h.refcount_table_clusters = static_cast<uint32_t>(rt);
  h.l1_table_offset = (1 + rt + nb) * cs;
  auto header_bytes = serialize_header(h);
  if (!header_bytes && h.version == 3) {
    // Small clusters with a backing name: the (optional) feature table gives way.
    h.extensions.clear();
    header_bytes = serialize_header(h);
  }
  if (!header_bytes) co_return make_error(header_bytes.error());

  if (auto r = co_await file.resize(total * cs); !r)
    co_return with_context(r.error(), "qcow2 create");
  std::vector<std::byte> meta((total - 1) * cs, std::byte{0});
  for (uint64_t i = 0; i < nb; ++i) store_be64(&meta[i * 8], (1 + rt + i) * cs);
  std::span<std::byte> blocks(meta.data() + rt * cs, nb * cs);
  for (uint64_t c = 0; c < total; ++c)
    store_refcount(blocks.subspan((c / epb) * cs, cs), h.refcount_order, c % epb, 1);
  if (auto r = co_await file.write(cs, meta, {}); !r) co_return r;
  // The header's cluster: header bytes then zeroes.
  std::vector<std::byte> first(cs, std::byte{0});
  std::copy(header_bytes->begin(), header_bytes->end(), first.begin());
  if (auto r = co_await file.flush(); !r) co_return r;
  if (auto r = co_await file.write(0, first, {}); !r) co_return r;
  if (auto r = co_await file.flush(); !r) co_return r;
  if (o.prealloc == Qcow2CreateOptions::Prealloc::kOff) co_return Result<void>{};

  // preallocation=metadata: map every guest cluster to a host cluster.
  std::shared_ptr<BlockDevice> alias(&file, [](BlockDevice*) {});
  auto q = co_await open_impl(nullptr, alias, nullptr, Qcow2OpenOptions{});
  if (!q) co_return make_error(q.error());
  Qcow2Impl& img = **q;
  const uint64_t clusters = div_round_up(o.size, cs);
  const uint64_t step = std::max<uint64_t>(1, (8u << 20) / cs);
  for (uint64_t gc = 0; gc < clusters; gc += step) {
    uint64_t n = std::min(step, clusters - gc);
    auto host = co_await img.rc->allocate(n);
    if (!host) co_return make_error(host.error());
    for (uint64_t i = 0; i < n; ++i) {
      L2Entry e{(*host + i * cs) | kFlagCopied, h.extended_l2() ? 0xffffffffull : 0};
      if (auto r = co_await img.set_entry(gc + i, e); !r) co_return r;
    }
    if (auto r = co_await img.maybe_write_back(); !r) co_return r;
  }
  co_return co_await img.close();
}

}  // namespace blkmirror
