// DirtyBitmap: a hierarchical bitmap that tracks which granules (e.g. 64 KiB
// chunks) of a block device are dirty and still need to be copied by the mirror.
//
// Contract:
//   - Holds size() bits, all clear after construction. Bits are addressed
//     0..size()-1; a size of 0 is valid (every query returns "nothing").
//   - Range operations take (start, n) and are clipped to size(): bits past the
//     end are ignored, n == 0 or start >= size() is a no-op, and start + n may
//     exceed 2^64 without overflow issues.
//   - count() is O(1); next_set() skips clear regions via summary levels, so
//     walking a huge, mostly clean bitmap costs time proportional to the number
//     of dirty words, not to size(). See docs/design/dirty-bitmap.md.
//
// Threading: not thread-safe; owned by the event loop thread. No internal
// locking; callers on other threads must hop to the loop before touching it.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

namespace blkmirror {

class DirtyBitmap {
 public:
  explicit DirtyBitmap(uint64_t nbits);  // all clear; nbits may be 0

  uint64_t size() const { return nbits_; }
  uint64_t count() const { return count_; }  // number of set bits, O(1)
  bool test(uint64_t bit) const;             // REQUIRES bit < size()

  void set(uint64_t start, uint64_t n);    // set [start, start+n); clipped to size(); n==0 no-op
  void reset(uint64_t start, uint64_t n);  // clear [start, start+n); clipped to size()
  void set_all();
  void reset_all();

  // First set bit >= from, or nullopt. from >= size() -> nullopt.
  std::optional<uint64_t> next_set(uint64_t from) const;
  // First clear bit >= from (and < size()), or nullopt.
  std::optional<uint64_t> next_clear(uint64_t from) const;
  // Count of set bits within [start, start+n), clipped.
  uint64_t count_range(uint64_t start, uint64_t n) const;
  // Heap bytes used by all levels (for memory reporting).
  uint64_t memory_bytes() const;

 private:
  using Level = std::vector<uint64_t>;

  // Applies a set (or clear) of bits [first, last] (inclusive) to `level`, then
  // recurses into the summary level above for the words that changed between
  // zero and non-zero.
  void update_level(size_t level, uint64_t first, uint64_t last, bool set);

  // Clips [start, start+n) to the bitmap; returns false if nothing remains.
  bool clip(uint64_t start, uint64_t n, uint64_t& first, uint64_t& last) const;

  uint64_t nbits_;
  uint64_t count_ = 0;
  // levels_[0] holds one bit per item. levels_[k+1] holds one bit per word of
  // levels_[k], set iff that word is non-zero. The last level has one word.
  // Invariant: bits beyond the logical end of every level are zero.
  std::vector<Level> levels_;
};

}  // namespace blkmirror
