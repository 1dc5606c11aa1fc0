// Image locks: the byte-range locks QEMU's file-posix driver takes on image
// files, so blkmirror, qemu-img, qemu-io, qemu-nbd and a running VM see each
// other's use of one image and refuse a second writer.
//
// The scheme (QEMU's, docs/design/permissions.md): for each permission bit i
// (permissions.h, QEMU's order) a process holds a shared (read) lock on
//   byte 100 + i  while it uses permission i, and on
//   byte 200 + i  while it does not let others use permission i.
// Before going ahead it tests, with an exclusive probe, byte 200 + i for every
// permission it needs (someone forbids it) and byte 100 + i for every one it
// does not share (someone uses it). The locks are open file description locks
// (F_OFD_SETLK): they belong to the open file, so two opens in one process
// exclude each other as two processes do, and closing the descriptor drops them.
//
// Threading rule: plain syscalls on a descriptor the caller owns; any thread.
#pragma once

#include <string>
#include <string_view>

#include "base/result.h"
#include "blockdev/permissions.h"

namespace blkmirror {

// QEMU's `locking` option of the file driver: auto = on where the system has
// OFD locks (Linux does), on = required, off = none taken, none checked.
enum class LockMode { kAuto, kOn, kOff };
Result<LockMode> parse_lock_mode(std::string_view s);

// Takes the locks for perms on fd and checks that no other open file holds a
// conflicting one. Errors (EAGAIN) read as QEMU's, on one line:
//   Failed to get "write" lock. Is another process using the image [a.img]?
//   Failed to get shared "write" lock. Is another process using the image [a.img]?
// On error some locks may be held: close fd to drop them.
Result<void> lock_image(int fd, const std::string& path, Perms perms, LockMode mode);

// Changes the locks fd holds for `from` into those for `to` (a reopen between
// read-only and read-write): drops the bytes `to` no longer wants, takes the new
// ones and probes as lock_image does. Our own locks never conflict (same open
// file). On error the locks for `from` are back, so the caller changed nothing.
Result<void> relock_image(int fd, const std::string& path, Perms from, Perms to, LockMode mode);

// Takes the locks for perms on fd without probing: for a new descriptor of a
// file whose other descriptor already holds and checked the same locks (a
// reopen moving them across); it only adds shared locks to shared ones, so it
// cannot conflict. Close the old descriptor afterwards.
Result<void> copy_image_locks(int fd, const std::string& path, Perms perms, LockMode mode);

}  // namespace blkmirror
