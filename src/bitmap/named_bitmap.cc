#include "bitmap/named_bitmap.h"

#include <algorithm>
#include <bit>

#include "base/assert.h"

namespace blkmirror {

namespace {

uint64_t granules(uint64_t length, uint64_t granularity) {
  return length / granularity + (length % granularity != 0);
}

}  // namespace

NamedBitmap::NamedBitmap(std::string name, uint64_t granularity, uint64_t length)
    : name_(std::move(name)),
      granularity_(granularity),
      length_(length),
      bits_(granules(length, granularity)) {
  BLKMIRROR_ASSERT(std::has_single_bit(granularity) && granularity >= 512);
}

void NamedBitmap::mark(uint64_t off, uint64_t len) {
  if (len == 0 || off >= length_) return;
  const uint64_t end = std::min(length_, off + std::min(len, length_ - off));
  const uint64_t first = off / granularity_;
  const uint64_t last = (end - 1) / granularity_;
  bits_.set(first, last - first + 1);
}

void NamedBitmap::merge_from(const NamedBitmap& src) {
  BLKMIRROR_ASSERT(src.length() == length_);
  for (auto r = src.next_dirty(0); r; r = src.next_dirty(r->first + r->second))
    mark(r->first, r->second);
}

std::optional<std::pair<uint64_t, uint64_t>> NamedBitmap::next_dirty(uint64_t off) const {
  if (off >= length_) return std::nullopt;
  auto first = bits_.next_set(off / granularity_);
  if (!first) return std::nullopt;
  auto clean = bits_.next_clear(*first);
  const uint64_t end_bit = clean ? *clean : bits_.size();
  const uint64_t start = std::max(off, *first * granularity_);
  const uint64_t end = std::min(length_, end_bit * granularity_);
  return std::pair{start, end - start};
}

void NamedBitmap::resize(uint64_t length) {
  if (length == length_) return;
  DirtyBitmap grown(granules(length, granularity_));
  for (auto b = bits_.next_set(0); b && *b < grown.size(); b = bits_.next_set(*b + 1)) {
    auto clean = bits_.next_clear(*b);
    const uint64_t end = std::min(clean ? *clean : bits_.size(), grown.size());
    grown.set(*b, end - *b);
    b = end - 1;
  }
  bits_ = std::move(grown);
  length_ = length;
}

NamedBitmap* BitmapSet::find(const std::string& name) {
  for (auto& b : list_)
    if (b.name() == name) return &b;
  return nullptr;
}

const NamedBitmap* BitmapSet::find(const std::string& name) const {
  for (auto& b : list_)
    if (b.name() == name) return &b;
  return nullptr;
}

NamedBitmap& BitmapSet::add(std::string name, uint64_t granularity, uint64_t length) {
  BLKMIRROR_ASSERT(find(name) == nullptr);
  return list_.emplace_front(std::move(name), granularity, length);
}

void BitmapSet::remove(const std::string& name) {
  list_.remove_if([&](const NamedBitmap& b) { return b.name() == name; });
}

}  // namespace blkmirror
