// Qcow2Impl: the state of one open qcow2 image and the mechanisms that tie the
// header, the L1 table, the L2 cache and the refcounts together. Split by phase:
// qcow2_device.cc (open, header rewrites, grow, close, corrupt marking),
// map.cc (guest offset -> L2 entry, metadata checks), read.cc (read, block status),
// write.cc (allocation, copy-on-write, zeroes, discard), flush.cc (write-back order).
//
// Threading rule: loop thread only.
// On-disk ORDERING RULE: see flush.cc / qcow2_device.h: data and refcount blocks,
// flush, refcount table entries, flush, L2 tables, flush, L1 entries, flush, then
// the refcount decrements of clusters no longer mapped. Header rewrites come after
// what they point to is flushed.
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <unordered_set>
#include <vector>

#include "bitmap/named_bitmap.h"
#include "blockdev/qcow2/bitmaps.h"
#include "blockdev/qcow2/header.h"
#include "blockdev/qcow2/l2_cache.h"
#include "blockdev/qcow2/qcow2_device.h"
#include "blockdev/qcow2/range_lock.h"
#include "blockdev/qcow2/refcount.h"
#include "blockdev/qcow2/tables.h"

namespace blkmirror {

class Qcow2Impl {
 public:
  Qcow2Impl(Loop* loop, BlockDevicePtr file, BlockDevicePtr backing, qcow2::Header hdr,
            Qcow2OpenOptions opts);

  // Where a guest cluster's L2 entry lives.
  struct Slot {
    qcow2::L2Ptr table;
    uint64_t index = 0;
  };
  // A run of guest bytes that read the same way.
  struct Run {
    qcow2::Kind kind = qcow2::Kind::kUnallocated;
    uint64_t length = 0;
    uint64_t host = 0;   // kNormal: host offset of the run's first byte
    uint64_t cword = 0;  // kCompressed: the descriptor
  };

  // --- map.cc
  // The slot of guest cluster gc; nullopt when its L2 table does not exist and
  // create is false. With create, makes the L2 table (under l1_mutex_).
  // The caller may change slot->table synchronously after this returns.
  Task<Result<std::optional<Slot>>> find_slot(uint64_t gc, bool create);
  Task<Result<qcow2::L2Entry>> entry(uint64_t gc);
  Result<void> check_entry(uint64_t gc, const qcow2::L2Entry& e) const;
  Task<Result<Run>> resolve(uint64_t guest, uint64_t max_len);
  Task<Result<void>> set_entry(uint64_t gc, const qcow2::L2Entry& e);
  bool is_metadata(uint64_t host_cluster) const;
  tl::unexpected<Error> corrupt(const std::string& what) const;

  // --- read.cc
  Task<Result<void>> read_unlocked(uint64_t off, std::span<std::byte> buf);
  Task<Result<void>> read_backing(uint64_t off, std::span<std::byte> buf);
  Task<Result<void>> read_compressed(uint64_t cword, uint64_t in_cluster, std::span<std::byte> buf);
  Task<Result<Extent>> block_status(uint64_t off, uint64_t len);

  // --- write.cc
  Task<Result<void>> write(uint64_t off, std::span<const std::byte> buf);
  Task<Result<void>> write_locked(uint64_t off, std::span<const std::byte> buf);
  Task<Result<void>> fill_allocation(qcow2::Refcounts::Allocation a, uint64_t rs,
                                     uint64_t region_start, uint64_t region_end, uint64_t pos,
                                     std::span<const std::byte> data,
                                     const std::vector<qcow2::L2Entry>& olds);
  Task<Result<void>> write_zeroes(uint64_t off, uint64_t len, ZeroFlags f);
  Task<Result<void>> zero_partial(uint64_t off, uint64_t len);
  Task<Result<void>> discard(uint64_t off, uint64_t len);
  void free_entry(const qcow2::L2Entry& e);
  bool has_backing() const { return backing != nullptr || hdr.backing_file.has_value(); }

  // --- flush.cc
  Task<Result<void>> flush();
  Task<Result<void>> maybe_write_back();

