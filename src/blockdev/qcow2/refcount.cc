#include "blockdev/qcow2/refcount.h"

#include <algorithm>

#include <fmt/format.h>

#include "base/align.h"
#include "blockdev/qcow2/tables.h"

namespace blkmirror::qcow2 {

Refcounts::Refcounts(BlockDevice& file, Params p, std::vector<uint64_t> table, uint64_t alloc_end)
    : file_(file),
      p_(std::move(p)),
      cluster_size_(uint64_t{1} << p_.cluster_bits),
      entries_per_block_(cluster_size_ * 8 / (1u << p_.refcount_order)),
      table_(std::move(table)),
      alloc_end_(align_up(alloc_end, cluster_size_)) {
  for (uint64_t i = 0; i < table_.size(); ++i)
    if (table_[i] & kOffsetMask) block_clusters_[(table_[i] & kOffsetMask) >> p_.cluster_bits] = i;
}

tl::unexpected<Error> Refcounts::corrupt(const std::string& what) const {
  return make_plain_error(kCorruptErrno, fmt::format("qcow2 image {}: {}", p_.name, what));
}

bool Refcounts::is_metadata(uint64_t cluster) const {
  uint64_t first = p_.table_offset >> p_.cluster_bits;
  if (cluster >= first && cluster < first + p_.table_clusters) return true;
  return block_clusters_.count(cluster) != 0;
}

void Refcounts::mark_dirty(Block& b) {
  if (!b.dirty) {
    b.dirty = true;
    ++dirty_blocks_;
  }
}

Task<Result<Refcounts::Block*>> Refcounts::load_block(uint64_t index) {
  if (auto it = blocks_.find(index); it != blocks_.end()) co_return it->second.get();
  uint64_t off = table_[index] & kOffsetMask;
  if ((table_[index] & ~kOffsetMask) != 0 || off + cluster_size_ > file_.length())
    co_return corrupt(fmt::format("refcount block {} at offset {:#x} is invalid or past the end "
                                  "of the file ({} bytes)",
                                  index, table_[index], file_.length()));
  auto b = std::make_unique<Block>();
  b->data.resize(cluster_size_);
  if (auto r = co_await file_.read(off, b->data); !r) co_return make_error(r.error());
  // Another caller may have loaded it while we waited (callers hold the mutex, but
  // be safe): keep the first copy.
  auto [it, inserted] = blocks_.emplace(index, std::move(b));
  co_return it->second.get();
}

Task<Result<uint64_t>> Refcounts::get(uint64_t cluster) {
  uint64_t index = cluster / entries_per_block_;
  if (index >= table_.size() || (table_[index] & kOffsetMask) == 0) co_return uint64_t{0};
  auto b = co_await load_block(index);
  if (!b) co_return make_error(b.error());
  co_return load_refcount((*b)->data, p_.refcount_order, cluster % entries_per_block_);
}

Task<Result<void>> Refcounts::set(uint64_t cluster, uint64_t value) {
  uint64_t index = cluster / entries_per_block_;
  if (index >= table_.size() || (table_[index] & kOffsetMask) == 0) {
    if (value == 0) co_return Result<void>{};
    co_return make_error(EINVAL, fmt::format("qcow2 {}: no refcount block for cluster {}", p_.name,
                                             cluster));
  }
  if (value > max_refcount(p_.refcount_order))
    co_return make_plain_error(EINVAL, fmt::format("qcow2 image {}: refcount of cluster {} would "
                                                   "overflow {} bits",
                                                   p_.name, cluster, 1u << p_.refcount_order));
  auto b = co_await load_block(index);
  if (!b) co_return make_error(b.error());
  uint64_t old = load_refcount((*b)->data, p_.refcount_order, cluster % entries_per_block_);
  if (old == 0 && value != 0) ++used_;
  if (old != 0 && value == 0) --used_;
  store_refcount((*b)->data, p_.refcount_order, cluster % entries_per_block_, value);
  mark_dirty(**b);
  co_return Result<void>{};
}

Task<Result<void>> Refcounts::ensure_file(uint64_t end) {
  if (file_.length() >= end) co_return Result<void>{};
  // Grow in steps, so appending writes do not each pay for a resize (which runs
  // on a worker thread while the allocator's lock is held): an eighth of the
  // file, 1 to 32 MiB. The holes cost nothing; close() trims the file back.
  uint64_t step = std::clamp<uint64_t>(end / 8, 1u << 20, 32u << 20);
  step = std::max<uint64_t>(cluster_size_, uint64_t{1} << (63 - __builtin_clzll(step)));
  co_return co_await file_.resize(align_up(end, step));
}

Task<Result<uint64_t>> Refcounts::find_free(uint64_t n) {
  uint64_t c = free_hint_, run_start = c, run = 0;
  std::optional<uint64_t> first_free;
  const uint64_t end_cluster = alloc_end_ >> p_.cluster_bits;
  while (true) {
    if (c >= end_cluster) {
      // Everything from here on is free.
      uint64_t start = run > 0 ? run_start : c;
      free_hint_ = first_free.value_or(start);
      co_return start;
    }
    auto rc = co_await get(c);
    if (!rc) co_return make_error(rc.error());
    if (*rc == 0) {
      if (run == 0) run_start = c;
      if (!first_free) first_free = c;
      if (++run == n) {
        free_hint_ = *first_free;
        co_return run_start;
      }
    } else {
      run = 0;
    }
    ++c;
  }
}

Task<Result<void>> Refcounts::ensure_block(uint64_t index) {
  if (index >= table_.size()) {
    if (auto r = co_await grow_table(index + 1); !r) co_return r;
  }
  while ((table_[index] & kOffsetMask) == 0) {
    auto where = co_await find_free(1);
    if (!where) co_return make_error(where.error());
    uint64_t cluster = *where, own = cluster / entries_per_block_;
    if (own != index && (own >= table_.size() || (table_[own] & kOffsetMask) == 0)) {
      // The block's own cluster needs a block first; then look again.
      if (auto r = co_await ensure_block(own); !r) co_return r;
      continue;
    }
    auto b = std::make_unique<Block>();
    b->data.assign(cluster_size_, std::byte{0});
    mark_dirty(*b);
    blocks_[index] = std::move(b);
    table_[index] = cluster << p_.cluster_bits;
    table_dirty_[index] = table_[index];
    block_clusters_[cluster] = index;
    alloc_end_ = std::max(alloc_end_, (cluster + 1) << p_.cluster_bits);
    if (auto r = co_await set(cluster, 1); !r) co_return r;
  }
  co_return Result<void>{};
}

Task<Result<void>> Refcounts::grow_table(uint64_t min_entries) {
  const uint64_t cs = cluster_size_;
  uint64_t entries = std::max<uint64_t>({min_entries, table_.size() * 2, cs / 8});
  const uint64_t first = alloc_end_ >> p_.cluster_bits;  // the new table starts here
  uint64_t tc = 0;
  std::vector<uint64_t> new_blocks;  // table indices that get a block, placed after the table
  auto missing = [this](uint64_t i) {
    return i >= table_.size() || (table_[i] & kOffsetMask) == 0;
  };
  // Fixpoint: the new table and the new blocks after it must themselves be covered
  // by blocks, and the table must have entries for all of them.
  while (true) {
    tc = div_round_up(entries * 8, cs);
    size_t nb = 0;
    while (true) {
      new_blocks.clear();
      uint64_t end = first + tc + nb;  // one past the last cluster to cover
      for (uint64_t i = first / entries_per_block_; i <= (end - 1) / entries_per_block_; ++i)
        if (missing(i)) new_blocks.push_back(i);
      if (new_blocks.size() == nb) break;
      nb = new_blocks.size();
    }
    uint64_t last_index = (first + tc + nb - 1) / entries_per_block_;
    if (last_index < entries) break;
    entries = last_index + 1;
  }
  uint64_t max_entries = kMaxRefcountTableBytes / 8;
  if (entries > max_entries)
    co_return make_plain_error(EFBIG, fmt::format("qcow2 image {}: refcount table would exceed {} "
                                                  "bytes",
                                                  p_.name, kMaxRefcountTableBytes));
  const uint64_t old_off = p_.table_offset, old_clusters = p_.table_clusters;
  table_.resize(entries, 0);
  uint64_t next = first + tc;
  for (uint64_t i : new_blocks) {
    auto b = std::make_unique<Block>();
    b->data.assign(cs, std::byte{0});
    mark_dirty(*b);
    blocks_[i] = std::move(b);
    table_[i] = next << p_.cluster_bits;
    block_clusters_[next] = i;
    ++next;
  }
  alloc_end_ = next << p_.cluster_bits;
  if (auto r = co_await ensure_file(alloc_end_); !r) co_return r;
  for (uint64_t c = first; c < next; ++c)
    if (auto r = co_await set(c, 1); !r) co_return r;
  // Everything the new table points at goes to disk before the table, the table
  // before the header, the header before the old table is freed.
  auto snap = take_dirty();
  if (auto r = co_await write_blocks(snap); !r) {
    redirty(snap);
    co_return r;
  }
  std::vector<std::byte> bytes(tc * cs, std::byte{0});
  for (uint64_t i = 0; i < table_.size(); ++i) store_be64(&bytes[i * 8], table_[i]);
  if (auto r = co_await file_.write(first << p_.cluster_bits, bytes, {}); !r) co_return r;
  if (auto r = co_await file_.flush(); !r) co_return r;
  p_.table_offset = first << p_.cluster_bits;
  p_.table_clusters = static_cast<uint32_t>(tc);
  if (on_table_moved) {
    if (auto r = co_await on_table_moved(p_.table_offset, p_.table_clusters); !r) co_return r;
  }
  for (uint64_t c = old_off >> p_.cluster_bits; c < (old_off >> p_.cluster_bits) + old_clusters;
       ++c) {
    auto rc = co_await get(c);
    if (!rc) co_return make_error(rc.error());
    if (*rc > 0)
      if (auto r = co_await set(c, *rc - 1); !r) co_return r;
    free_hint_ = std::min(free_hint_, c);
  }
  co_return Result<void>{};
}

Task<Result<void>> Refcounts::count_used() {
  auto guard = co_await mutex_.lock();
  used_ = 0;
  for (uint64_t i = 0; i < table_.size(); ++i) {
    if ((table_[i] & kOffsetMask) == 0) continue;
    auto b = co_await load_block(i);
    if (!b) co_return make_error(b.error());
    for (uint64_t k = 0; k < entries_per_block_; ++k)
      if (load_refcount((*b)->data, p_.refcount_order, k)) ++used_;
  }
  // Keep memory bounded on huge images: blocks are read again when needed.
  if (blocks_.size() > 64 && dirty_blocks_ == 0) blocks_.clear();
  co_return Result<void>{};
}

Task<Result<uint64_t>> Refcounts::allocate(uint64_t n) {
  auto a = co_await allocate_fresh(n);
  if (!a) co_return make_error(a.error());
  co_return a->host;
}

Task<Result<Refcounts::Allocation>> Refcounts::allocate_fresh(uint64_t n) {
  auto guard = co_await mutex_.lock();
  uint64_t start = 0;
  while (true) {
    auto where = co_await find_free(n);
    if (!where) co_return make_error(where.error());
    start = *where;
    bool created = false;
    for (uint64_t i = start / entries_per_block_; i <= (start + n - 1) / entries_per_block_; ++i) {
      if (i < table_.size() && (table_[i] & kOffsetMask) != 0) continue;
      if (auto r = co_await ensure_block(i); !r) co_return make_error(r.error());
      created = true;
    }
    if (!created) break;  // else the new blocks may sit in our range: look again
  }
  // A free cluster that holds metadata: the refcounts lie (a damaged or
  // hostile image). Handing it out would overwrite that metadata, as QEMU's
  // overlap checks refuse to (fuzz: a bitmap's data cluster allocated over the
  // header, and over the bitmap directory).
  for (uint64_t c = start; c < start + n; ++c)
    if (c == 0 || is_metadata(c) || (holds_metadata && holds_metadata(c)))
      co_return corrupt(fmt::format("cluster at offset {:#x} holds {} but its refcount is 0",
                                    c << p_.cluster_bits,
                                    c == 0 ? "the header" : "metadata"));
  // Before alloc_end_ moves: what lies past it was never handed out (see alloc_end_).
  const uint64_t fresh_from = std::max(alloc_end_, start << p_.cluster_bits);
  for (uint64_t c = start; c < start + n; ++c)
    if (auto r = co_await set(c, 1); !r) co_return make_error(r.error());
  alloc_end_ = std::max(alloc_end_, (start + n) << p_.cluster_bits);
  if (free_hint_ == start) free_hint_ = start + n;
  if (auto r = co_await ensure_file(alloc_end_); !r) co_return make_error(r.error());
  co_return Allocation{start << p_.cluster_bits, fresh_from};
}

Task<Result<void>> Refcounts::increment(uint64_t cluster) {
  auto guard = co_await mutex_.lock();
  if (auto r = co_await ensure_block(cluster / entries_per_block_); !r) co_return r;
  auto rc = co_await get(cluster);
  if (!rc) co_return make_error(rc.error());
  alloc_end_ = std::max(alloc_end_, (cluster + 1) << p_.cluster_bits);
  co_return co_await set(cluster, *rc + 1);
}

void Refcounts::free_later(uint64_t host, uint64_t bytes) {
  if (bytes) pending_.emplace_back(host, bytes);
}

Task<Result<void>> Refcounts::apply_frees(std::vector<std::pair<uint64_t, uint64_t>> ranges) {
  auto guard = co_await mutex_.lock();
  for (auto [host, bytes] : ranges) {
    // Whole clusters get their space back from the file system first: the
    // punch must finish before the cluster can be handed out again.
    if (is_aligned(host, cluster_size_) && is_aligned(bytes, cluster_size_) &&
        host + bytes <= file_.length())
      (void)co_await file_.discard(host, bytes);
    uint64_t first = host >> p_.cluster_bits, last = (host + bytes - 1) >> p_.cluster_bits;
    for (uint64_t c = first; c <= last; ++c) {
      auto rc = co_await get(c);
      if (!rc) co_return make_error(rc.error());
      if (*rc == 0)
        co_return corrupt(fmt::format("freeing cluster at offset {:#x} whose refcount is already 0",
                                      c << p_.cluster_bits));
      if (auto r = co_await set(c, *rc - 1); !r) co_return r;
      if (*rc == 1) free_hint_ = std::min(free_hint_, c);
    }
  }
  co_return Result<void>{};
}

RefcountSnapshot Refcounts::take_dirty() {
  RefcountSnapshot s;
  if (dirty_blocks_) {
    for (auto& [index, b] : blocks_) {
      if (!b->dirty) continue;
      s.blocks.push_back({table_[index] & kOffsetMask, b->data});
      b->dirty = false;
    }
    dirty_blocks_ = 0;
  }
  s.table_entries.assign(table_dirty_.begin(), table_dirty_.end());
  table_dirty_.clear();
  return s;
}

void Refcounts::redirty(const RefcountSnapshot& s) {
  for (const auto& c : s.blocks) {
    auto it = block_clusters_.find(c.host >> p_.cluster_bits);
    if (it == block_clusters_.end()) continue;
    auto b = blocks_.find(it->second);
    if (b != blocks_.end()) mark_dirty(*b->second);
  }
  for (auto [i, v] : s.table_entries) table_dirty_.emplace(i, v);
}

Task<Result<void>> Refcounts::write_blocks(const RefcountSnapshot& s) {
  for (const auto& b : s.blocks)
    if (auto r = co_await file_.write(b.host, b.data, {}); !r) co_return r;
  co_return Result<void>{};
}

Task<Result<void>> Refcounts::write_table_entries(const RefcountSnapshot& s) {
  // Runs of neighbouring entries go out as one write.
  size_t i = 0;
  while (i < s.table_entries.size()) {
    size_t j = i + 1;
    while (j < s.table_entries.size() &&
           s.table_entries[j].first == s.table_entries[j - 1].first + 1)
      ++j;
    std::vector<std::byte> bytes((j - i) * 8);
    for (size_t k = i; k < j; ++k)
      store_be64(&bytes[(k - i) * 8], table_[s.table_entries[k].first]);
    uint64_t off = p_.table_offset + s.table_entries[i].first * 8;
    if (auto r = co_await file_.write(off, bytes, {}); !r) co_return r;
    i = j;
  }
  co_return Result<void>{};
}

}  // namespace blkmirror::qcow2
