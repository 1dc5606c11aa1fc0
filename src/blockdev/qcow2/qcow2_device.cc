// Qcow2Device: open (validate, then load the L1 and refcount tables), the public
// operations (validate the request, then dispatch to the mechanisms), header
// rewrites, grow, close, and marking an image corrupt.
#include "blockdev/qcow2/qcow2_device.h"

#include <algorithm>

#include <fmt/format.h>

#include "base/align.h"
#include "blockdev/qcow2/qcow2_impl.h"

namespace blkmirror {

using namespace qcow2;

namespace {

// Reads and parses the header of `file`.
Task<Result<Header>> read_header(BlockDevice& file) {
  const std::string name = file.describe();
  // The fixed part first, for cluster_bits; then the whole first cluster.
  uint64_t n = std::min<uint64_t>(file.length(), kV3HeaderLength);
  std::vector<std::byte> head(n);
  if (n)
    if (auto r = co_await file.read(0, head); !r) co_return make_error(r.error());
  if (n >= 24 && load_be32(head.data()) == kMagic) {
    uint32_t bits = load_be32(&head[20]);
    if (bits >= kMinClusterBits && bits <= kMaxClusterBits) {
      n = std::min<uint64_t>(file.length(), uint64_t{1} << bits);
      head.resize(n);
      if (auto r = co_await file.read(0, head); !r) co_return make_error(r.error());
    }
  }
  co_return parse_header(head, name);
}

Qcow2Info info_of(const Header& h) {
  Qcow2Info i;
  i.version = h.version;
  i.virtual_size = h.size;
  i.cluster_bits = h.cluster_bits;
  i.refcount_bits = h.refcount_bits();
  i.extended_l2 = h.extended_l2();
  i.compression_zstd = h.compression_type == 1;
  i.dirty = h.incompatible & kIncompatDirty;
  i.corrupt = h.incompatible & kIncompatCorrupt;
  i.backing_file = h.backing_file;
  i.backing_format = h.backing_format;
  return i;
}

Task<Result<std::vector<uint64_t>>> read_table(BlockDevice& file, uint64_t off, uint64_t entries) {
  std::vector<std::byte> bytes(entries * 8);
  if (entries)
    if (auto r = co_await file.read(off, bytes); !r) co_return make_error(r.error());
  std::vector<uint64_t> out(entries);
  for (uint64_t i = 0; i < entries; ++i) out[i] = load_be64(&bytes[i * 8]);
  co_return out;
}

// Why an image with this header cannot be written, or "".
std::string writable_refusal(const Header& h) {
  if (h.incompatible & kIncompatCorrupt)
    return "marked corrupt; it can only be opened read-only ('qemu-img check -r all' repairs it)";
  if (h.incompatible & kIncompatDirty)
    return "dirty (refcounts not up to date); run 'qemu-img check -r all' or open it read-only";
  if (h.nb_snapshots)
    return "has internal snapshots; writing to such images is not supported (open it read-only)";
  return "";
}

}  // namespace

Qcow2Impl::Qcow2Impl(Loop* l, BlockDevicePtr f, BlockDevicePtr b, Header h, Qcow2OpenOptions o)
    : loop(l), file(std::move(f)), backing(std::move(b)), hdr(std::move(h)), opts(o) {
  name = file->describe();
  update_info();
}

void Qcow2Impl::update_info() { info = info_of(hdr); }

Result<void> Qcow2Impl::check_writable(const char* what, uint64_t off) const {
  if (closed)
    return make_error(EIO, fmt::format("{} qcow2 {} at {}: image is closed", what, name, off));
  if (corrupt_marked)
    return make_error(EIO,
                      fmt::format("{} qcow2 {} at {}: image is marked corrupt", what, name, off));
  if (read_only) return make_error(EROFS, fmt::format("{} qcow2 {} at {}", what, name, off));
  return {};
}

Task<Result<void>> Qcow2Impl::write_header() {
  auto bytes = serialize_header(hdr);
  if (!bytes) co_return make_error(bytes.error());
  // Only the bytes the header uses: the rest of the first cluster is left alone.
  if (auto r = co_await file->write(0, *bytes, {}); !r) co_return r;
  if (auto r = co_await file->flush(); !r) co_return r;
  update_info();
  co_return Result<void>{};
}

Task<Error> Qcow2Impl::on_error(Error e) {
  if (e.code.value() != kCorruptErrno || e.code.category() != std::generic_category()) co_return e;
  std::string msg = e.context;
  if (!read_only && !corrupt_marked) {
    corrupt_marked = true;
    hdr.incompatible |= kIncompatCorrupt;
    if (hdr.version >= 3) {
      (void)co_await write_header();
      msg += "; image marked corrupt, further writes refused";
    }
  }
  corrupt_marked = true;
  co_return Error{std::error_code(EIO, std::generic_category()), msg, true};
}

Task<Result<Qcow2Info>> Qcow2Device::probe(BlockDevice& file) {
  auto h = co_await read_header(file);
  if (!h) co_return make_error(h.error());
  co_return info_of(*h);
}

Task<Result<std::shared_ptr<Qcow2Device>>> Qcow2Device::open(Loop& loop, BlockDevicePtr file,
                                                             BlockDevicePtr backing,
                                                             Qcow2OpenOptions opts) {
  auto impl = co_await open_impl(&loop, std::move(file), std::move(backing), opts);
  if (!impl) co_return make_error(impl.error());
  co_return std::shared_ptr<Qcow2Device>(new Qcow2Device(std::move(*impl)));
}

Task<Result<std::unique_ptr<Qcow2Impl>>> open_impl(Loop* loop, BlockDevicePtr file,
                                                   BlockDevicePtr backing, Qcow2OpenOptions opts) {
  auto h = co_await read_header(*file);
  if (!h) co_return make_error(h.error());
  const std::string name = file->describe();
  const uint64_t cs = h->cluster_size(), flen = file->length();
  bool ro = opts.read_only || file->caps().read_only;
  auto refuse = [&](const std::string& why) {
    return make_plain_error(EINVAL, fmt::format("qcow2 image {}: {}", name, why));
  };
  // Tables must lie inside the file and not on top of each other.
  uint64_t l1_bytes = uint64_t{h->l1_size} * 8;
  if (h->l1_size && h->l1_table_offset + l1_bytes > flen)
    co_return refuse(
        fmt::format("L1 table at {:#x} ({} bytes) lies past the end of the file ({} bytes)",
                    h->l1_table_offset, l1_bytes, flen));
  uint64_t rt_bytes = uint64_t{h->refcount_table_clusters} * cs;
  if (h->refcount_table_offset + rt_bytes > flen)
    co_return refuse(fmt::format("refcount table at {:#x} ({} bytes) lies past the end of the file "
                                 "({} bytes)",
                                 h->refcount_table_offset, rt_bytes, flen));
  if (h->l1_size && h->l1_table_offset < h->refcount_table_offset + rt_bytes &&
      h->refcount_table_offset < h->l1_table_offset + l1_bytes)
    co_return refuse("the L1 table overlaps the refcount table");
  if (!ro) {
    if (auto w = writable_refusal(*h); !w.empty()) co_return refuse(w);
  }
  auto l1 = co_await read_table(*file, h->l1_table_offset, h->l1_size);
  if (!l1) co_return make_error(l1.error());
  auto rt = co_await read_table(*file, h->refcount_table_offset, rt_bytes / 8);
  if (!rt) co_return make_error(rt.error());

  auto impl = std::make_unique<Qcow2Impl>(loop, file, std::move(backing), std::move(*h), opts);
  Qcow2Impl& q = *impl;
  q.read_only = ro;
  q.l1 = std::move(*l1);
  for (uint64_t e : q.l1)
    if (e & kOffsetMask) q.l2_clusters.insert((e & kOffsetMask) >> q.cb());
  uint64_t cache_bytes = opts.l2_cache_bytes ? opts.l2_cache_bytes : (32ull << 30) / 65536 * 8;
  q.l2 = std::make_unique<L2Cache>(*file, cs, std::max<uint64_t>(cache_bytes / cs, 4));
  q.rc = std::make_unique<Refcounts>(
      *file,
      Refcounts::Params{name, q.hdr.cluster_bits, q.hdr.refcount_order, q.hdr.refcount_table_offset,
                        q.hdr.refcount_table_clusters},
      std::move(*rt), flen);
  Qcow2Impl* qp = &q;
  q.rc->on_table_moved = [qp](uint64_t off, uint32_t clusters) -> Task<Result<void>> {
    qp->hdr.refcount_table_offset = off;
    qp->hdr.refcount_table_clusters = clusters;
    co_return co_await qp->write_header();
  };
  q.rc->holds_metadata = [qp](uint64_t cluster) { return qp->is_metadata(cluster); };
  if (auto r = co_await q.rc->count_used(); !r) co_return make_error(r.error());

  BlockCaps& c = q.caps;
  c.read_only = ro;
  c.can_zero = true;
  c.can_zero_unmap = q.hdr.version >= 3 || !q.has_backing();
  c.can_trim = true;
  c.can_fua = false;
  c.has_block_status = true;
  c.cluster_size = cs;
  c.has_backing = q.has_backing();
  c.min_block = 1;
  c.pref_block = static_cast<uint32_t>(
      std::min<uint64_t>(std::max<uint64_t>(4096, file->caps().pref_block), cs));
  c.max_transfer = 32u << 20;
  c.zero_init = !q.has_backing() && std::all_of(q.l1.begin(), q.l1.end(),
                                                [](uint64_t e) { return (e & kOffsetMask) == 0; });

  // The bitmaps extension (bitmap_io.cc); writable: the other autoclear bits
  // cleared and every bitmap marked in use before the first write.
  if (auto r = co_await q.open_bitmaps(); !r) co_return make_error(r.error());
  co_return impl;
}

Qcow2Device::Qcow2Device(std::unique_ptr<Qcow2Impl> impl) : impl_(std::move(impl)) {}
Qcow2Device::~Qcow2Device() = default;

const Qcow2Info& Qcow2Device::info() const { return impl_->info; }
void Qcow2Device::set_backing(BlockDevicePtr b) {
  impl_->backing = std::move(b);
  impl_->caps.has_backing = impl_->has_backing();
}
const BlockDevicePtr& Qcow2Device::backing() const { return impl_->backing; }
uint64_t Qcow2Device::allocated_bytes() const {
  return impl_->rc->used_clusters() * impl_->cs();
}
std::string Qcow2Device::describe() const { return impl_->name; }
uint64_t Qcow2Device::length() const { return impl_->hdr.size; }
const BlockCaps& Qcow2Device::caps() const { return impl_->caps; }

namespace {

Result<void> check_range(const Qcow2Impl& q, const char* what, uint64_t off, uint64_t len) {
  if (!range_within(off, len, q.hdr.size))
    return make_error(EINVAL, fmt::format("{} qcow2 {}: range {}+{} past the end ({})", what,
                                          q.name, off, len, q.hdr.size));
  return {};
}

}  // namespace

#define QCOW2_TRY(expr)                                               \
  do {                                                                \
    auto _r = (expr);                                                 \
    if (!_r) co_return make_error(co_await impl_->on_error(_r.error())); \
  } while (0)

Task<Result<void>> Qcow2Device::read(uint64_t off, std::span<std::byte> buf, ReadFlags) {
  auto& q = *impl_;
  if (auto r = check_range(q, "read", off, buf.size()); !r) co_return r;
  if (q.closed) co_return make_error(EIO, fmt::format("read qcow2 {}: image is closed", q.name));
  if (buf.empty()) co_return Result<void>{};
  auto guard = co_await q.locks.lock(off >> q.cb(), (off + buf.size() - 1) >> q.cb(), false);
  QCOW2_TRY(co_await q.read_unlocked(off, buf));
  co_return Result<void>{};
}

Task<Result<void>> Qcow2Device::write(uint64_t off, std::span<const std::byte> buf, WriteFlags f) {
  auto& q = *impl_;
  if (auto r = check_range(q, "write", off, buf.size()); !r) co_return r;
  if (auto r = q.check_writable("write", off); !r) co_return r;
  QCOW2_TRY(co_await q.before_guest_write());
  if (buf.empty()) co_return Result<void>{};
  QCOW2_TRY(co_await q.write(off, buf));
  QCOW2_TRY(co_await q.maybe_write_back());
  if (f.fua) QCOW2_TRY(co_await q.flush());
  co_return Result<void>{};
}

Task<Result<void>> Qcow2Device::write_zeroes(uint64_t off, uint64_t len, ZeroFlags f) {
  auto& q = *impl_;
  if (auto r = check_range(q, "write zeroes", off, len); !r) co_return r;
  if (auto r = q.check_writable("write zeroes", off); !r) co_return r;
  QCOW2_TRY(co_await q.before_guest_write());
  if (len == 0) co_return Result<void>{};
  auto r = co_await q.write_zeroes(off, len, f);
  if (!r && r.error().errnum() == ENOTSUP && f.no_fallback) co_return r;
  QCOW2_TRY(r);
  QCOW2_TRY(co_await q.maybe_write_back());
  if (f.fua) QCOW2_TRY(co_await q.flush());
  co_return Result<void>{};
}

Task<Result<void>> Qcow2Device::discard(uint64_t off, uint64_t len) {
  auto& q = *impl_;
  if (auto r = check_range(q, "discard", off, len); !r) co_return r;
  if (auto r = q.check_writable("discard", off); !r) co_return r;
  QCOW2_TRY(co_await q.before_guest_write());
  if (len == 0) co_return Result<void>{};
  QCOW2_TRY(co_await q.discard(off, len));
  QCOW2_TRY(co_await q.maybe_write_back());
  co_return Result<void>{};
}

Task<Result<void>> Qcow2Device::flush() {
  auto& q = *impl_;
  if (q.closed) co_return make_error(EIO, fmt::format("flush qcow2 {}: image is closed", q.name));
  if (q.read_only) co_return Result<void>{};
  QCOW2_TRY(co_await q.flush());
  co_return Result<void>{};
}

Task<Result<Extent>> Qcow2Device::block_status(uint64_t off, uint64_t len) {
  auto& q = *impl_;
  if (len == 0 || !range_within(off, len, q.hdr.size))
    co_return make_error(
        EINVAL, fmt::format("block status qcow2 {} at {}+{}: out of range", q.name, off, len));
  if (q.closed)
    co_return make_error(EIO, fmt::format("block status qcow2 {}: image is closed", q.name));
  auto r = co_await q.block_status(off, len);
  if (!r) co_return make_error(co_await q.on_error(r.error()));
  co_return *r;
}

Task<Result<void>> Qcow2Device::set_backing_link(std::optional<std::string> file,
                                                 std::optional<std::string> format) {
  auto& q = *impl_;
  if (auto r = q.check_writable("set backing link", 0); !r) co_return r;
  if (file && file->size() > kMaxBackingNameLength)
    co_return make_plain_error(
        EINVAL,
        fmt::format("qcow2 {}: backing file name too long ({} bytes)", q.name, file->size()));
  Header saved = q.hdr;
  q.hdr.backing_file = file;
  q.hdr.backing_format = file ? format : std::nullopt;
  if (auto r = serialize_header(q.hdr); !r) {
    q.hdr = saved;
    co_return make_error(r.error());
  }
  auto r = co_await q.write_header();
  if (!r) q.hdr = saved;
  co_return r;
}

Task<Result<void>> Qcow2Device::grow(uint64_t new_size) {
  auto r = co_await impl_->grow(new_size);
  if (!r) co_return make_error(co_await impl_->on_error(r.error()));
  co_return r;
}

Task<Result<void>> Qcow2Device::resize(uint64_t new_length) {
  co_return co_await grow(new_length);
}

Task<Result<void>> Qcow2Impl::grow(uint64_t new_size) {
  if (auto r = check_writable("grow", new_size); !r) co_return r;
  if (auto r = co_await before_guest_write(); !r) co_return r;
  // QEMU's rule (and text): qcow2 sizes are whole sectors.
  if (new_size % 512)
    co_return make_plain_error(EINVAL, "The new size must be a multiple of 512");
  if (new_size < hdr.size)
    co_return make_plain_error(
        ENOTSUP, fmt::format("qcow2 {}: shrinking ({} -> {} bytes) is not supported", name,
                             hdr.size, new_size));
  Header probe = hdr;
  probe.size = new_size;
  const uint64_t need = probe.l1_entries_for(new_size);
  if (need * 8 > kMaxL1Bytes || new_size > (uint64_t{1} << 62))
    co_return make_plain_error(EFBIG,
                               fmt::format("qcow2 {}: virtual size {} too large", name, new_size));
  // Nothing may change the mapping meanwhile.
  auto guard = co_await locks.lock(0, ~0ull, true);
  if (auto r = co_await flush(); !r) co_return r;
  if (need > hdr.l1_size) {
    // A bigger L1 table elsewhere: written and flushed before the header points at it.
    const uint64_t old_off = hdr.l1_table_offset;
    const uint64_t old_bytes = uint64_t{hdr.l1_size} * 8;
    const uint64_t clusters = div_round_up(need * 8, cs());
    auto host = co_await rc->allocate(clusters);
    if (!host) co_return make_error(host.error());
    l1.resize(need, 0);
    std::vector<std::byte> bytes(clusters * cs(), std::byte{0});
    for (uint64_t i = 0; i < l1.size(); ++i) store_be64(&bytes[i * 8], l1[i]);
    if (auto r = co_await file->write(*host, bytes, {}); !r) co_return r;
    if (auto r = co_await file->flush(); !r) co_return r;
    hdr.l1_table_offset = *host;
    hdr.l1_size = static_cast<uint32_t>(need);
    hdr.size = new_size;
    if (auto r = co_await write_header(); !r) co_return r;
    if (old_bytes) {
      std::vector<std::pair<uint64_t, uint64_t>> old;
      old.emplace_back(old_off, align_up(old_bytes, cs()));
      auto r = co_await rc->apply_frees(std::move(old));
      if (!r) co_return r;
    }
  } else {
    hdr.size = new_size;
    if (auto r = co_await write_header(); !r) co_return r;
  }
  co_return Result<void>{};
}

Task<Result<void>> Qcow2Device::close() {
  auto r = co_await impl_->close();
  if (!r) co_return make_error(co_await impl_->on_error(r.error()));
  co_return r;
}

Task<Result<void>> Qcow2Impl::close() {
  if (closed) co_return Result<void>{};
  if (auto r = co_await write_back_clean(); !r) co_return r;
  closed = true;
  co_return Result<void>{};
}

Task<Result<void>> Qcow2Impl::write_back_clean() {
  if (read_only || corrupt_marked) co_return Result<void>{};
  if (auto r = co_await release_bitmaps(); !r) co_return r;
  auto guard = co_await locks.lock(0, ~0ull, true);
  if (auto r = co_await flush(); !r) co_return r;
  // The frees of the last flush dirtied refcount blocks: write them too.
  if (auto r = co_await flush(); !r) co_return r;
  if (hdr.incompatible & kIncompatDirty) {
    hdr.incompatible &= ~kIncompatDirty;
    if (auto r = co_await write_header(); !r) co_return r;
  }
  // Trim the file's growth steps back to the clusters in use.
  uint64_t end = rc->alloc_end();
  if (file->length() > end)
    if (auto r = co_await file->resize(end); !r && r.error().errnum() != ENOTSUP) co_return r;
  co_return Result<void>{};
}

Task<Result<void>> Qcow2Device::set_read_only(bool ro) {
  auto r = co_await impl_->set_read_only(ro);
  if (!r) co_return make_error(co_await impl_->on_error(r.error()));
  co_return r;
}

Task<Result<void>> Qcow2Impl::set_read_only(bool ro) {
  if (closed) co_return make_error(EIO, fmt::format("reopen qcow2 {}: image is closed", name));
  if (ro == read_only) co_return Result<void>{};
  if (ro) {
    // Everything written back while the file still takes writes; then the file
    // (a view of the file node: it only follows; a FileDevice: reopened).
    if (auto r = co_await write_back_clean(); !r) co_return r;
    if (auto r = co_await file->set_read_only(true); !r) co_return r;
    read_only = caps.read_only = true;
    co_return Result<void>{};
  }
  // The header on disk, not the one read at open: while we only read, a
  // force-share user or a repair may have changed it.
  auto h = co_await read_header(*file);
  if (!h) co_return make_error(h.error());
  if (auto w = writable_refusal(*h); !w.empty())
    co_return make_plain_error(EINVAL, fmt::format("qcow2 image {}: {}", name, w));
  if (corrupt_marked)
    co_return make_plain_error(EINVAL,
                               fmt::format("qcow2 image {}: marked corrupt while open", name));
  if (auto r = co_await file->set_read_only(false); !r) co_return r;
  read_only = caps.read_only = false;
  {
    // As on a writable open: autoclear bits, bitmaps marked in use.
    if (auto r = co_await claim_bitmaps(); !r) {
      read_only = caps.read_only = true;
      (void)co_await file->set_read_only(true);
      co_return r;
    }
  }
  co_return Result<void>{};
}

}  // namespace blkmirror
