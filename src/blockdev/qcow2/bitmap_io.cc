// The qcow2 bitmaps extension on disk (format and checks: bitmaps.h): reading
// the directory at open, marking bitmaps in use on a writable open, loading
// their data into named bitmaps, storing them at close and removing one.
//
// On-disk ORDERING RULE (every directory change, commit_bitmap_directory):
//   new bitmap data and tables, new directory, in newly allocated clusters;
//   flush (refcount increments, then those bytes); header pointing at the new
//   directory (autoclear bit 0 set, or extension and bit gone); flush; only
//   then the old directory, tables and data are freed.
// A crash at any point leaves either the old directory or the new one in
// force, each pointing at intact clusters; at worst clusters leak. The in-use
// flag is set in the directory (written and flushed) before open() returns,
// so before the first guest write, and cleared only by the store at close.
#include <fmt/format.h>

#include <algorithm>

#include "base/align.h"
#include "blockdev/qcow2/qcow2_impl.h"

namespace blkmirror {

using namespace qcow2;

namespace {

HeaderExtension* find_ext(Header& h, uint32_t type) {
  for (auto& e : h.extensions)
    if (e.type == type) return &e;
  return nullptr;
}

}  // namespace

Task<Result<void>> Qcow2Impl::open_bitmaps() {
  HeaderExtension* ext = find_ext(hdr, kExtBitmaps);
  const bool valid = ext && (hdr.autoclear & kAutoclearBitmaps);
  if (valid) {
    auto fail = [this](const std::string& why) {
      return make_plain_error(EINVAL, fmt::format("qcow2 image {}: {}", name, why));
    };
    auto e = parse_bitmaps_extension(ext->data, cs());
    if (!e) co_return fail(e.error().message());
    if (e->directory_offset + e->directory_size > file->length())
      co_return fail(
          fmt::format("bitmap directory at {:#x} ({} bytes) lies past the end of the file",
                      e->directory_offset, e->directory_size));
    std::vector<std::byte> bytes(e->directory_size);
    if (auto r = co_await file->read(e->directory_offset, bytes); !r) co_return r;
    auto dir = parse_bitmap_directory(bytes, *e, bitmap_geometry());
    if (!dir) co_return fail(dir.error().message());
    bitmaps_ext = *e;
    bitmap_dir = std::move(*dir);
    for (const auto& d : bitmap_dir)
      if (d.in_use()) bitmaps_stale.insert(d.name);
  }
  if (read_only) co_return Result<void>{};
  co_return co_await claim_bitmaps();
}

Task<Result<void>> Qcow2Impl::claim_bitmaps() {
  HeaderExtension* ext = find_ext(hdr, kExtBitmaps);
  const bool valid = ext && (hdr.autoclear & kAutoclearBitmaps);
  // Autoclear bits we do not keep up to date are cleared before the first
  // write, as the format asks; a bitmaps extension whose bit is clear was
  // modified by a program without bitmap support: dropped, as QEMU does (its
  // clusters leak until 'qemu-img check -r leaks').
  const uint64_t keep = valid ? kAutoclearBitmaps : 0;
  const bool drop = ext && !valid;
  if (hdr.autoclear != (hdr.autoclear & keep) || drop) {
    hdr.autoclear &= keep;
    if (drop) std::erase_if(hdr.extensions, [](auto& x) { return x.type == kExtBitmaps; });
    if (auto r = co_await write_header(); !r) co_return r;
  }
  co_return co_await mark_bitmaps_in_use();
}

Task<Result<void>> Qcow2Impl::mark_bitmaps_in_use() {
  auto dir = bitmap_dir;
  bool change = false;
  for (auto& d : dir) {
    change |= !d.in_use();
    d.flags |= kBitmapInUse;
  }
  if (!change) co_return Result<void>{};
  co_return co_await commit_bitmap_directory(std::move(dir), {});
}

// A bad bitmap table or data cluster fails the load (the node is not added, as
// QEMU's open fails) without marking the image corrupt: its guest data is fine.
Task<Result<std::vector<uint64_t>>> Qcow2Impl::read_bitmap_table(const BitmapDirEntry& e) {
  const uint64_t bytes = uint64_t{e.table_size} * 8;
  if (e.table_offset + bytes > file->length())
    co_return make_plain_error(
        EINVAL, fmt::format("bitmap '{}': table at {:#x} lies past the end of the file", e.name,
                            e.table_offset));
  std::vector<std::byte> raw(bytes);
  if (auto r = co_await file->read(e.table_offset, raw); !r) co_return make_error(r.error());
  std::vector<uint64_t> t(e.table_size);
  for (uint64_t i = 0; i < t.size(); ++i) {
    t[i] = load_be64(&raw[i * 8]);
    if (!check_bitmap_table_entry(t[i], cs()))
      co_return make_plain_error(
          EINVAL,
          fmt::format("bitmap '{}': invalid bitmap table entry {} ({:#x})", e.name, i, t[i]));
  }
  co_return t;
}

Task<Result<std::vector<NamedBitmap>>> Qcow2Impl::load_bitmaps() {
  std::vector<NamedBitmap> out;
  for (const auto& e : bitmap_dir) {
    NamedBitmap& b = out.emplace_back(e.name, e.granularity(), hdr.size);
    b.persistent = true;
    b.enabled = e.enabled();
    b.read_only = read_only;
    if (bitmaps_stale.count(e.name)) {
      b.inconsistent = true;  // its data is unusable: not read
      continue;
    }
    auto t = co_await read_bitmap_table(e);
    if (!t)
      co_return with_context(t.error(), fmt::format("Could not read bitmap_table table from "
                                                    "image for bitmap '{}'",
                                                    e.name));
    DirtyBitmap bits = b.bits();
    std::vector<std::byte> buf(cs());
    for (uint64_t i = 0; i < t->size(); ++i) {
      const uint64_t host = (*t)[i] & kBitmapTableOffsetMask;
      if (host == 0) {
        if ((*t)[i] & kBitmapTableAllOnes) load_bitmap_ones(cs(), i, bits);
        continue;
      }
      if (host + cs() > file->length() || is_metadata(host >> cb()))
        co_return make_plain_error(EINVAL, fmt::format("Could not read bitmap '{}' from image: "
                                                       "data cluster {:#x} lies past the end of "
                                                       "the file or in metadata",
                                                       e.name, host));
      if (auto r = co_await file->read(host, buf); !r)
        co_return with_context(r.error(),
                               fmt::format("Could not read bitmap '{}' from image", e.name));
      (void)load_bitmap_cluster(buf, i, bits);
    }
    b.restore(bits);
  }
  co_return out;
}

Result<void> Qcow2Impl::can_store_bitmap(const BitmapSet& set, const std::string& bname,
                                         uint64_t granularity) const {
  auto fail = [](const std::string& why) { return make_plain_error(EINVAL, why); };
  if (hdr.version < 3) return fail("Cannot store dirty bitmaps in qcow2 v2 files");
  if (auto r = check_bitmap_constraints(bitmap_geometry(), bname, granularity); !r)
    return fail(r.error().message());
  uint64_t n = 1, dir_bytes = bitmap_dir_entry_bytes(bname.size());
  for (const NamedBitmap& b : set) {
    if (!b.persistent) continue;
    ++n;
    dir_bytes += bitmap_dir_entry_bytes(b.name().size());
  }
  if (n > kMaxBitmaps) return fail("Maximum number of persistent bitmaps is already reached");
  if (dir_bytes > kMaxBitmapDirectoryBytes) return fail("Not enough space in the bitmap directory");
  return {};
}

Task<Result<BitmapDirEntry>> Qcow2Impl::write_bitmap(const NamedBitmap& b) {
  const BitmapGeometry g = bitmap_geometry();
  if (auto r = check_bitmap_constraints(g, b.name(), b.granularity()); !r)
    co_return with_context(r.error(),
                           fmt::format("Bitmap '{}' doesn't satisfy the constraints", b.name()));
  const uint64_t n = bitmap_table_entries(g, b.granularity());
  std::vector<std::byte> table(align_up(n * 8, cs()), std::byte{0});
  std::vector<std::byte> buf(cs());
  for (uint64_t i = 0; i < n; ++i) {
    if (!bitmap_cluster_dirty(b.bits(), i, cs())) continue;  // reads as zeroes
    auto host = co_await rc->allocate(1);
    if (!host) co_return make_error(host.error());
    store_bitmap_cluster(b.bits(), i, buf);
    if (auto r = co_await file->write(*host, buf, {}); !r) co_return make_error(r.error());
    store_be64(&table[i * 8], *host);
  }
  auto host = co_await rc->allocate(table.size() / cs());
  if (!host) co_return make_error(host.error());
  if (auto r = co_await file->write(*host, table, {}); !r) co_return make_error(r.error());
  BitmapDirEntry e;
  e.table_offset = *host;
  e.table_size = static_cast<uint32_t>(n);
  e.flags = b.enabled ? kBitmapAuto : 0;
  e.granularity_bits = static_cast<uint8_t>(std::countr_zero(b.granularity()));
  e.name = b.name();
  co_return e;
}

Task<std::vector<std::pair<uint64_t, uint64_t>>> Qcow2Impl::bitmap_clusters(
    const BitmapDirEntry& e) {
  std::vector<std::pair<uint64_t, uint64_t>> out;
  auto t = co_await read_bitmap_table(e);
  if (!t) co_return out;  // a table we cannot read: its clusters leak, nothing is harmed
  for (uint64_t entry : *t) {
    const uint64_t host = entry & kBitmapTableOffsetMask;
    if (host && host + cs() <= file->length() && !is_metadata(host >> cb()))
      out.emplace_back(host, cs());
  }
  out.emplace_back(e.table_offset, align_up(uint64_t{e.table_size} * 8, cs()));
  co_return out;
}

Task<Result<void>> Qcow2Impl::commit_bitmap_directory(
    std::vector<BitmapDirEntry> dir, std::vector<std::pair<uint64_t, uint64_t>> frees) {
  const BitmapsExtension old = bitmaps_ext;
  const Header saved = hdr;
  BitmapsExtension next;
  if (!dir.empty()) {
    auto bytes = encode_bitmap_directory(dir, bitmap_geometry());
    if (!bytes) co_return make_error(bytes.error());
    const uint64_t clusters = div_round_up(bytes->size(), cs());
    auto host = co_await rc->allocate(clusters);
    if (!host) co_return make_error(host.error());
    next = {static_cast<uint32_t>(dir.size()), bytes->size(), *host};
    bytes->resize(clusters * cs(), std::byte{0});
    if (auto r = co_await file->write(*host, *bytes, {}); !r) co_return r;
  }
  // Refcounts of the new clusters and their bytes are durable before the
  // header points at them.
  if (auto r = co_await flush(); !r) co_return r;
  std::erase_if(hdr.extensions, [](auto& x) { return x.type == kExtBitmaps; });
  if (dir.empty()) {
    hdr.autoclear &= ~kAutoclearBitmaps;
  } else {
    hdr.extensions.push_back({kExtBitmaps, encode_bitmaps_extension(next)});
    hdr.autoclear |= kAutoclearBitmaps;
  }
  if (auto r = co_await write_header(); !r) {
    hdr = saved;
    co_return r;
  }
  bitmaps_ext = next;
  bitmap_dir = std::move(dir);
  if (old.directory_size)
    frees.emplace_back(old.directory_offset, align_up(old.directory_size, cs()));
  if (auto r = co_await rc->apply_frees(std::move(frees)); !r) co_return r;
  // The decrements too, so a crash now leaks nothing.
  co_return co_await flush();
}

Task<Result<void>> Qcow2Impl::store_bitmaps(const BitmapSet& set) {
  if (read_only || closed || corrupt_marked) co_return Result<void>{};
  auto guard = co_await locks.lock(0, ~0ull, true);
  std::vector<BitmapDirEntry> dir;
  std::vector<std::pair<uint64_t, uint64_t>> frees;
  for (const auto& e : bitmap_dir) {
    const NamedBitmap* b = set.find(e.name);
    if (b && b->persistent && b->inconsistent) {
      dir.push_back(e);  // left as found: in use, for the user to remove
      continue;
    }
    // Replaced below, or removed: freed once the new directory is in force.
    auto c = co_await bitmap_clusters(e);
    frees.insert(frees.end(), c.begin(), c.end());
  }
  // Directory order: oldest first (the set lists the newest first).
  std::vector<const NamedBitmap*> order;
  for (const NamedBitmap& b : set)
    if (b.persistent && !b.inconsistent) order.insert(order.begin(), &b);
  for (const NamedBitmap* b : order) {
    auto e = co_await write_bitmap(*b);
    if (!e) co_return make_error(e.error());
    dir.push_back(std::move(*e));
  }
  auto r = co_await commit_bitmap_directory(std::move(dir), std::move(frees));
  if (r) {
    changed_since_store = false;
    bitmaps_released = !bitmap_dir.empty();
  }
  co_return r;
}

Task<Result<void>> Qcow2Impl::release_bitmaps() {
  if (read_only || closed || corrupt_marked || changed_since_store) co_return Result<void>{};
  auto dir = bitmap_dir;
  bool change = false;
  for (auto& d : dir) {
    if (!d.in_use() || bitmaps_stale.count(d.name)) continue;
    d.flags &= ~kBitmapInUse;
    change = true;
  }
  if (!change) co_return Result<void>{};
  auto r = co_await commit_bitmap_directory(std::move(dir), {});
  if (r) bitmaps_released = true;
  co_return r;
}

Task<Result<void>> Qcow2Impl::before_guest_write() {
  changed_since_store = true;
  if (!bitmaps_released) co_return Result<void>{};
  auto serial = co_await bitmap_mutex.lock();
  if (!bitmaps_released) co_return Result<void>{};
  auto r = co_await mark_bitmaps_in_use();
  if (r) bitmaps_released = false;
  co_return r;
}

Task<Result<void>> Qcow2Impl::remove_bitmap(const std::string& bname) {
  if (auto r = check_writable("remove bitmap", 0); !r) co_return r;
  auto guard = co_await locks.lock(0, ~0ull, true);
  auto dir = bitmap_dir;
  auto it = std::find_if(dir.begin(), dir.end(),
                         [&](const BitmapDirEntry& e) { return e.name == bname; });
  if (it == dir.end()) co_return Result<void>{};  // never stored: nothing to do
  auto frees = co_await bitmap_clusters(*it);
  dir.erase(it);
  bitmaps_stale.erase(bname);
  co_return co_await commit_bitmap_directory(std::move(dir), std::move(frees));
}

}  // namespace blkmirror

