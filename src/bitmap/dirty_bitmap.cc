#include "bitmap/dirty_bitmap.h"

#include <algorithm>
#include <bit>
#include <limits>

#include "base/assert.h"

namespace blkmirror {
namespace {

constexpr uint64_t kWordBits = 64;
constexpr uint64_t kAllOnes = ~uint64_t{0};

constexpr uint64_t word_of(uint64_t bit) { return bit / kWordBits; }
constexpr uint64_t bit_in_word(uint64_t bit) { return bit % kWordBits; }
constexpr uint64_t words_for(uint64_t bits) { return (bits + kWordBits - 1) / kWordBits; }

// Mask with bits [lo, hi] set, 0 <= lo <= hi <= 63.
constexpr uint64_t mask_between(uint64_t lo, uint64_t hi) {
  return (kAllOnes << lo) & (kAllOnes >> (kWordBits - 1 - hi));
}

// Mask of the bits of word `w` that fall inside the inclusive bit range
// [first, last]: partial for the head and tail words, all ones in between.
constexpr uint64_t range_mask_for_word(uint64_t w, uint64_t first, uint64_t last) {
  const uint64_t lo = w == word_of(first) ? bit_in_word(first) : 0;
  const uint64_t hi = w == word_of(last) ? bit_in_word(last) : kWordBits - 1;
  return mask_between(lo, hi);
}

// Inclusive range of word indices whose zero/non-zero state flipped during an
// update; empty until the first add().
struct ChangedWords {
  uint64_t first = std::numeric_limits<uint64_t>::max();
  uint64_t last = 0;
  bool empty() const { return first > last; }
  void add(uint64_t w) {
    first = std::min(first, w);
    last = std::max(last, w);
  }
};

}  // namespace

DirtyBitmap::DirtyBitmap(uint64_t nbits) : nbits_(nbits) {
  // Level 0 always has at least one word so that the "top level is a single
  // word" rule holds even for an empty bitmap.
  levels_.emplace_back(std::max<uint64_t>(1, words_for(nbits)), 0);
  while (levels_.back().size() > 1) {
    const uint64_t below_words = levels_.back().size();
    levels_.emplace_back(words_for(below_words), 0);
  }
}

bool DirtyBitmap::test(uint64_t bit) const {
  BLKMIRROR_ASSERT(bit < nbits_);
  return (levels_[0][word_of(bit)] >> bit_in_word(bit)) & 1;
}

bool DirtyBitmap::clip(uint64_t start, uint64_t n, uint64_t& first, uint64_t& last) const {
  if (n == 0 || start >= nbits_) return false;
  // Written as a subtraction so start + n can never overflow.
  first = start;
  last = start + std::min(n, nbits_ - start) - 1;
  return true;
}

void DirtyBitmap::set(uint64_t start, uint64_t n) {
  uint64_t first, last;
  if (clip(start, n, first, last)) update_level(0, first, last, /*set=*/true);
}

void DirtyBitmap::reset(uint64_t start, uint64_t n) {
  uint64_t first, last;
  if (clip(start, n, first, last)) update_level(0, first, last, /*set=*/false);
}

void DirtyBitmap::set_all() { set(0, nbits_); }

void DirtyBitmap::reset_all() {
  for (Level& level : levels_) std::fill(level.begin(), level.end(), 0);
  count_ = 0;
}

void DirtyBitmap::update_level(size_t level, uint64_t first, uint64_t last, bool set) {
  Level& words = levels_[level];
  ChangedWords changed;
  uint64_t flipped_bits = 0;  // bits that actually changed value

  const uint64_t head = word_of(first), tail = word_of(last);
  for (uint64_t w = head; w <= tail; ++w) {
    // Only the head and tail words are partial; everything between is filled.
    const uint64_t mask = (w == head || w == tail) ? range_mask_for_word(w, first, last) : kAllOnes;
    const uint64_t old_word = words[w];
    // Only the bits under the mask that differ from the target value flip.
    const uint64_t flips = mask & (set ? ~old_word : old_word);
    if (flips == 0) continue;  // word already in the requested state
    const uint64_t new_word = old_word ^ flips;
    words[w] = new_word;
    // Popcount only matters for the item level; summaries are not counted.
    // Whole-word flips are the common case in big fills, and skipping the
    // popcount there matters on builds without a native POPCNT instruction.
    if (level == 0) flipped_bits += flips == kAllOnes ? kWordBits : std::popcount(flips);
    if ((old_word == 0) != (new_word == 0)) changed.add(w);
  }

  if (level == 0) count_ = set ? count_ + flipped_bits : count_ - flipped_bits;

  // Words between changed.first and changed.last all ended in the same state:
  // on set every touched word is non-zero; on reset every interior word is
  // zero and a head/tail word is included only if it became zero. So the
  // summary update is itself a contiguous range operation one level up.
  if (!changed.empty() && level + 1 < levels_.size()) {
    update_level(level + 1, changed.first, changed.last, set);
  }
}

std::optional<uint64_t> DirtyBitmap::next_set(uint64_t from) const {
  if (from >= nbits_) return std::nullopt;

  // Climb: at each level look for a set bit at or after `pos` within the word
  // holding `pos`. If there is none, everything left in that word is clean, so
  // continue one level up starting at the next word's summary bit.
  uint64_t pos = from;
  size_t level = 0;
  uint64_t found;
  for (;;) {
    const Level& words = levels_[level];
    const uint64_t w = word_of(pos);
    if (w >= words.size()) return std::nullopt;  // ran off the end of this level
    const uint64_t bits = words[w] & (kAllOnes << bit_in_word(pos));
    if (bits != 0) {
      found = w * kWordBits + std::countr_zero(bits);
      break;
    }
    if (level + 1 == levels_.size()) return std::nullopt;  // top level exhausted
    pos = w + 1;
    ++level;
  }

  // Descend: `found` indexes a non-zero word of the level below; its lowest set
  // bit is the first dirty position there, because every earlier word was
  // already ruled out on the way up.
  while (level > 0) {
    --level;
    const uint64_t word = levels_[level][found];
    BLKMIRROR_ASSERT(word != 0, "summary bit set for a zero word");
    found = found * kWordBits + std::countr_zero(word);
  }
  return found;
}

std::optional<uint64_t> DirtyBitmap::next_clear(uint64_t from) const {
  if (from >= nbits_) return std::nullopt;
  const Level& words = levels_[0];
  // Summaries only track "any bit set", which cannot rule out clear bits, so a
  // plain scan that skips all-ones words is used instead.
  uint64_t w = word_of(from);
  uint64_t clear = ~words[w] & (kAllOnes << bit_in_word(from));
  while (clear == 0) {
    if (++w >= words.size()) return std::nullopt;
    clear = ~words[w];
  }
  const uint64_t bit = w * kWordBits + std::countr_zero(clear);
  // Padding bits past the end are zero and so look clear; they do not count.
  if (bit >= nbits_) return std::nullopt;
  return bit;
}

uint64_t DirtyBitmap::count_range(uint64_t start, uint64_t n) const {
  uint64_t first, last;
  if (!clip(start, n, first, last)) return 0;
  if (first == 0 && last == nbits_ - 1) return count_;  // whole bitmap: O(1)
  const Level& words = levels_[0];
  uint64_t total = 0;
  for (uint64_t w = word_of(first); w <= word_of(last); ++w) {
    total += std::popcount(words[w] & range_mask_for_word(w, first, last));
  }
  return total;
}

uint64_t DirtyBitmap::memory_bytes() const {
  uint64_t bytes = levels_.capacity() * sizeof(Level);
  for (const Level& level : levels_) bytes += level.capacity() * sizeof(uint64_t);
  return bytes;
}

}  // namespace blkmirror
