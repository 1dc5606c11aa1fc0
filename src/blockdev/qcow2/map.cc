// Guest offset -> L2 entry, and the metadata checks on the way (an entry that
// points past the file or into metadata means the image is corrupt).
#include <fmt/format.h>

#include "base/align.h"
#include "blockdev/qcow2/qcow2_impl.h"

namespace blkmirror {

using namespace qcow2;

tl::unexpected<Error> Qcow2Impl::corrupt(const std::string& what) const {
  return make_plain_error(kCorruptErrno, fmt::format("qcow2 image {}: {}", name, what));
}

bool Qcow2Impl::is_metadata(uint64_t c) const {
  if (c == 0) return true;  // the header
  uint64_t l1_first = hdr.l1_table_offset >> cb();
  uint64_t l1_clusters = div_round_up(uint64_t{hdr.l1_size} * 8, cs());
  if (c >= l1_first && c < l1_first + l1_clusters) return true;
  // The bitmap directory (QEMU's default overlap checks cover it too).
  if (bitmaps_ext.directory_size) {
    const uint64_t dir_first = bitmaps_ext.directory_offset >> cb();
    if (c >= dir_first && c < dir_first + div_round_up(bitmaps_ext.directory_size, cs()))
      return true;
  }
  return rc->is_metadata(c) || l2_clusters.count(c) != 0;
}

Task<Result<std::optional<Qcow2Impl::Slot>>> Qcow2Impl::find_slot(uint64_t gc, bool create) {
  uint64_t i1 = gc / hdr.l2_entries();
  if (i1 >= l1.size())
    co_return make_error(EINVAL,
                         fmt::format("qcow2 {}: guest cluster {} beyond the L1 table", name, gc));
  AsyncMutex::Guard guard;
  if ((l1[i1] & kOffsetMask) == 0) {
    if (!create) co_return std::optional<Slot>{};
    guard = co_await l1_mutex.lock();  // one writer makes the table; the others wait and use it
  }
  if ((l1[i1] & kOffsetMask) == 0) {
    auto host = co_await rc->allocate(1);
    if (!host) co_return make_error(host.error());
    l2_clusters.insert(*host >> cb());
    l2->create(*host);
    l1[i1] = *host | kFlagCopied;
    l1_dirty.insert(i1);
  }
  guard.release();
  uint64_t off = l1[i1] & kOffsetMask;
  if ((l1[i1] & kL1ReservedMask) || off + cs() > file->length() || off == 0 ||
      rc->is_metadata(off >> cb()))
    co_return corrupt(fmt::format("L1 entry {} ({:#x}) points to an invalid L2 table (past the "
                                  "end of the file at {} bytes, or into metadata)",
                                  i1, l1[i1], file->length()));
  auto t = co_await l2->get(off);
  if (!t) co_return make_error(t.error());
  co_return Slot{*t, gc % hdr.l2_entries()};
}

Result<void> Qcow2Impl::check_entry(uint64_t gc, const L2Entry& e) const {
  auto bad = [&](const char* why, uint64_t host) {
    return corrupt(fmt::format("L2 entry for guest offset {:#x} ({:#x}) {} (host offset {:#x}, "
                               "file size {})",
                               gc << cb(), e.word, why, host, file->length()));
  };
  if (e.compressed()) {
    if (ext() && e.bitmap != 0) return bad("is compressed but has a subcluster bitmap", 0);
    Compressed c = decode_compressed(e.word, cb());
    if (c.offset >= file->length() || c.offset < cs())
      return bad("points past the file or into the header", c.offset);
    return {};
  }
  uint64_t host = e.host();
  if (host == 0) {
    if (e.copied()) return bad("maps host offset 0 (external data files are not supported)", 0);
    if (ext() && (e.bitmap & 0xffffffffu))
      return bad("has allocated subclusters but no host cluster", 0);
    return {};
  }
  if (e.word & kL2ReservedMask & ~kFlagZero) return bad("has reserved bits set", host);
  if (!is_aligned(host, cs())) return bad("is not cluster aligned", host);
  if (host >= file->length()) return bad("points past the end of the file", host);
  if (is_metadata(host >> cb())) return bad("points into metadata", host);
  if (ext() && ((e.bitmap & 0xffffffffu) & (e.bitmap >> 32)))
    return bad("has subclusters both allocated and zero", host);
  return {};
}

Task<Result<L2Entry>> Qcow2Impl::entry(uint64_t gc) {
  auto slot = co_await find_slot(gc, false);
  if (!slot) co_return make_error(slot.error());
  if (!*slot) co_return L2Entry{};
  L2Entry e = load_l2((*slot)->table->data, (*slot)->index, ext());
  if (auto r = check_entry(gc, e); !r) co_return make_error(r.error());
  co_return e;
}

Task<Result<void>> Qcow2Impl::set_entry(uint64_t gc, const L2Entry& e) {
  auto slot = co_await find_slot(gc, true);
  if (!slot) co_return make_error(slot.error());
  store_l2((*slot)->table->data, (*slot)->index, ext(), e);
  l2->mark_dirty((*slot)->table);
  co_return Result<void>{};
}

Task<Result<Qcow2Impl::Run>> Qcow2Impl::resolve(uint64_t guest, uint64_t max_len) {
  const uint64_t gc = guest >> cb();
  const uint64_t per_table = hdr.l2_entries();
  auto slot = co_await find_slot(gc, false);
  if (!slot) co_return make_error(slot.error());
  if (!*slot) {
    // No L2 table: unallocated up to the end of what the missing table would map.
    uint64_t table_end = (gc / per_table + 1) * per_table * cs();
    co_return Run{Kind::kUnallocated, std::min(max_len, table_end - guest), 0, 0};
  }
  const auto& table = (*slot)->table;
  const uint64_t u = unit();
  Run run;
  uint64_t pos = guest;
  const uint64_t end = guest + max_len;
  uint64_t c = gc;
  bool first = true;
  while (pos < end && c / per_table == gc / per_table) {
    L2Entry e = load_l2(table->data, c % per_table, ext());
    if (auto r = check_entry(c, e); !r) co_return make_error(r.error());
    uint64_t cstart = c << cb();
    uint64_t in = pos - cstart;
    if (e.compressed()) {
      if (!first) break;
      co_return Run{Kind::kCompressed, std::min(end, cstart + cs()) - pos, 0, e.word};
    }
    // Walk the units (subclusters) of this cluster.
    while (in < cs() && pos < end) {
      uint32_t sc = static_cast<uint32_t>(in / (ext() ? u : cs()));
      Kind k = entry_kind(e, ext(), sc);
      uint64_t host = k == Kind::kNormal ? e.host() + in : 0;
      if (first) {
        run.kind = k;
        run.host = host;
        first = false;
      } else if (k != run.kind || (k == Kind::kNormal && host != run.host + run.length)) {
        co_return run;
      }
      uint64_t unit_end = ext() ? align_down(in, u) + u : cs();
      uint64_t n = std::min(unit_end - in, end - pos);
      run.length += n;
      pos += n;
      in += n;
    }
    ++c;
  }
  co_return run;
}

}  // namespace blkmirror