namespace blkmirror {

namespace {

class Qcow2BitmapStore final : public BitmapStore {
 public:
  explicit Qcow2BitmapStore(std::shared_ptr<Qcow2Device> d) : dev_(std::move(d)) {}
  Task<Result<std::vector<NamedBitmap>>> load() override { return dev_->load_bitmaps(); }
  Result<void> can_store(const BitmapSet& set, const std::string& name,
                         uint64_t granularity) const override {
    return dev_->can_store_bitmap(set, name, granularity);
  }
  Task<Result<void>> store(const BitmapSet& set) override { return dev_->store_bitmaps(set); }
  Task<Result<void>> remove(const std::string& name) override { return dev_->remove_bitmap(name); }

 private:
  std::shared_ptr<Qcow2Device> dev_;
};

}  // namespace

BitmapStorePtr qcow2_bitmap_store(std::shared_ptr<Qcow2Device> dev) {
  return std::make_shared<Qcow2BitmapStore>(std::move(dev));
}

Task<Result<std::vector<NamedBitmap>>> Qcow2Device::load_bitmaps() {
  co_return co_await impl_->load_bitmaps();
}

Result<void> Qcow2Device::can_store_bitmap(const BitmapSet& set, const std::string& name,
                                           uint64_t granularity) const {
  return impl_->can_store_bitmap(set, name, granularity);
}

Task<Result<void>> Qcow2Device::store_bitmaps(const BitmapSet& set) {
  auto r = co_await impl_->store_bitmaps(set);
  if (!r) co_return make_error(co_await impl_->on_error(r.error()));
  co_return r;
}

Task<Result<void>> Qcow2Device::remove_bitmap(const std::string& name) {
  auto r = co_await impl_->remove_bitmap(name);
  if (!r) co_return make_error(co_await impl_->on_error(r.error()));
  co_return r;
}

std::vector<Qcow2Device::StoredBitmapInfo> Qcow2Device::stored_bitmaps() const {
  std::vector<StoredBitmapInfo> out;
  for (const auto& e : impl_->bitmap_dir)
    out.push_back({e.name, e.granularity(), e.in_use(), e.enabled()});
  return out;
}

}  // namespace blkmirror
