#include "blockdev/image_create.h"

#include <unistd.h>

#include <cstring>

#include <fmt/format.h>

#include "blockdev/file_device.h"
#include "blockdev/qcow2/qcow2_device.h"

namespace blkmirror {

namespace {

Result<void> could_not_create(const std::string& path, int errnum, const std::string& why) {
  return make_plain_error(errnum, fmt::format("Could not create '{}': {}", path, why));
}

}  // namespace

Task<Result<void>> create_image(Loop& loop, const ImageCreateSpec& spec) {
  const bool qcow2 = spec.format == ImageFormat::kQcow2;
  if (spec.backing_file && !qcow2)
    co_return make_plain_error(EINVAL, fmt::format("Backing file not supported for file format "
                                                   "'{}'",
                                                   to_string(spec.format)));
  // The file first, empty for qcow2 (the formatter lays out the image), at
  // the virtual size for raw. O_EXCL: an existing file is never touched.
  if (auto r = FileDevice::create(spec.path, qcow2 ? 0 : spec.size); !r)
    co_return could_not_create(spec.path, r.error().errnum(), std::strerror(r.error().errnum()));
  if (!qcow2) co_return Result<void>{};
  auto file = FileDevice::open(loop, spec.path, FileOptions{.read_only = false});
  Result<void> r;
  if (!file) {
    r = could_not_create(spec.path, file.error().errnum(), file.error().message());
  } else {
    Qcow2CreateOptions o;
    o.size = spec.size;
    o.backing_file = spec.backing_file;
    if (spec.backing_format) o.backing_format = to_string(*spec.backing_format);
    r = co_await Qcow2Device::create(**file, o);
    if (r) r = co_await (*file)->flush();
    if (!r) r = could_not_create(spec.path, r.error().errnum(), r.error().message());
    file->reset();  // closed (its lock released) before the caller opens it as a node
  }
  if (!r) ::unlink(spec.path.c_str());  // ours: made a moment ago
  co_return r;
}

}  // namespace blkmirror
