// libFuzzer target: the qcow2 header and table parsing. The input is an image
// file: the header parser must refuse or accept it without crashing; an accepted
// header must serialize and parse back to the same fields; then the image is
// opened read-only on a memory device and its first MiB read and block-status
// queried, which walks the L1/L2/refcount tables and their checks; then opened
// read-write on a copy and written, zeroed, discarded and flushed (the allocator,
// refcount updates and the corrupt marking).
// Built by scripts/fuzz; seeds in tests/fuzz/corpus/qcow2 (qemu-img made images).
#include <array>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "blockdev/memory_device.h"
#include "blockdev/qcow2/header.h"
#include "blockdev/qcow2/qcow2_device.h"
#include "io/loop.h"

using namespace blkmirror;

namespace {

Task<void> exercise(Loop* loop, std::shared_ptr<MemoryDevice> file, bool writable) {
  const Qcow2OpenOptions o{.read_only = !writable};
  auto dev = co_await Qcow2Device::open(*loop, file, nullptr, o);
  if (!dev) co_return;
  Qcow2Device& q = **dev;
  std::vector<std::byte> buf(64 << 10);
  uint64_t end = std::min<uint64_t>(q.length(), 1 << 20);
  for (uint64_t pos = 0; pos < end; pos += buf.size()) {
    uint64_t n = std::min<uint64_t>(buf.size(), end - pos);
    (void)co_await q.read(pos, std::span(buf).first(n));
    (void)co_await q.block_status(pos, n);
  }
  if (!writable || end == 0) co_return;
  // The write path walks the same tables and the refcounts: a few partial and
  // whole-cluster writes, zeroes and a discard, then the flush that writes the
  // metadata back (corrupt tables must fail the request, never crash).
  std::fill(buf.begin(), buf.end(), std::byte{0x5a});
  const uint64_t cs = q.caps().cluster_size;
  const std::array<uint64_t, 4> at{0, end / 3, end / 2 + 512, end - std::min<uint64_t>(end, 4096)};
  for (uint64_t pos : at) {
    if (pos >= end) continue;
    uint64_t n = std::min<uint64_t>({uint64_t{4096}, end - pos, cs});
    if (n) (void)co_await q.write(pos, std::span(buf).first(n), {});
  }
  const ZeroFlags unmap{.may_unmap = true};
  (void)co_await q.write_zeroes(0, std::min<uint64_t>(end, 2 * cs), unmap);
  (void)co_await q.discard(end / 2, std::min<uint64_t>(end - end / 2, 2 * cs));
  (void)co_await q.flush();
  (void)co_await q.close();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto bytes = std::span(reinterpret_cast<const std::byte*>(data), size);
  auto h = qcow2::parse_header(bytes, "fuzz");
  if (h) {
    auto out = qcow2::serialize_header(*h);
    if (out) {
      auto again = qcow2::parse_header(*out, "fuzz");
      if (!again || again->size != h->size || again->cluster_bits != h->cluster_bits ||
          again->backing_file != h->backing_file || again->backing_format != h->backing_format ||
          again->extensions.size() != h->extensions.size())
        std::abort();  // a header we wrote must read back the same
    }
  }
  if (size > (4 << 20)) return 0;
  Loop loop(1);
  MemoryDevice::Options o{MemoryDevice::defaults()};
  o.yield = false;
  o.caps.read_only = false;
  auto file = std::make_shared<MemoryDevice>(size, o);
  file->write_now(0, bytes);
  loop.run(exercise(&loop, file, false));
  // Again read-write, on a fresh copy (the read-only pass never writes).
  auto rw = std::make_shared<MemoryDevice>(size, o);
  rw->write_now(0, bytes);
  loop.run(exercise(&loop, rw, true));
  return 0;
}
