// Image formats a node or a CLI image can have (raw, qcow2), and the rules for
// finding an image's backing file, shared by the daemon's blockdev-add and the
// CLI so both open a chain the same way:
//   - the format is the one the user gave; otherwise, for a backing file whose
//     overlay names no format, it is probed by magic (qemu-storage-daemon 7.2
//     probes there too: qcow2 magic -> qcow2, anything else -> raw);
//   - a relative backing file name is relative to the overlay's directory;
//   - an image may appear once in a chain (ChainGuard), so a backing file that
//     names itself or one of its overlays is an error, not endless recursion.
//
// Threading rule: detect_image_format runs on the device's loop; the rest are
// plain functions.
#pragma once

#include <cstdint>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <utility>

#include "blockdev/block_device.h"

namespace blkmirror {

enum class ImageFormat { kRaw, kQcow2 };

const char* to_string(ImageFormat f);
// "raw" | "qcow2"; errors name the value and what is accepted.
Result<ImageFormat> parse_image_format(std::string_view name);

// Reads the first bytes of file: qcow2 when they hold qcow2's magic "QFI\xfb",
// raw otherwise (also for files shorter than the magic).
Task<Result<ImageFormat>> detect_image_format(BlockDevice& file);

// The path a backing file name stored in the image at overlay_path refers to.
// Absolute names stay as they are. Errors: EINVAL for a relative name when
// overlay_path is not a local path (an NBD export has no directory).
Result<std::string> resolve_backing_path(const std::string& overlay_path, bool overlay_is_local,
                                         const std::string& backing_name);

// The images of one chain being opened, by (device, inode), top first.
class ChainGuard {
 public:
  // Records path; ELOOP when it is already in the chain (the message names the
  // chain's top and the image that repeats), or the stat error.
  Result<void> enter(const std::string& path);

 private:
  std::set<std::pair<uint64_t, uint64_t>> seen_;
  std::string top_;
};

// p made absolute (against the working directory) and normalized; p itself
// when that fails.
std::string absolute_path(const std::string& p);

}  // namespace blkmirror
