#include "blockdev/image_lock.h"

#include <fcntl.h>

#include <cerrno>
#include <cstring>

#include <fmt/format.h>

namespace blkmirror {

namespace {

constexpr off_t kPermBase = 100;    // "I use permission i"
constexpr off_t kSharedBase = 200;  // "I do not share permission i"

struct flock byte_lock(off_t byte, short type) {
  struct flock fl {};
  fl.l_whence = SEEK_SET;
  fl.l_start = byte;
  fl.l_len = 1;
  fl.l_type = type;
  return fl;  // l_pid stays 0, as OFD locks require
}

// 0, or the errno of F_OFD_SETLK.
int take(int fd, off_t byte) {
  struct flock fl = byte_lock(byte, F_RDLCK);
  return ::fcntl(fd, F_OFD_SETLK, &fl) == 0 ? 0 : errno;
}

// 0 when nobody else holds a lock on byte, EAGAIN when someone does, else the
// errno of F_OFD_GETLK. Our own locks on this open file never conflict.
int probe(int fd, off_t byte) {
  struct flock fl = byte_lock(byte, F_WRLCK);
  if (::fcntl(fd, F_OFD_GETLK, &fl) != 0) return errno;
  return fl.l_type == F_UNLCK ? 0 : EAGAIN;
}

}  // namespace

Result<LockMode> parse_lock_mode(std::string_view s) {
  if (s == "auto") return LockMode::kAuto;
  if (s == "on") return LockMode::kOn;
  if (s == "off") return LockMode::kOff;
  return make_plain_error(EINVAL,
                          fmt::format("Invalid locking mode '{}' (expected auto, on or off)", s));
}

Result<void> lock_image(int fd, const std::string& path, Perms perms, LockMode mode) {
  if (mode == LockMode::kOff) return {};
  const std::string hint = fmt::format("Is another process using the image [{}]?", path);
  // Take ours first, then probe: of two openers racing, at least one sees the
  // other (possibly both, and both give up: safe).
  for (unsigned i = 0; i < kPermCount; ++i) {
    uint32_t bit = 1u << i;
    for (off_t byte :
         {(perms.need & bit) ? kPermBase + i : -1, !(perms.shared & bit) ? kSharedBase + i : -1}) {
      if (byte < 0) continue;
      int err = take(fd, byte);
      if (err == 0) continue;
      // auto: a file system without OFD locks (EINVAL) or locking (ENOLCK)
      // simply goes unlocked, as QEMU's auto does.
      if (mode == LockMode::kAuto && (err == EINVAL || err == ENOLCK || err == EOPNOTSUPP))
        return {};
      return make_plain_error(
          err, fmt::format("Failed to lock byte {}: {}. {}", byte, std::strerror(err), hint));
    }
  }
  for (unsigned i = 0; i < kPermCount; ++i) {
    uint32_t bit = 1u << i;
    if (!(perms.need & bit)) continue;
    if (int err = probe(fd, kSharedBase + i))
      return make_plain_error(err,
                              fmt::format("Failed to get \"{}\" lock. {}", perm_names(bit), hint));
  }
  for (unsigned i = 0; i < kPermCount; ++i) {
    uint32_t bit = 1u << i;
    if (perms.shared & bit) continue;
    if (int err = probe(fd, kPermBase + i))
      return make_plain_error(
          err, fmt::format("Failed to get shared \"{}\" lock. {}", perm_names(bit), hint));
  }
  return {};
}

}  // namespace blkmirror
