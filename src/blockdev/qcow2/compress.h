// Compressed qcow2 clusters (read only): raw deflate (zlib, no header, as QEMU
// writes them) and zstd (when the header's compression_type says 1). Pure
// functions; the device reads the compressed bytes and asks for one cluster.
//
// Threading rule: pure; safe anywhere.
// On-disk ORDERING RULE: none (this driver never writes compressed clusters).
#pragma once

#include <cstddef>
#include <span>

#include "base/result.h"

namespace blkmirror::qcow2 {

// Decompresses `in` until `out` (one cluster) is full. Trailing bytes of `in` are
// ignored (the descriptor's last sector may hold the next cluster's data).
// EIO when the data is malformed or too short.
Result<void> decompress_cluster(bool zstd, std::span<const std::byte> in, std::span<std::byte> out);

}  // namespace blkmirror::qcow2
