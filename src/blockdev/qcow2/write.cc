// Writes, write-zeroes and discard. A write to clusters this image already owns
// (refcount 1, all touched subclusters allocated) goes straight to the host
// cluster under a shared cluster lock. Anything else takes the clusters
// exclusively: allocates fresh host clusters (contiguous for a run), fills the
// untouched part of each allocation unit from what the guest read there before
// (copy-on-write: backing, zeroes, compressed or shared data), writes the data,
// and only then changes the L2 entries in memory (flush.cc writes them out in
// order). The clusters an entry stops mapping are freed after the flush that
// writes the new entry (refcount.h).
#include <algorithm>
#include <cstring>

#include <fmt/format.h>

#include "base/align.h"
#include "blockdev/qcow2/qcow2_impl.h"

namespace blkmirror {

using namespace qcow2;

namespace {
constexpr uint64_t kMaxRunBytes = 8u << 20;  // largest allocation run written at once
}

void Qcow2Impl::free_entry(const L2Entry& e) {
  if (e.compressed()) {
    Compressed c = decode_compressed(e.word, cb());
    uint64_t start = align_down(c.offset, 512);
    rc->free_later(start, c.offset + c.length - start);
  } else if (e.host()) {
    rc->free_later(e.host(), cs());
  }
}

namespace {

// Units [first, last) of a cluster as a bitmap mask.
uint64_t unit_mask(uint64_t first, uint64_t last) {
  uint64_t m = 0;
  for (uint64_t i = first; i < last; ++i) m |= 1ull << i;
  return m;
}

}  // namespace

Task<Result<void>> Qcow2Impl::write(uint64_t off, std::span<const std::byte> buf) {
  const uint64_t first = off >> cb(), last = (off + buf.size() - 1) >> cb();
  {
    // Fast path: every touched cluster is ours and allocated where we write.
    auto guard = co_await locks.lock(first, last, false);
    struct Seg {
      uint64_t host;
      size_t at, len;
    };
    std::vector<Seg> segs;
    bool in_place = true;
    for (uint64_t pos = off; pos < off + buf.size() && in_place;) {
      uint64_t gc = pos >> cb(), cstart = gc << cb();
      uint64_t cend = std::min<uint64_t>(off + buf.size(), cstart + cs());
      auto e = co_await entry(gc);
      if (!e) co_return make_error(e.error());
      in_place = !e->compressed() && e->host() && e->copied() &&
                 e->host() + cs() <= file->length() &&
                 (!ext() || (e->word & kFlagZero) == 0);
      if (in_place && ext()) {
        uint64_t u = unit();
        uint64_t need = unit_mask((pos - cstart) / u, div_round_up(cend - cstart, u));
        in_place = (e->bitmap & need) == need;
      } else if (in_place && (e->word & kFlagZero)) {
        in_place = false;  // a preallocated zero cluster: the flag must go
      }
      if (in_place) {
        uint64_t host = e->host() + (pos - cstart);
        if (!segs.empty() && segs.back().host + segs.back().len == host)
          segs.back().len += cend - pos;
        else
          segs.push_back({host, pos - off, cend - pos});
      }
      pos = cend;
    }
    if (in_place) {
      for (const auto& s : segs)
        if (auto r = co_await file->write(s.host, buf.subspan(s.at, s.len), {}); !r) co_return r;
      co_return Result<void>{};
    }
  }
  auto guard = co_await locks.lock(first, last, true);
  co_return co_await write_locked(off, buf);
}

// Writes the guest data of an allocation run into its new host clusters, with
// what the rest of each allocation unit read before (copy-on-write). The new
// clusters start at a.host; the region [region_start, region_end) of guest bytes
// maps to a.host + rs onwards, and the guest data covers [pos, pos + data.size()).
// Fresh clusters (never written, file holes) already read as zeroes, so only the
// parts that are not zero are written: with nothing underneath (no backing, no
// old host cluster) just the guest data, rounded out to whole pages; else the
// copied edges without their all-zero pages. Reused clusters may hold old data and
// are written whole.
Task<Result<void>> Qcow2Impl::fill_allocation(qcow2::Refcounts::Allocation a, uint64_t rs,
                                              uint64_t region_start, uint64_t region_end,
                                              uint64_t pos, std::span<const std::byte> data,
                                              const std::vector<qcow2::L2Entry>& olds) {
  const uint64_t host = a.host + rs;
  const bool fresh = host >= a.fresh_from;
  const uint64_t head = pos - region_start, tail_at = head + data.size();
  const uint64_t size = region_end - region_start;
  // Page granularity of the partial writes (the file may be O_DIRECT; a page
  // also never needs a read-modify-write in the page cache).
  const uint64_t page = std::max<uint64_t>(4096, file->caps().min_block);
  const bool nothing_below =
      !has_backing() && std::all_of(olds.begin(), olds.end(), [](const L2Entry& e) {
        return !e.host() && !e.compressed();
      });
  // Page-aligned (in the file) bounds of the guest data, within the region.
  auto down = [&](uint64_t x) { return std::max(host, align_down(host + x, page)) - host; };
  auto up = [&](uint64_t x) { return std::min(host + size, align_up(host + x, page)) - host; };
  // The guest data covers the whole region: nothing underneath shows through,
  // whatever is below (a sync=top mirror into a new overlay writes only this).
  if (head == 0 && tail_at == size) co_return co_await file->write(host, data, {});
  if (fresh && nothing_below) {
    // Everything but the guest data reads as zero already.
    const uint64_t ws = down(head), we = up(tail_at);
    if (ws == head && we == tail_at) co_return co_await file->write(host + ws, data, {});
    std::vector<std::byte> out(we - ws);
    std::memcpy(out.data() + (head - ws), data.data(), data.size());
    co_return co_await file->write(host + ws, out, {});
  }
  std::vector<std::byte> buf(size);
  if (auto r = co_await read_unlocked(region_start, std::span(buf).first(head)); !r) co_return r;
  if (auto r = co_await read_unlocked(region_start + tail_at, std::span(buf).subspan(tail_at)); !r)
    co_return r;
  std::memcpy(buf.data() + head, data.data(), data.size());
  uint64_t ws = 0, we = size;
  if (fresh) {
    // Leave out the all-zero pages at either end (a backing file with holes there).
    const auto nz = [](std::byte b) { return b != std::byte{0}; };
    const uint64_t hs = down(head), te = up(tail_at);
    auto first = std::find_if(buf.begin(), buf.begin() + hs, nz);
    ws = down(first - buf.begin());
    auto last = std::find_if(buf.rbegin(), buf.rend() - te, nz);  // from the end, down to te
    we = up(size - (last - buf.rbegin()));
  }
  co_return co_await file->write(host + ws, std::span(buf).subspan(ws, we - ws), {});
}

Task<Result<void>> Qcow2Impl::write_locked(uint64_t off, std::span<const std::byte> buf) {
  const uint64_t end = off + buf.size();
  const uint64_t u = unit();
  auto owned = [&](const L2Entry& e) {
    return !e.compressed() && e.host() && e.copied() && e.host() + cs() <= file->length() &&
           (ext() || !(e.word & kFlagZero));
  };
  // Within a newly allocated cluster: which bytes the write (plus its COW) covers.
  // Without subclusters, or replacing an existing host cluster, the whole cluster.
  auto whole = [&](const L2Entry& e) { return !ext() || e.host() || e.compressed(); };

  uint64_t pos = off;
  while (pos < end) {
    const uint64_t gc = pos >> cb(), cstart = gc << cb();
    auto e0 = co_await entry(gc);
    if (!e0) co_return make_error(e0.error());

    if (owned(*e0)) {
      // In place; with subclusters, unallocated edge units are filled first.
      uint64_t cend = std::min(end, cstart + cs());
      uint64_t in = pos - cstart, n = cend - pos;
      uint64_t hs = in, te = in + n;
      L2Entry ne = *e0;
      if (ext()) {
        uint64_t a = align_down(in, u), b = align_up(in + n, u);
        if (a < in && !(e0->bitmap & (1ull << (a / u)))) hs = a;
        if (b > in + n && !(e0->bitmap & (1ull << ((b - 1) / u)))) te = b;
        uint64_t mask = unit_mask(a / u, b / u);
        ne.bitmap = (ne.bitmap | mask) & ~(mask << 32);
      }
      std::vector<std::byte> tmp;
      std::span<const std::byte> out = buf.subspan(pos - off, n);
      if (hs < in || te > in + n) {
        tmp.resize(te - hs);
        if (auto r = co_await read_unlocked(cstart + hs, std::span(tmp).first(in - hs)); !r)
          co_return r;
        if (auto r = co_await read_unlocked(cstart + in + n, std::span(tmp).last(te - in - n)); !r)
          co_return r;
        std::memcpy(tmp.data() + (in - hs), out.data(), n);
        out = tmp;
      }
      if (auto r = co_await file->write(e0->host() + hs, out, {}); !r) co_return r;
      if (ne.bitmap != e0->bitmap)
        if (auto r = co_await set_entry(gc, ne); !r) co_return r;
      pos = cend;
      continue;
    }

    // An allocation run: this cluster and the following ones that also need one.
    std::vector<L2Entry> olds{*e0};
    const uint64_t max_run = std::max<uint64_t>(1, kMaxRunBytes >> cb());
    while (cstart + olds.size() * cs() < end && olds.size() < max_run) {
      auto e = co_await entry(gc + olds.size());
      if (!e) co_return make_error(e.error());
      if (owned(*e)) break;
      olds.push_back(*e);
    }
    const uint64_t n = olds.size();
    const uint64_t run_end = std::min(end, cstart + n * cs());
    const uint64_t last_start = (gc + n - 1) << cb();
    const uint64_t rs = whole(olds.front()) ? 0 : align_down(pos - cstart, u);
    const uint64_t re = whole(olds.back()) ? cs() : align_up(run_end - last_start, u);
    const uint64_t region_start = cstart + rs, region_end = last_start + re;

    auto alloc = co_await rc->allocate_fresh(n);
    if (!alloc) co_return make_error(alloc.error());
    const uint64_t host = alloc->host;
    auto r = co_await fill_allocation(*alloc, rs, region_start, region_end, pos,
                                      buf.subspan(pos - off, run_end - pos), olds);
    if (!r) {
      rc->free_later(host, n * cs());  // never mapped: give them back after the next flush
      co_return r;
    }
    for (uint64_t i = 0; i < n; ++i) {
      const L2Entry& old = olds[i];
      L2Entry ne{(host + i * cs()) | kFlagCopied, 0};
      if (ext()) {
        if (whole(old)) {
          ne.bitmap = 0xffffffffull;
        } else {
          uint64_t a = i == 0 ? rs : 0, b = i == n - 1 ? re : cs();
          uint64_t mask = unit_mask(a / u, b / u);
          ne.bitmap = (old.bitmap | mask) & ~(mask << 32);
        }
      }
      free_entry(old);
      if (auto s = co_await set_entry(gc + i, ne); !s) co_return s;
    }
    pos = run_end;
  }
  co_return Result<void>{};
}

namespace {

Task<Result<void>> write_zero_buffers(Qcow2Impl& q, uint64_t off, uint64_t len) {
  std::vector<std::byte> zeroes(std::min<uint64_t>(len, 1u << 20));
  for (uint64_t pos = off; pos < off + len;) {
    uint64_t n = std::min<uint64_t>(zeroes.size(), off + len - pos);
    if (auto r = co_await q.write(pos, std::span(zeroes).first(n)); !r) co_return r;
    pos += n;
  }
  co_return Result<void>{};
}

}  // namespace

// Zeroes part of an allocation unit. Bytes that already read as zeroes from this
// layer with nothing underneath need nothing: unallocated without a backing
// file, zero clusters, or a data cluster's bytes that are still a hole in the
// file (a fresh cluster written only in part). A mirror into a new image zeroes
// the rest of each chunk around its data; writing those zeroes would fill whole
// clusters for nothing. The shared lock keeps the mapping still meanwhile.
Task<Result<void>> Qcow2Impl::zero_partial(uint64_t off, uint64_t len) {
  if (!has_backing()) {
    auto guard = co_await locks.lock(off >> cb(), (off + len - 1) >> cb(), false);
    bool zero = true;
    uint64_t pos = off;
    while (zero && pos < off + len) {
      auto run = co_await resolve(pos, off + len - pos);
      if (!run) co_return make_error(run.error());
      uint64_t n = run->length;
      if (run->kind == Kind::kNormal) {
        if (!file->caps().has_block_status) {
          zero = false;  // cannot tell: write them
          break;
        }
        auto st = co_await file->block_status(run->host, n);
        if (!st) co_return make_error(st.error());
        zero = st->zero;
        n = std::min(n, st->length);
      } else {
        zero = run->kind == Kind::kZero || run->kind == Kind::kUnallocated;
      }
      pos += n;
    }
    if (zero) co_return Result<void>{};
  }
  co_return co_await write_zero_buffers(*this, off, len);
}

Task<Result<void>> Qcow2Impl::write_zeroes(uint64_t off, uint64_t len, ZeroFlags f) {
  const uint64_t end = off + len;
  const bool flag = hdr.version >= 3 || ext();
  // Without a zero flag (v2), a whole cluster can only be unmapped, and only
  // when nothing shows through from a backing file.
  const bool v2_unmap = !flag && f.may_unmap && !has_backing();
  const uint64_t u = unit();
  uint64_t a = align_up(off, u), b = std::max(a, align_down(end, u));
  if (end == info.virtual_size) b = std::max(a, align_up(end, u));  // the image's last unit
  if (a >= end) a = b = end;
  if (!flag && !v2_unmap) a = b = end;
  // Partial units at the edges (and everything, when nothing better exists):
  // written as data.
  if ((off < a || b < end) && f.no_fallback)
    co_return make_error(ENOTSUP,
                         fmt::format("qcow2 {}: zeroing {}+{} needs data writes", name, off, len));
  if (off < a)
    if (auto r = co_await zero_partial(off, std::min(a, end) - off); !r) co_return r;
  if (b < end && b >= a)
    if (auto r = co_await zero_partial(std::max(b, off), end - std::max(b, off)); !r) co_return r;
  if (a >= b) co_return Result<void>{};

  const uint64_t first = a >> cb(), last = (b - 1) >> cb();
  auto guard = co_await locks.lock(first, last, true);
  for (uint64_t gc = first; gc <= last; ++gc) {
    const uint64_t cstart = gc << cb();
    const uint64_t ua = std::max(a, cstart) - cstart;
    const uint64_t ub = std::min(b, cstart + cs()) - cstart;
    auto e = co_await entry(gc);
    if (!e) co_return make_error(e.error());
    L2Entry ne = *e;
    if (v2_unmap) {
      if (e->word == 0) continue;
      free_entry(*e);
      ne = L2Entry{};
    } else if (!ext()) {
      if (e->compressed() || (f.may_unmap && e->host())) {
        free_entry(*e);
        ne = L2Entry{kFlagZero, 0};
      } else {
        ne.word |= kFlagZero;
      }
    } else {
      const bool whole = ua == 0 && ub == cs();
      if (e->compressed()) {
        if (!whole) {
          // Compressed clusters have no subclusters: materialize, then zero.
          std::vector<std::byte> z(ub - ua);
          if (auto r = co_await write_locked(cstart + ua, z); !r) co_return r;
          continue;
        }
        free_entry(*e);
        ne = L2Entry{0, 0xffffffffull << 32};
      } else if (whole && f.may_unmap) {
        free_entry(*e);
        ne = L2Entry{0, 0xffffffffull << 32};
      } else {
        uint64_t mask = unit_mask(ua / u, div_round_up(ub, u));
        ne.bitmap = (ne.bitmap & ~mask) | (mask << 32);
      }
    }
    if (ne.word != e->word || ne.bitmap != e->bitmap)
      if (auto r = co_await set_entry(gc, ne); !r) co_return r;
  }
  co_return Result<void>{};
}

Task<Result<void>> Qcow2Impl::discard(uint64_t off, uint64_t len) {
  // Whole clusters only (discard is advisory); the image's last, partial cluster
  // counts as whole when the request reaches the end.
  const uint64_t end = off + len;
  uint64_t a = align_up(off, cs());
  uint64_t b = end == info.virtual_size ? align_up(end, cs()) : align_down(end, cs());
  if (a >= b) co_return Result<void>{};
  // With a backing file the cluster must keep reading as zeroes rather than
  // showing the backing data again (as QEMU does); v2 has no way to say so.
  const bool keep_zero = has_backing() && (hdr.version >= 3 || ext());
  const L2Entry ne = !keep_zero ? L2Entry{}
                     : ext()    ? L2Entry{0, 0xffffffffull << 32}
                                : L2Entry{kFlagZero, 0};
  const uint64_t first = a >> cb(), last = (b - 1) >> cb();
  auto guard = co_await locks.lock(first, last, true);
  for (uint64_t gc = first; gc <= last; ++gc) {
    auto e = co_await entry(gc);
    if (!e) co_return make_error(e.error());
    if (e->word == ne.word && e->bitmap == ne.bitmap) continue;
    free_entry(*e);
    if (auto r = co_await set_entry(gc, ne); !r) co_return r;
  }
  co_return Result<void>{};
}

}  // namespace blkmirror
