// NamedBitmap: a dirty bitmap that belongs to a block node and has a name, as
// QEMU's block-dirty-bitmap-add makes them: one bit per `granularity` bytes of
// the node, set by every write, write-zeroes and discard while the bitmap is
// enabled (recording). A backup tool, an NBD client (the qemu:dirty-bitmap:NAME
// meta context) or an incremental mirror (sync=bitmap) reads which byte ranges
// changed since it was added or last cleared.
//
// BitmapSet: the bitmaps of one node, newest first (QEMU's order in
// query-named-block-nodes). Pointers to its bitmaps stay valid until remove().
//
// Flags, as QEMU keeps them:
//   - busy: an operation holds the bitmap (a sync=bitmap mirror, an NBD export,
//     a transaction removing it); QMP may not modify or remove it.
//   - persistent: stored with the node's image when it closes
//     (docs/design/dirty-bitmaps.md says where).
//   - inconsistent: loaded with the in-use flag set (the writer crashed); it
//     cannot be used, only removed.
//
// Threading rule: loop thread only, like the Node that owns the set.
#pragma once

#include <cstdint>
#include <list>
#include <optional>
#include <string>
#include <utility>

#include "bitmap/dirty_bitmap.h"

namespace blkmirror {

// QEMU's longest bitmap name (BDRV_BITMAP_MAX_NAME_SIZE).
inline constexpr size_t kMaxBitmapNameLength = 1023;

class NamedBitmap {
 public:
  // REQUIRES: granularity a power of two >= 512.
  NamedBitmap(std::string name, uint64_t granularity, uint64_t length);

  const std::string& name() const { return name_; }
  uint64_t granularity() const { return granularity_; }
  uint64_t length() const { return length_; }  // bytes of the node it covers
  // Dirty bytes counted in whole granules, as QEMU's `count`.
  uint64_t count() const { return bits_.count() * granularity_; }
  const DirtyBitmap& bits() const { return bits_; }

  // Records a write of [off, off+len) when enabled; clipped to length().
  void record(uint64_t off, uint64_t len) {
    if (enabled) mark(off, len);
  }
  void mark(uint64_t off, uint64_t len);  // sets the granules touching the range
  void clear() { bits_.reset_all(); }
  // ORs another bitmap of the same length in, whatever its granularity (a
  // source granule dirties every granule of this one it overlaps).
  // REQUIRES: src.length() == length().
  void merge_from(const NamedBitmap& src);
  // The first dirty byte range at or after `off`: {offset, length}, clipped to
  // length(); nullopt when nothing is dirty there.
  std::optional<std::pair<uint64_t, uint64_t>> next_dirty(uint64_t off) const;
  // The node grew or shrank: granules past the new end go, new ones are clean.
  void resize(uint64_t length);
  // Replaces the bits (a transaction's undo, a load from disk).
  // REQUIRES: same granularity and length.
  void restore(const DirtyBitmap& bits) { bits_ = bits; }

  bool enabled = true;
  bool persistent = false;
  bool busy = false;
  bool inconsistent = false;

 private:
  std::string name_;
  uint64_t granularity_;
  uint64_t length_;
  DirtyBitmap bits_;
};

class BitmapSet {
 public:
  NamedBitmap* find(const std::string& name);
  const NamedBitmap* find(const std::string& name) const;
  // REQUIRES: no bitmap of that name (callers check first, for QEMU's text).
  NamedBitmap& add(std::string name, uint64_t granularity, uint64_t length);
  void remove(const std::string& name);
  // A write-type request reached the node's device: every enabled bitmap
  // records it.
  void record(uint64_t off, uint64_t len) {
    for (auto& b : list_) b.record(off, len);
  }
  void resize(uint64_t length) {
    for (auto& b : list_) b.resize(length);
  }
  bool empty() const { return list_.empty(); }
  auto begin() { return list_.begin(); }
  auto end() { return list_.end(); }
  auto begin() const { return list_.begin(); }
  auto end() const { return list_.end(); }

 private:
  std::list<NamedBitmap> list_;  // newest first
};

}  // namespace blkmirror
