// flush(): the write-back of all metadata in the order that keeps a crash at any
// point consistent (at worst leaking clusters):
//   1. refcount blocks (increments of every cluster allocated so far);
//      if new blocks were added: flush, then the refcount table entries pointing
//      at them; flush (this also makes the data written so far durable);
//   2. L2 tables; if L1 entries changed: flush, then the L1 entries; flush;
//   3. refcount decrements of the clusters those L2 tables stopped mapping
//      (holes punched first), which become free for reuse only now.
// The dirty state is copied at one instant at the start, so requests that change
// metadata meanwhile wait for the next flush; the refcount lock is held through
// step 1, so no refcount block is half-way to disk when the L2 tables go out.
#include <fmt/format.h>

#include "blockdev/qcow2/qcow2_impl.h"

namespace blkmirror {

using namespace qcow2;

Task<Result<void>> Qcow2Impl::flush() {
  auto serial = co_await flush_mutex.lock();
  auto rc_lock = co_await rc->mutex().lock();
  RefcountSnapshot refs = rc->take_dirty();
  std::vector<DirtyTable> tables = l2->take_dirty();
  std::vector<std::pair<uint64_t, uint64_t>> l1_entries;
  for (uint64_t i : l1_dirty) l1_entries.emplace_back(i, l1[i]);
  l1_dirty.clear();
  auto frees = rc->take_pending_frees();

  auto undo = [&](size_t from_step) {
    if (from_step <= 1) rc->redirty(refs);
    if (from_step <= 2) {
      l2->redirty(tables);
      for (auto [i, v] : l1_entries) l1_dirty.insert(i);
    }
    for (auto& f : frees) rc->free_later(f.first, f.second);
  };

  // Step 1.
  auto r = co_await rc->write_blocks(refs);
  if (r && !refs.table_entries.empty()) {
    r = co_await file->flush();
    if (r) r = co_await rc->write_table_entries(refs);
  }
  if (r) r = co_await file->flush();
  rc_lock.release();
  if (!r) {
    undo(1);
    co_return r;
  }
  // Step 2.
  if (!tables.empty() || !l1_entries.empty()) {
    for (const auto& t : tables) {
      r = co_await file->write(t.host, t.data, {});
      if (!r) break;
    }
    if (r && !l1_entries.empty()) {
      r = co_await file->flush();
      for (size_t k = 0; r && k < l1_entries.size(); ++k) {
        std::byte word[8];
        store_be64(word, l1_entries[k].second);
        r = co_await file->write(hdr.l1_table_offset + l1_entries[k].first * 8, word, {});
      }
    }
    if (r) r = co_await file->flush();
    if (!r) {
      undo(2);
      co_return r;
    }
  }
  // Step 3.
  if (!frees.empty()) {
    if (auto f = co_await rc->apply_frees(std::move(frees)); !f) co_return f;
  }
  co_return Result<void>{};
}

Task<Result<void>> Qcow2Impl::maybe_write_back() {
  // Dirty L2 tables are never evicted; past the cache's size, write them back.
  if (!l2->over_capacity() || flush_mutex.locked()) co_return Result<void>{};
  co_return co_await flush();
}

}  // namespace blkmirror
