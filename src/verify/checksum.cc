#include "verify/checksum.h"

#include <xxhash.h>

namespace blkmirror {

ChunkSum chunk_sum(std::span<const std::byte> data) {
  XXH128_hash_t h = XXH3_128bits(data.data(), data.size());
  return ChunkSum{h.low64, h.high64};
}

}  // namespace blkmirror
