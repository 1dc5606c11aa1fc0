// Opening a SRC, DST or IMAGE argument of the CLI: a file or block device path,
// a Ceph RBD image in QEMU's legacy syntax (rbd:POOL/IMAGE[@SNAP][:conf=PATH]...,
// blockdev/rbd/rbd_spec.h; raw unless --format says otherwise), or an NBD URI
// (nbd://, nbds://, nbd+unix://, nbds+unix://; see blockdev/nbd_uri.h), which
// connects to the remote export; then the image format over it: raw or qcow2
// (with its backing chain, read-only).
//
// Format: the one given (--format); else a file is detected by its magic, and
// when that made it qcow2 the CLI says so (one line on stderr; raw, what the CLI
// always did, goes without saying); an NBD export is raw unless
// --format qcow2 says otherwise (it is a guest's disk, whose first bytes are the
// guest's business). A raw file that begins with qcow2's magic is never read as
// qcow2 when --format raw is given.
//
// Threading rule: call on the thread that will run the Loop, before or between
// Loop::run calls (it runs the connect and the format probe on the loop itself).
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "blockdev/file_device.h"
#include "blockdev/image_chain.h"
#include "blockdev/rbd/rbd_device.h"
#include "io/loop.h"

namespace blkmirror {

struct OpenedDevice {
  BlockDevicePtr dev;                // the guest view (qcow2 over the file, or the file)
  std::shared_ptr<FileDevice> file;  // set for files and block devices, null for NBD, rbd
  OpenedImage image;                 // format and qcow2 layers (close() before exit)
  std::shared_ptr<RbdDevice> rbd;    // set for a Ceph RBD image (rbd:POOL/IMAGE...)
  bool is_nbd() const { return file == nullptr && !rbd; }
};

bool is_nbd_spec(const std::string& spec);

// "raw" | "qcow2" | "" (detect), for --format style options. One-line errors.
Result<std::optional<ImageFormat>> parse_format_option(const std::string& text, const char* option);

// Opens spec as format (nullopt: detect, see above); `read_only` and `direct`
// apply to files (an NBD export is what the server makes it). Errors are one
// line naming spec. role: "SRC", "DST", "IMAGE", for the detection note.
Result<OpenedDevice> open_device_spec(Loop& loop, const std::string& spec, FileOptions opts,
                                      std::optional<ImageFormat> format = ImageFormat::kRaw,
                                      const char* role = nullptr);

}  // namespace blkmirror
