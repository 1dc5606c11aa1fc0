// Opening an image with its backing chain outside the node graph (the CLI's
// SRC, DST and serve IMAGE): the top image over its file in the format given or
// detected by magic, and the backing files its qcow2 headers name, read-only,
// each by the rules of image_format.h. The daemon builds the same chain as graph
// nodes instead (qmp/block_chain.cc).
//
// Threading rule: loop thread only.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "blockdev/file_device.h"
#include "blockdev/image_format.h"
#include "blockdev/qcow2/qcow2_device.h"
#include "io/loop.h"

namespace blkmirror {

struct OpenedImage {
  BlockDevicePtr top;  // the guest view: the qcow2 device, or the file itself (raw)
  ImageFormat format = ImageFormat::kRaw;
  bool detected = false;  // format came from the magic, not from the caller
  // The qcow2 layers, top first. close() them before exit: that writes their
  // metadata back and marks them clean.
  std::vector<std::shared_ptr<Qcow2Device>> layers;
  // Closes every layer, top first; the first error.
  Task<Result<void>> close();
};

// Opens the image whose bytes are `file`. name: for messages and for finding
// relative backing files (a path when local); it must outlive the call.
// format: nullopt = detect by magic.
// Errors are one line naming the image.
Task<Result<OpenedImage>> open_image(Loop& loop, BlockDevicePtr file, const std::string& name,
                                     bool local, std::optional<ImageFormat> format, bool read_only);

}  // namespace blkmirror
