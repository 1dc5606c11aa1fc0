// ChunkSum: the checksum verify compares chunks by (XXH3-128, xxhash.h from
// Debian's libxxhash-dev): fast enough to hash at memory speed, and 128 bits
// so that two different chunks of a disk agreeing by chance is not a concern.
//
// Threading rule: pure functions; any thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

namespace blkmirror {

struct ChunkSum {
  uint64_t low = 0, high = 0;
  bool operator==(const ChunkSum&) const = default;
};

ChunkSum chunk_sum(std::span<const std::byte> data);

}  // namespace blkmirror
