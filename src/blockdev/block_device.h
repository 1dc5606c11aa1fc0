// BlockDevice: a byte-addressed disk (file, block device, memory, remote export)
// with the operations a mirror needs, and caps(), what the device can do.
// Callers ask caps() rather than guess; data operations never change caps().
//
// Threading rule: all methods run on the owning Loop's thread; not thread-safe.
// Buffer lifetime: a span passed to read()/write() must stay valid until the
// returned Task completes. Ranges must lie within [0, length()).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include "base/limits.h"
#include "base/result.h"
#include "base/task.h"

namespace blkmirror {

struct BlockCaps {
  bool read_only = false;
  bool zero_init = false;        // reads as zeroes everywhere when opened (fresh image)
  bool can_zero = false;         // write_zeroes without sending data
  bool can_zero_unmap = false;   // write_zeroes{may_unmap} leaves holes behind
  bool can_trim = false;         // discard() does something
  bool can_fua = false;          // native FUA (otherwise emulated with a flush)
  bool has_block_status = false; // block_status() reports real holes / zero areas
  uint64_t cluster_size = 0;     // allocation unit of a formatted image; 0: none
  bool has_backing = false;      // a layered format over a backing node: a partial write
                                 // into an unallocated cluster copies the rest from it
  uint32_t min_block = 1;        // smallest aligned I/O unit
  uint32_t pref_block = 4096;    // preferred I/O unit
  uint32_t max_transfer = kMaxRequestBytes;
  bool uncached_io = false;      // ReadFlags/WriteFlags::uncached keep data out of a
                                 // host page cache the device would otherwise fill
};

// uncached (reads and writes): the caller moves this data once, a job's bulk
// copy, and will not touch it again soon. A device behind the host's page cache
// keeps it out (FileDevice: an O_DIRECT read, an RWF_DONTCACHE write), so the
// copy neither evicts what clients have cached nor leaves the large folios of
// its big requests under their small writes (each 4 KiB write into one costs
// ext4 several times more: docs/design/data-path.md). A hint: a device without
// such a cache, or a kernel without the means, ignores it.
struct ReadFlags {
  bool uncached = false;
};

struct WriteFlags {
  bool fua = false;  // durable before completion
  bool uncached = false;
};

struct ZeroFlags {
  bool may_unmap = false;    // may leave a hole (still reads as zeroes)
  bool no_fallback = false;  // fail with ENOTSUP rather than write zero buffers
  bool fua = false;
};

// One extent starting at the queried offset. allocated: storage is reserved
// (data or written zeroes) in this device or, for a layered format, anywhere in its
// backing chain; zero: reads as zeroes. A hole is !allocated && zero.
// depth: which layer of a backing chain provides the extent's contents, as NBD's
// qemu:allocation-depth counts them: 0 = no layer (reads from nowhere: zeroes),
// 1 = this device itself, 2 = its backing device, 3 = that one's backing, ...
// Devices without a backing chain report 1 (they hold every byte themselves).
// sync=top copies depth 1 only; sync=full every allocated extent.
struct Extent {
  uint64_t length = 0;
  bool allocated = true;
  bool zero = false;
  uint32_t depth = 1;
};

// Where a device's bytes lie in a regular file, for copy offload: the file's
// descriptor (valid while the device lives) and its file system (st_dev). Byte
// N of the device is byte N of the file. reflink: the file system can share
// extents (XFS, btrfs), so a kernel copy costs metadata, not data.
struct FileSpan {
  int fd = -1;
  uint64_t fs_dev = 0;
  bool reflink = false;
};

class BlockDevice {
 public:
  virtual ~BlockDevice() = default;

  // Human description for messages ("src.img", "memory").
  virtual std::string describe() const = 0;
  virtual uint64_t length() const = 0;
  virtual const BlockCaps& caps() const = 0;

  virtual Task<Result<void>> read(uint64_t offset, std::span<std::byte> buf,
                                  ReadFlags flags = {}) = 0;
  virtual Task<Result<void>> write(uint64_t offset, std::span<const std::byte> buf,
                                   WriteFlags flags = {}) = 0;
  virtual Task<Result<void>> write_zeroes(uint64_t offset, uint64_t length,
                                          ZeroFlags flags = {}) = 0;
  // Advisory: after discard the contents of the range are unspecified.
  virtual Task<Result<void>> discard(uint64_t offset, uint64_t length) = 0;
  virtual Task<Result<void>> flush() = 0;
  // The extent that starts at offset, at most length bytes long (length > 0).
  virtual Task<Result<Extent>> block_status(uint64_t offset, uint64_t length) = 0;

  // Still the disk that was opened, at the length it had: a file not renamed,
  // unlinked, replaced, truncated or grown. The mirror asks at ready and at
  // complete. Devices without a name to lose say yes.
  virtual Task<Result<void>> check_unchanged() { co_return Result<void>{}; }
  // Counts the times the device reconnected to its server (remote devices):
  // data acknowledged but not flushed before a change may be lost.
  virtual uint64_t generation() const { return 0; }
  // True for devices that can reconnect (generation() may move): a writer that
  // must not lose much on a reconnect flushes them now and then.
  virtual bool can_reconnect() const { return false; }
  // False when a remote device has no live connection: its next request will
  // reconnect first.
  virtual bool connected() const { return true; }
  // Copy offload: the regular file holding this device's bytes one to one, or
  // nothing. Only devices that add nothing to the bytes answer (a file, raw
  // over a file); wrappers that must see every I/O (fault, throttle) do not.
  virtual std::optional<FileSpan> file_span() const { return std::nullopt; }
  // Changes length() (grows or shrinks the file itself; a format driver such as
  // qcow2 grows its image file this way, since writes past length() are not
  // allowed). Devices of fixed size answer ENOTSUP.
  virtual Task<Result<void>> resize(uint64_t new_length);
  // Switches the device between read-only and read-write in place (a reopen:
  // blockdev-reopen, a commit into a read-only base): caps().read_only says the
  // new state once it returns. Going read-only writes back what the device
  // holds (metadata, then a flush). Errors change nothing. Devices that cannot
  // answer ENOTSUP (unless asked for the state they are in).
  // REQUIRES: no request in flight (the caller drained the node).
  virtual Task<Result<void>> set_read_only(bool read_only);
};

inline Task<Result<void>> BlockDevice::resize(uint64_t new_length) {
  co_return make_error(ENOTSUP, describe() + ": cannot be resized");
}

inline Task<Result<void>> BlockDevice::set_read_only(bool read_only) {
  if (read_only == caps().read_only) co_return Result<void>{};
  co_return make_error(ENOTSUP, describe() + ": cannot be reopened");
}

using BlockDevicePtr = std::shared_ptr<BlockDevice>;

}  // namespace blkmirror
