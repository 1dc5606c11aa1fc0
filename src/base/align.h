// Byte-range and alignment helpers. Pure functions; thread-safe.
#pragma once

#include <algorithm>
#include <bit>
#include <cstdint>

namespace blkmirror {

constexpr bool is_pow2(uint64_t x) { return x != 0 && (x & (x - 1)) == 0; }

// REQUIRES: a is a power of two.
constexpr uint64_t align_down(uint64_t x, uint64_t a) { return x & ~(a - 1); }
constexpr uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) & ~(a - 1); }
constexpr bool is_aligned(uint64_t x, uint64_t a) { return (x & (a - 1)) == 0; }

constexpr uint64_t div_round_up(uint64_t x, uint64_t d) { return (x + d - 1) / d; }

// A half-open byte range [offset, offset + length).
struct ByteRange {
  uint64_t offset = 0;
  uint64_t length = 0;
  uint64_t end() const { return offset + length; }
  bool overlaps(const ByteRange& o) const { return offset < o.end() && o.offset < end(); }
};

// True when [offset, offset+length) fits in [0, size) without overflowing.
constexpr bool range_within(uint64_t offset, uint64_t length, uint64_t size) {
  return offset <= size && length <= size - offset;
}

}  // namespace blkmirror
