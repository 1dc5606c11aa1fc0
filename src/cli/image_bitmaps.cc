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

CliImageBitmaps::~CliImageBitmaps() {
  // Gave up before its clean end (bad input found after attach): nothing was
  // written, so the bitmaps are as loaded; stored, they are not left in use.
  if (attached_ && !stored_) (void)loop_.run(store());
}

Result<void> CliImageBitmaps::attach(Node& node, const OpenedDevice& d, const std::string& spec,
                                     bool writable) {
  auto store = open_image_bitmaps(d, spec, writable);
  if (!store) return make_error(store.error());
  if (!*store) return {};
  attached_ = true;  // the store marked them in use (writable): store() clears that again
  auto loaded = loop_.run((*store)->load());
  if (!loaded)
    return make_plain_error(loaded.error().errnum(),
                            fmt::format("{}: loading its dirty bitmaps: {}", spec,
                                        loaded.error().message()));
  for (NamedBitmap& b : *loaded) node.bitmaps().adopt(std::move(b));
  node.set_bitmap_store(std::move(*store));
  return {};
}

Task<Result<void>> CliImageBitmaps::store() {
  stored_ = true;
  Result<void> first;
  for (Node* n : graph_.nodes()) {
    if (!n->bitmap_store()) continue;
    auto r = co_await n->bitmap_store()->store(n->bitmaps());
    if (!r && first)
      first = make_plain_error(r.error().errnum(),
                               fmt::format("storing the dirty bitmaps of {}: {}",
                                           n->device().describe(), r.error().message()));
  }
  co_return first;
}

}  // namespace blkmirror
