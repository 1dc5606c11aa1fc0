// Reads and block status: walk the mapping run by run; unallocated runs fall
// through to the backing device (zeroes past its end or without one).
#include <algorithm>
#include <cstring>

#include <fmt/format.h>

#include "base/align.h"
#include "blockdev/qcow2/compress.h"
#include "blockdev/qcow2/qcow2_impl.h"

namespace blkmirror {

using namespace qcow2;

Task<Result<void>> Qcow2Impl::read_backing(uint64_t off, std::span<std::byte> buf) {
  uint64_t have = 0;
  if (backing && off < backing->length()) {
    have = std::min<uint64_t>(buf.size(), backing->length() - off);
    if (auto r = co_await backing->read(off, buf.first(have)); !r) co_return r;
  }
  std::memset(buf.data() + have, 0, buf.size() - have);
  co_return Result<void>{};
}

Task<Result<void>> Qcow2Impl::read_compressed(uint64_t cword, uint64_t in_cluster,
                                              std::span<std::byte> buf) {
  Compressed c = decode_compressed(cword, cb());
  uint64_t avail = std::min(c.length, file->length() - c.offset);
  std::vector<std::byte> in(avail);
  if (auto r = co_await file->read(c.offset, in); !r) co_return r;
  std::vector<std::byte> out(cs());
  if (auto r = decompress_cluster(hdr.compression_type == 1, in, out); !r)
    co_return corrupt(fmt::format("compressed cluster at host offset {:#x}: {}", c.offset,
                                  r.error().message()));
  std::memcpy(buf.data(), out.data() + in_cluster, buf.size());
  co_return Result<void>{};
}

Task<Result<void>> Qcow2Impl::read_unlocked(uint64_t off, std::span<std::byte> buf) {
  uint64_t done = 0;
  while (done < buf.size()) {
    uint64_t pos = off + done;
    auto run = co_await resolve(pos, buf.size() - done);
    if (!run) co_return make_error(run.error());
    auto part = buf.subspan(done, run->length);
    switch (run->kind) {
      case Kind::kNormal: {
        // A data cluster may run past a file that was cut short: zeroes there.
        uint64_t have = run->host < file->length()
                            ? std::min<uint64_t>(part.size(), file->length() - run->host)
                            : 0;
        if (have)
          if (auto r = co_await file->read(run->host, part.first(have)); !r) co_return r;
        std::memset(part.data() + have, 0, part.size() - have);
        break;
      }
      case Kind::kZero:
        std::memset(part.data(), 0, part.size());
        break;
      case Kind::kUnallocated:
        if (auto r = co_await read_backing(pos, part); !r) co_return r;
        break;
      case Kind::kCompressed:
        if (auto r = co_await read_compressed(run->cword, pos & (cs() - 1), part); !r) co_return r;
        break;
    }
    done += run->length;
  }
  co_return Result<void>{};
}

Task<Result<Extent>> Qcow2Impl::block_status(uint64_t off, uint64_t len) {
  auto run = co_await resolve(off, len);
  if (!run) co_return make_error(run.error());
  Extent e;
  e.length = run->length;
  switch (run->kind) {
    case Kind::kNormal:
    case Kind::kCompressed:
      e = Extent{run->length, true, false, 1};
      break;
    case Kind::kZero:
      e = Extent{run->length, true, true, 1};
      break;
    case Kind::kUnallocated:
      if (backing && off < backing->length()) {
        uint64_t n = std::min(run->length, backing->length() - off);
        auto b = co_await backing->block_status(off, n);
        if (!b) co_return make_error(b.error());
        e = *b;
        e.length = std::min(e.length, n);
        e.depth = b->depth ? b->depth + 1 : 0;
      } else {
        e = Extent{run->length, false, true, 0};
      }
      break;
  }
  co_return e;
}

}  // namespace blkmirror
