// libFuzzer target: the qcow2 bitmaps extension (blockdev/qcow2/bitmaps.h and
// bitmap_io.cc). The input is an image file. Pure part: every bitmaps
// extension in its header is parsed; an accepted one's directory (read from the
// input) is parsed, and an accepted directory must encode and parse back the
// same. Device part: the image is opened read-write on a memory device (which
// marks its bitmaps in use), its bitmaps loaded, one added, all stored and the
// image closed; an image that took that must open again and load the same
// names, the new one with its bits.
// Built by scripts/fuzz; seeds in tests/fuzz/corpus/qcow2_bitmaps (qemu-img made
// images with bitmaps: qemu-img create -o cluster_size=512, qemu-img bitmap
// --add, qemu-io writes).
#include <cstdint>
#include <cstdlib>
#include <set>
#include <string>
#include <vector>

#include "blockdev/memory_device.h"
#include "blockdev/qcow2/bitmaps.h"
#include "blockdev/qcow2/header.h"
#include "blockdev/qcow2/qcow2_device.h"
#include "io/loop.h"

using namespace blkmirror;
using namespace blkmirror::qcow2;

namespace {

void pure(std::span<const std::byte> bytes) {
  auto h = parse_header(bytes, "fuzz");
  if (!h) return;
  const BitmapGeometry g{h->cluster_size(), h->size};
  for (const auto& e : h->extensions) {
    if (e.type != kExtBitmaps) continue;
    auto ext = parse_bitmaps_extension(e.data, g.cluster_size);
    if (!ext) continue;
    if (ext->directory_offset > bytes.size() ||
        ext->directory_size > bytes.size() - ext->directory_offset)
      continue;
    auto dir =
        parse_bitmap_directory(bytes.subspan(ext->directory_offset, ext->directory_size), *ext, g);
    if (!dir) continue;
    auto again = encode_bitmap_directory(*dir, g);
    if (!again) std::abort();  // what we accepted we can write
    auto back = parse_bitmap_directory(*again, {ext->nb_bitmaps, again->size(), 512}, g);
    if (!back || back->size() != dir->size()) std::abort();
    for (size_t i = 0; i < dir->size(); ++i)
      if ((*back)[i].name != (*dir)[i].name || (*back)[i].flags != (*dir)[i].flags ||
          (*back)[i].table_offset != (*dir)[i].table_offset)
        std::abort();
  }
}

Task<void> exercise(Loop* loop, std::shared_ptr<MemoryDevice> file) {
  std::set<std::string> names;
  {
    auto dev = co_await Qcow2Device::open(*loop, file, nullptr, {});
    if (!dev) co_return;
    auto loaded = co_await (*dev)->load_bitmaps();
    if (!loaded) co_return;
    BitmapSet set;
    for (auto& b : *loaded) {
      names.insert(b.name());
      set.adopt(std::move(b));
    }
    const uint64_t len = (*dev)->length();
    if (len > 0 && !set.find("fuzz") && (*dev)->can_store_bitmap(set, "fuzz", 65536)) {
      NamedBitmap& n = set.add("fuzz", 65536, len);
      n.persistent = true;
      n.mark(len / 2, 1);
      names.insert("fuzz");
    }
    auto stored = co_await (*dev)->store_bitmaps(set);
    auto closed = co_await (*dev)->close();
    if (!stored || !closed) co_return;
  }
  auto dev = co_await Qcow2Device::open(*loop, file, nullptr, {.read_only = true});
  if (!dev) std::abort();  // an image we stored must open again
  auto loaded = co_await (*dev)->load_bitmaps();
  if (!loaded) std::abort();
  std::set<std::string> again;
  for (auto& b : *loaded) {
    again.insert(b.name());
    if (b.name() == "fuzz" && !b.inconsistent && b.count() != 65536) std::abort();
  }
  if (again != names) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto bytes = std::span(reinterpret_cast<const std::byte*>(data), size);
  pure(bytes);
  if (size > (4 << 20)) return 0;
  Loop loop(1);
  MemoryDevice::Options o{MemoryDevice::defaults()};
  o.yield = false;
  o.caps.read_only = false;
  auto file = std::make_shared<MemoryDevice>(size, o);
  file->write_now(0, bytes);
  loop.run(exercise(&loop, file));
  return 0;
}
