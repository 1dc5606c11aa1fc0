#include "blockdev/image_lock.h"

#include <fcntl.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <vector>

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

namespace {

// The bytes a holder of perms locks, as a list.
std::vector<off_t> lock_bytes(Perms perms) {
  std::vector<off_t> out;
  for (unsigned i = 0; i < kPermCount; ++i) {
    uint32_t bit = 1u << i;
    if (perms.need & bit) out.push_back(kPermBase + i);
    if (!(perms.shared & bit)) out.push_back(kSharedBase + i);
  }
  return out;
}

bool contains(const std::vector<off_t>& v, off_t b) {
  return std::find(v.begin(), v.end(), b) != v.end();
}

int unlock(int fd, off_t byte) {
  struct flock fl = byte_lock(byte, F_UNLCK);
  return ::fcntl(fd, F_OFD_SETLK, &fl) == 0 ? 0 : errno;
}

std::string hint(const std::string& path) {
  return fmt::format("Is another process using the image [{}]?", path);
}

// Takes each byte; ok (true) when locks are unsupported and mode is auto.
Result<bool> take_all(int fd, const std::string& path, const std::vector<off_t>& bytes,
                      LockMode mode) {
  for (off_t byte : bytes) {
    int err = take(fd, byte);
    if (err == 0) continue;
    // auto: a file system without OFD locks (EINVAL) or locking (ENOLCK)
    // simply goes unlocked, as QEMU's auto does.
    if (mode == LockMode::kAuto && (err == EINVAL || err == ENOLCK || err == EOPNOTSUPP))
      return false;
    return make_plain_error(
        err, fmt::format("Failed to lock byte {}: {}. {}", byte, std::strerror(err), hint(path)));
  }
  return true;
}

// Someone else forbids what perms need, or uses what perms do not share.
Result<void> probe_all(int fd, const std::string& path, Perms perms) {
  for (unsigned i = 0; i < kPermCount; ++i) {
    uint32_t bit = 1u << i;
    if (!(perms.need & bit)) continue;
    if (int err = probe(fd, kSharedBase + i))
      return make_plain_error(
          err, fmt::format("Failed to get \"{}\" lock. {}", perm_names(bit), hint(path)));
  }
  for (unsigned i = 0; i < kPermCount; ++i) {
    uint32_t bit = 1u << i;
    if (perms.shared & bit) continue;
    if (int err = probe(fd, kPermBase + i))
      return make_plain_error(
          err, fmt::format("Failed to get shared \"{}\" lock. {}", perm_names(bit), hint(path)));
  }
  return {};
}

}  // namespace

Result<void> lock_image(int fd, const std::string& path, Perms perms, LockMode mode) {
  if (mode == LockMode::kOff) return {};
  // Take ours first, then probe: of two openers racing, at least one sees the
  // other (possibly both, and both give up: safe).
  auto taken = take_all(fd, path, lock_bytes(perms), mode);
  if (!taken) return make_error(taken.error());
  if (!*taken) return {};
  return probe_all(fd, path, perms);
}

Result<void> relock_image(int fd, const std::string& path, Perms from, Perms to, LockMode mode) {
  if (mode == LockMode::kOff) return {};
  const auto old_bytes = lock_bytes(from), new_bytes = lock_bytes(to);
  std::vector<off_t> added;
  for (off_t b : new_bytes)
    if (!contains(old_bytes, b)) added.push_back(b);
  auto restore = [&] {
    for (off_t b : added) (void)unlock(fd, b);
    // Shared locks we dropped: nobody takes exclusive ones (probes only test),
    // so taking them back cannot fail for a conflict.
    for (off_t b : old_bytes) (void)take(fd, b);
  };
  for (off_t b : old_bytes)
    if (!contains(new_bytes, b)) (void)unlock(fd, b);
  auto taken = take_all(fd, path, added, mode);
  if (!taken) {
    restore();
    return make_error(taken.error());
  }
  if (!*taken) return {};
  if (auto p = probe_all(fd, path, to); !p) {
    restore();
    return p;
  }
  return {};
}

Result<void> copy_image_locks(int fd, const std::string& path, Perms perms, LockMode mode) {
  if (mode == LockMode::kOff) return {};
  auto taken = take_all(fd, path, lock_bytes(perms), mode);
  if (!taken) return make_error(taken.error());
  return {};
}

}  // namespace blkmirror