  // --- bitmap_io.cc (the bitmaps extension; bitmaps.h is its format)
  // At open: reads and checks the extension and directory when the autoclear
  // bit says they are valid; drops an extension it says is stale (writable).
  Task<Result<void>> open_bitmaps();
  // A writable open or reopen: the autoclear bits we do not keep cleared, and
  // every bitmap marked in use.
  Task<Result<void>> claim_bitmaps();
  // A writable open or reopen: every consistent bitmap marked in use on disk.
  Task<Result<void>> mark_bitmaps_in_use();
  Task<Result<std::vector<NamedBitmap>>> load_bitmaps();
  // Why a new persistent bitmap cannot be stored (QEMU's reasons, without
  // its "Can't make bitmap ... persistent" prefix), or nothing.
  Result<void> can_store_bitmap(const BitmapSet& set, const std::string& name,
                                uint64_t granularity) const;
  Task<Result<void>> store_bitmaps(const BitmapSet& set);
  Task<Result<void>> remove_bitmap(const std::string& name);
  // A clean close by a user that never stored the bitmaps: when the image took
  // no write since open (or since the last store), the bitmaps on disk still
  // describe it and their in-use marks are cleared again; otherwise they stay
  // marked (inconsistent at the next open), as after a crash.
  Task<Result<void>> release_bitmaps();
  // Every guest write, zeroes, discard and grow first: notes the change and,
  // when a store or release cleared the in-use marks, sets them again before
  // the image changes.
  Task<Result<void>> before_guest_write();
  Task<Result<qcow2::BitmapDirEntry>> write_bitmap(const NamedBitmap& b);
  // Writes a new directory (or none) and the header pointing at it, then frees
  // `frees` and the old directory.
  Task<Result<void>> commit_bitmap_directory(std::vector<qcow2::BitmapDirEntry> dir,
                                             std::vector<std::pair<uint64_t, uint64_t>> frees);
  // The clusters of an entry's table and data, for freeing (nothing it cannot
  // vouch for: a cluster outside the file or in other metadata is leaked).
  Task<std::vector<std::pair<uint64_t, uint64_t>>> bitmap_clusters(
      const qcow2::BitmapDirEntry& e);
  Task<Result<std::vector<uint64_t>>> read_bitmap_table(const qcow2::BitmapDirEntry& e);
  qcow2::BitmapGeometry bitmap_geometry() const { return {cs(), hdr.size}; }

  // --- qcow2_device.cc
  Task<Result<void>> write_header();
  Task<Result<void>> grow(uint64_t new_size);
  Task<Result<void>> close();
  // close()'s write-back without closing (a reopen read-only).
  Task<Result<void>> write_back_clean();
  Task<Result<void>> set_read_only(bool ro);
  // Turns a kCorruptErrno error into EIO, marking the image corrupt (once).
  Task<Error> on_error(Error e);
  Result<void> check_writable(const char* what, uint64_t off) const;
  void update_info();

  uint64_t cs() const { return hdr.cluster_size(); }
  uint32_t cb() const { return hdr.cluster_bits; }
  bool ext() const { return hdr.extended_l2(); }
  // Subcluster (allocation unit inside a cluster) size.
  uint64_t unit() const { return ext() ? cs() / qcow2::kSubclusters : cs(); }

  Loop* loop;  // may be null (create)
  BlockDevicePtr file;
  BlockDevicePtr backing;
  qcow2::Header hdr;
  Qcow2OpenOptions opts;
  std::string name;
  Qcow2Info info;
  BlockCaps caps;

  std::vector<uint64_t> l1;                 // host byte order
  std::set<uint64_t> l1_dirty;              // indices to write at the next flush
  std::unordered_set<uint64_t> l2_clusters;  // host clusters holding active L2 tables
  std::unique_ptr<qcow2::L2Cache> l2;
  std::unique_ptr<qcow2::Refcounts> rc;
  qcow2::ClusterLock locks;
  qcow2::AsyncMutex l1_mutex;
  qcow2::AsyncMutex flush_mutex;
  // The bitmap directory as on disk (empty: no extension) and its place.
  std::vector<qcow2::BitmapDirEntry> bitmap_dir;
  qcow2::BitmapsExtension bitmaps_ext;
  // Bitmaps found in use at open (a writer crashed): inconsistent.
  std::set<std::string> bitmaps_stale;
  // A guest write, zeroes, discard or grow since open or the last store.
  bool changed_since_store = false;
  bool bitmaps_released = false;  // in-use marks cleared on disk by a store or release
  qcow2::AsyncMutex bitmap_mutex;
  bool read_only = false;
  bool corrupt_marked = false;
  bool closed = false;
};

// Opens an image (Qcow2Device::open without the wrapper; create() uses it too).
Task<Result<std::unique_ptr<Qcow2Impl>>> open_impl(Loop* loop, BlockDevicePtr file,
                                                   BlockDevicePtr backing, Qcow2OpenOptions opts);

}  // namespace blkmirror
