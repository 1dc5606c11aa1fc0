#include "blockdev/image_chain.h"

#include <sys/stat.h>

#include <cstring>

#include <fmt/format.h>

namespace blkmirror {

namespace {

// One qcow2 layer over file and, below it, the chain its header names.
// guard holds the images opened so far (cycle detection).
// name is a reference into the awaiting frame (GCC 12 rule 2, base/task.h).
Task<Result<std::shared_ptr<Qcow2Device>>> open_qcow2_layer(
    Loop& loop, BlockDevicePtr file, const std::string& name, bool local, bool read_only,
    ChainGuard* guard, std::vector<std::shared_ptr<Qcow2Device>>* layers) {
  auto info = co_await Qcow2Device::probe(*file);
  if (!info) co_return make_error(info.error());
  BlockDevicePtr backing;
  if (info->backing_file) {
    auto fail = [&](const std::string& why) {
      return make_plain_error(EINVAL,
                              fmt::format("{}: could not open backing file: {}", name, why));
    };
    auto path = resolve_backing_path(name, local, *info->backing_file);
    if (!path) co_return fail(path.error().message());
    if (auto g = guard->enter(*path); !g) co_return fail(g.error().message());
    auto bfile = FileDevice::open(loop, *path, FileOptions{.read_only = true});
    if (!bfile) co_return fail(bfile.error().message());
    ImageFormat fmt = ImageFormat::kRaw;
    if (info->backing_format) {
      auto f = parse_image_format(*info->backing_format);
      if (!f) co_return fail(f.error().message());
      fmt = *f;
    } else {
      auto f = co_await detect_image_format(**bfile);
      if (!f) co_return fail(f.error().message());
      fmt = *f;
    }
    if (fmt == ImageFormat::kQcow2) {
      auto b = co_await open_qcow2_layer(loop, *bfile, *path, true, true, guard, layers);
      if (!b) co_return make_error(b.error());
      backing = *b;
    } else {
      backing = *bfile;
    }
  }
  auto q =
      co_await Qcow2Device::open(loop, file, backing, Qcow2OpenOptions{.read_only = read_only});
  if (!q) co_return make_error(q.error());
  layers->insert(layers->begin(), *q);  // this layer sits above the ones opened below it
  co_return *q;
}

}  // namespace

Task<Result<void>> OpenedImage::close() {
  Result<void> first;
  for (auto& l : layers) {
    auto r = co_await l->close();
    if (!r && first) first = r;
  }
  layers.clear();
  co_return first;
}

Task<Result<OpenedImage>> open_image(Loop& loop, BlockDevicePtr file, const std::string& name,
                                     bool local, std::optional<ImageFormat> format,
                                     bool read_only) {
  OpenedImage img;
  img.detected = !format;
  if (format) {
    img.format = *format;
  } else {
    auto f = co_await detect_image_format(*file);
    if (!f) co_return make_error(f.error());
    img.format = *f;
  }
  if (img.format == ImageFormat::kRaw) {
    img.top = file;
    co_return img;
  }
  ChainGuard guard;
  if (local) {
    if (auto g = guard.enter(name); !g) co_return make_error(g.error());
  }
  auto q = co_await open_qcow2_layer(loop, file, name, local, read_only, &guard, &img.layers);
  if (!q) {
    (void)co_await img.close();
    co_return make_error(q.error());
  }
  img.top = *q;
  co_return img;
}

}  // namespace blkmirror
