// Refcounts: the qcow2 refcount table and refcount blocks in memory, and the
// cluster allocator built on them (first fit from a hint; past the last used
// cluster the file is grown). Grows the refcount table (relocating it) when the
// image outgrows it, and adds refcount blocks as needed.
//
// Threading rule: loop thread only. allocate() and apply_frees() serialize on one
// AsyncMutex, so two requests never get the same cluster.
// On-disk ORDERING RULE:
//  - Increments (allocation) may reach the disk at any time: a refcount that is
//    too high only leaks. The flush writes refcount blocks first, then flushes,
//    then the refcount table entries that point at new blocks, then flushes,
//    and only then the L2 tables that map the new clusters.
//  - Decrements (free_later) are applied in memory only after the L2 tables that
//    stopped mapping the cluster are on disk and flushed (apply_frees, called by
//    the flush), so a crash never leaves an L2 entry pointing at a free cluster,
//    and a freed cluster is not reused before that.
//  - A relocated refcount table is written and flushed before the header points
//    at it; the old table is freed after the header is flushed.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "base/result.h"
#include "base/task.h"
#include "blockdev/block_device.h"
#include "blockdev/qcow2/range_lock.h"

namespace blkmirror::qcow2 {

// Errors about inconsistent metadata carry this errno; the device then marks the
// image corrupt and answers EIO.
inline constexpr int kCorruptErrno = EUCLEAN;

struct RefcountBlockCopy {
  uint64_t host;
  std::vector<std::byte> data;
};

struct RefcountSnapshot {
  std::vector<RefcountBlockCopy> blocks;
  std::vector<std::pair<uint64_t, uint64_t>> table_entries;  // (index, value) changed
};

class Refcounts {
 public:
  struct Params {
    std::string name;
    uint32_t cluster_bits;
    uint32_t refcount_order;
    uint64_t table_offset;
    uint32_t table_clusters;
  };
  // table: the refcount table as read (host byte order). alloc_end: bytes of the
  // file in use (the allocator appends there).
  Refcounts(BlockDevice& file, Params p, std::vector<uint64_t> table, uint64_t alloc_end);

  // Called (under the allocator's lock) when the refcount table moved; writes and
  // flushes the header that points at it.
  std::function<Task<Result<void>>(uint64_t offset, uint32_t clusters)> on_table_moved;
  // The image's test for metadata (Qcow2Impl::is_metadata), which also knows
  // what the allocator does not keep itself: L1 and L2 tables, the bitmap
  // directory. A cluster it names is never handed out, whatever its refcount
  // says (allocate_fresh).
  std::function<bool(uint64_t cluster)> holds_metadata;

  Task<Result<uint64_t>> get(uint64_t cluster);
  // n contiguous free clusters, their refcounts set to 1; returns the host offset.
  // The file is grown to hold them.
  Task<Result<uint64_t>> allocate(uint64_t n);
  // allocate(), also saying from which host offset on the clusters are fresh:
  // never handed out since open and past the file's end at open, so they read as
  // zeroes (file holes) until written. Clusters before fresh_from may hold old
  // data (a reused free cluster, a leak from a crash) and must be written whole.
  struct Allocation {
    uint64_t host = 0;
    uint64_t fresh_from = 0;  // >= host + n clusters: nothing is fresh
  };
  Task<Result<Allocation>> allocate_fresh(uint64_t n);
  // Clusters covering [host, host+bytes) lose one reference once the L2 tables that
  // dropped them are on disk (see ORDERING RULE). discard: punch a hole there too.
  void free_later(uint64_t host, uint64_t bytes);
  bool has_pending_frees() const { return !pending_.empty(); }
  std::vector<std::pair<uint64_t, uint64_t>> take_pending_frees() { return std::move(pending_); }
  // REQUIRES: the L2 tables that dropped these ranges are on disk and flushed.
  Task<Result<void>> apply_frees(std::vector<std::pair<uint64_t, uint64_t>> ranges);
  // Raises a refcount by one (preallocation, metadata created outside allocate()).
  Task<Result<void>> increment(uint64_t cluster);

  // Flush steps (see ORDERING RULE).
  RefcountSnapshot take_dirty();
  void redirty(const RefcountSnapshot& s);
  Task<Result<void>> write_blocks(const RefcountSnapshot& s);
  Task<Result<void>> write_table_entries(const RefcountSnapshot& s);
  bool dirty() const { return dirty_blocks_ > 0 || !table_dirty_.empty(); }

  // Counts the clusters in use (reads every refcount block once; at open).
  Task<Result<void>> count_used();
  uint64_t used_clusters() const { return used_; }

  // True if host cluster `cluster` holds refcount metadata (table or block).
  bool is_metadata(uint64_t cluster) const;
  uint64_t alloc_end() const { return alloc_end_; }
  uint64_t table_offset() const { return p_.table_offset; }
  uint32_t table_clusters() const { return p_.table_clusters; }
  uint64_t entries_per_block() const { return entries_per_block_; }
  AsyncMutex& mutex() { return mutex_; }

 private:
  struct Block {
    std::vector<std::byte> data;
    bool dirty = false;
  };
  Task<Result<Block*>> load_block(uint64_t index);
  Task<Result<void>> set(uint64_t cluster, uint64_t value);
  Task<Result<void>> ensure_block(uint64_t index);
  Task<Result<void>> grow_table(uint64_t min_entries);
  Task<Result<uint64_t>> find_free(uint64_t n);
  Task<Result<void>> ensure_file(uint64_t end);
  void mark_dirty(Block& b);
  tl::unexpected<Error> corrupt(const std::string& what) const;

  BlockDevice& file_;
  Params p_;
  uint64_t cluster_size_;
  uint64_t entries_per_block_;
  std::vector<uint64_t> table_;
  std::map<uint64_t, uint64_t> table_dirty_;  // index -> value, written at flush
  std::unordered_map<uint64_t, std::unique_ptr<Block>> blocks_;  // by table index
  std::unordered_map<uint64_t, uint64_t> block_clusters_;        // block host cluster -> index
  size_t dirty_blocks_ = 0;
  // Bytes; clusters at or past it are free. Starts at the file's length and only
  // grows: clusters past it were never handed out since open and read as zeroes
  // (the file is grown with holes), which allocate_fresh() reports.
  uint64_t alloc_end_;
  uint64_t free_hint_ = 0;  // no free cluster below this one
  uint64_t used_ = 0;       // clusters with a refcount above 0
  std::vector<std::pair<uint64_t, uint64_t>> pending_;
  AsyncMutex mutex_;
};

}  // namespace blkmirror::qcow2
