#include "cli/image_bitmaps.h"

#include <fmt/format.h>
#include <sys/stat.h>

#include "journal/bitmap_file.h"

namespace blkmirror {

Result<BitmapStorePtr> open_image_bitmaps(const OpenedDevice& d, const std::string& spec,
                                          bool writable) {
  if (d.image.format == ImageFormat::kQcow2 && !d.image.layers.empty())
    return qcow2_bitmap_store(d.image.layers.front());
  struct stat st {};
  if (d.is_nbd() || ::stat(spec.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return BitmapStorePtr{};
  auto f = BitmapFile::open(spec, writable);
  if (!f) return make_error(f.error());
  return BitmapStorePtr(*f);
}

Result<void> load_image_bitmaps(Loop& loop, Node& node, BitmapStorePtr store) {
  if (!store) return {};
  auto loaded = loop.run(store->load());
  if (!loaded)
    return make_plain_error(loaded.error().errnum(),
                            fmt::format("{}: loading its dirty bitmaps: {}",
                                        node.device().describe(), loaded.error().message()));
  for (NamedBitmap& b : *loaded) node.bitmaps().adopt(std::move(b));
  node.set_bitmap_store(std::move(store));
  return {};
}

}  // namespace blkmirror
