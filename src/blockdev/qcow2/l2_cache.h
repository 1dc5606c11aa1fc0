// L2Cache: the qcow2 L2 tables in memory, keyed by their host offset, with LRU
// eviction of clean tables. Concurrent lookups of one table share one read.
// Changes are made in memory (mark_dirty) and written back by the device's flush
// (qcow2_device.h), from copies taken at one instant (take_dirty).
//
// Threading rule: loop thread only. A table returned by get() may be modified only
// synchronously (no co_await between get() and the change), so the change lands in
// the cached copy and not in one evicted meanwhile.
// On-disk ORDERING RULE: an L2 table is written only after the refcounts of every
// cluster it maps, and the data of those clusters, are on disk (the flush orders
// it: refcount blocks -> flush -> L2 tables -> flush -> L1). A dirty table is
// never evicted: only flush cleans it.
#pragma once

#include <cstdint>
#include <list>
#include <memory>
#include <unordered_map>
#include <vector>

#include "base/notifier.h"
#include "base/result.h"
#include "base/task.h"
#include "blockdev/block_device.h"

namespace blkmirror::qcow2 {

struct L2Table {
  uint64_t host = 0;
  std::vector<std::byte> data;
  bool dirty = false;
  bool loading = false;
  std::list<uint64_t>::iterator lru;
};
using L2Ptr = std::shared_ptr<L2Table>;

struct DirtyTable {
  uint64_t host;
  std::vector<std::byte> data;
};

class L2Cache {
 public:
  L2Cache(BlockDevice& file, uint64_t table_bytes, size_t capacity)
      : file_(file), table_bytes_(table_bytes), capacity_(std::max<size_t>(capacity, 4)) {}

  // The table at host offset `host`, read from the file if not cached.
  Task<Result<L2Ptr>> get(uint64_t host);
  // A new all-zero table at `host` (not read from the file), dirty.
  L2Ptr create(uint64_t host);
  void mark_dirty(const L2Ptr& t);

  // Copies of the dirty tables; they count as clean from now on.
  std::vector<DirtyTable> take_dirty();
  // After a failed write-back: the tables must be written again.
  void redirty(const std::vector<DirtyTable>& tables);
  size_t dirty_count() const { return dirty_; }
  bool over_capacity() const { return dirty_ > capacity_; }
  uint64_t hits() const { return hits_; }
  uint64_t misses() const { return misses_; }

 private:
  void touch(const L2Ptr& t);
  void evict();

  BlockDevice& file_;
  uint64_t table_bytes_;
  size_t capacity_;
  std::unordered_map<uint64_t, L2Ptr> tables_;
  std::list<uint64_t> lru_;  // front: most recent
  size_t dirty_ = 0;
  Notifier loaded_;
  uint64_t hits_ = 0, misses_ = 0;
};

}  // namespace blkmirror::qcow2
