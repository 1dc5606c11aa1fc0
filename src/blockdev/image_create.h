// Creating a new image file in a format (raw or qcow2), as drive-mirror's
// absolute-paths mode and `qemu-img create` make one: a new sparse file of the
// virtual size (raw), or an empty file formatted as qcow2 of that size with an
// optional backing link (its name written as given, with its format). Never
// overwrites: an existing path fails with EEXIST and is left alone; a failure
// after the file was made removes it again, so a refused create leaves nothing.
//
// Threading rule: loop thread only (the qcow2 formatting runs on the loop).
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "blockdev/image_format.h"
#include "io/loop.h"

namespace blkmirror {

struct ImageCreateSpec {
  std::string path;
  ImageFormat format = ImageFormat::kRaw;
  uint64_t size = 0;
  // qcow2 only: the backing file name written into the header, and its format.
  std::optional<std::string> backing_file;
  std::optional<ImageFormat> backing_format;
};

// Errors: "Could not create 'PATH': reason" (EEXIST when it exists), or the
// qcow2 formatter's error naming the path.
// REQUIRES: spec outlives the co_await (GCC 12 rule 2, base/task.h).
Task<Result<void>> create_image(Loop& loop, const ImageCreateSpec& spec);

}  // namespace blkmirror
