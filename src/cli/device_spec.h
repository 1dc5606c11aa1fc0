// Opening a SRC or DST argument of the CLI: a file or block device path, or an
// NBD URI (nbd://, nbds://, nbd+unix://, nbds+unix://; see blockdev/nbd_uri.h),
// which connects to the remote export.
//
// Threading rule: call on the thread that will run the Loop, before or between
// Loop::run calls (it runs the connect on the loop itself).
#pragma once

#include <memory>
#include <string>

#include "blockdev/file_device.h"
#include "io/loop.h"

namespace blkmirror {

struct OpenedDevice {
  BlockDevicePtr dev;
  std::shared_ptr<FileDevice> file;  // set for files and block devices, null for NBD
  bool is_nbd() const { return file == nullptr; }
};

bool is_nbd_spec(const std::string& spec);

// Opens spec; `read_only` and `direct` apply to files (an NBD export is what the
// server makes it). Errors are one line naming spec.
Result<OpenedDevice> open_device_spec(Loop& loop, const std::string& spec, FileOptions opts);

}  // namespace blkmirror
