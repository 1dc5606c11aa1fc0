// FileDevice: a regular file or a block device. Reads, writes, fdatasync and
// fallocate go through the loop's io_uring (io/uring.h), except small buffered
// writes, which run in place on the loop thread (io/inline_write.h: io_uring
// would hand each to a worker thread, costing more than the write); the calls io_uring
// cannot do (lseek SEEK_DATA/SEEK_HOLE, ioctl) run on the Loop's worker pool
// and resume on the loop.
//
// Holes: regular files report holes via SEEK_DATA/SEEK_HOLE and make them with
// FALLOC_FL_PUNCH_HOLE; block devices use BLKZEROOUT / BLKDISCARD and report
// everything as data.
// cache.direct: with `direct`, aligned requests use an O_DIRECT descriptor; a
// request not aligned to 4 KiB (offset, length and buffer) goes through a second,
// buffered descriptor, so the unaligned tail of a file still works.
// Uncached requests (ReadFlags/WriteFlags::uncached, a job's bulk copy) stay
// out of the page cache. A read of at least kUncachedMin bytes, aligned, goes
// through a third, read-only O_DIRECT descriptor; a smaller one is buffered with
// RWF_DONTCACHE (Linux 6.14+): the page a client just wrote is cheaper to copy
// from the cache than to write back and read from disk, and the pages it (or
// readahead) brings in leave again. A write of at least kUncachedMin bytes uses
// RWF_DONTCACHE; a smaller one is ordinary (it makes only small folios). Where
// RWF_DONTCACHE is refused (older kernels, tmpfs), requests are plain.
//
// Threading rule: loop thread only. Buffers must outlive the awaited call.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include <asio.hpp>

#include "blockdev/block_device.h"
#include "blockdev/image_lock.h"
#include "io/inline_write.h"
#include "io/loop.h"

namespace blkmirror {

struct FileOptions {
  bool read_only = false;
  bool direct = false;
  // Image locks (image_lock.h): a writable open takes write and shares it with
  // nobody; a read-only one forbids other writers too (it wants a consistent
  // image) unless force_share, QEMU's force-share=on.
  LockMode locking = LockMode::kAuto;
  bool force_share = false;
};

// Copies [off, off+len) of src's file to the same range of dst's file in the
// kernel (copy_file_range: extents shared on XFS/btrfs with reflink, an in-kernel
// copy elsewhere), on the loop's worker pool. Exact: holes in the source range
// stay holes only where the file system shares extents; callers copy data
// extents. Fails with EXDEV, EOPNOTSUPP, ENOSYS or EINVAL (errnum) when the
// kernel cannot do it for this pair: the caller then reads and writes.
// REQUIRES: the range lies within both files; both descriptors outlive the call.
Task<Result<void>> copy_file_range_all(Loop& loop, FileSpan src, FileSpan dst, uint64_t off,
                                       uint64_t len);

class FileDevice : public BlockDevice {
 public:
  // Opens path: a regular file or a block device, never anything else (a FIFO
  // is refused without waiting for a writer). Errors read "PATH: reason"
  // (ENOENT, EACCES, EISDIR...); a lock conflict reads as QEMU's.
  static Result<std::shared_ptr<FileDevice>> open(Loop& loop, const std::string& path,
                                                  FileOptions opts = {});
  // Creates a new sparse file of `size` bytes; fails with EEXIST if path exists.
  static Result<void> create(const std::string& path, uint64_t size);

  ~FileDevice() override;

  std::string describe() const override { return path_; }
  uint64_t length() const override { return length_; }
  const BlockCaps& caps() const override { return caps_; }
  bool is_block_device() const { return is_blk_; }
  // Device and inode, to refuse mirroring a file into itself.
  std::pair<uint64_t, uint64_t> identity() const { return {dev_, ino_}; }
  // Declares the file known to read as zeroes (freshly created by us).
  void set_zero_init(bool z) { caps_.zero_init = z; }

  // Uncached requests below this size are ordinary ones.
  static constexpr size_t kUncachedMin = 64 << 10;

  Task<Result<void>> read(uint64_t off, std::span<std::byte> buf, ReadFlags f = {}) override;
  Task<Result<void>> write(uint64_t off, std::span<const std::byte> buf, WriteFlags f) override;
  Task<Result<void>> write_zeroes(uint64_t off, uint64_t len, ZeroFlags f) override;
  Task<Result<void>> discard(uint64_t off, uint64_t len) override;
  Task<Result<void>> flush() override;
  Task<Result<Extent>> block_status(uint64_t off, uint64_t len) override;
  // The path still names the file opened, and its size did not change.
  Task<Result<void>> check_unchanged() override;
  std::optional<FileSpan> file_span() const override;
  // ftruncate on the worker pool (regular files only; block devices: ENOTSUP).
  Task<Result<void>> resize(uint64_t new_length) override;
  // Reopens the file O_RDONLY or O_RDWR (a new descriptor, and a new O_DIRECT
  // one with cache.direct) and moves the image locks to the new mode, so
  // qemu-img sees the change: going read-write fails, changing nothing, while
  // another process holds the image read-only or writes it (QEMU's lock texts);
  // going read-only flushes first. A path that now names another file is
  // refused (ESTALE).
  Task<Result<void>> set_read_only(bool ro) override;

 private:
  FileDevice(Loop& loop, std::string path, FileOptions opts);
  // The image locks an open in this mode holds (docs/design/permissions.md).
  static Perms lock_perms(bool read_only, bool force_share);
  int fd_for(uint64_t off, const void* buf, uint64_t len) const;
  // The descriptor for a read: fd_for's, or the uncached one for a large aligned
  // uncached read.
  int read_fd(uint64_t off, std::span<std::byte> buf, ReadFlags f) const;
  Task<Result<void>> write_zero_buffers(uint64_t off, uint64_t len);
  tl::unexpected<Error> io_error(const char* what, uint64_t off, int errnum) const;
  // A read that hit end-of-file: the file shrank, say from what to what.
  tl::unexpected<Error> shrank_error(uint64_t off) const;

  Loop& loop_;
  std::string path_;
  FileOptions opts_;  // as opened; read_only follows caps_.read_only
  uint64_t length_ = 0;
  BlockCaps caps_;
  bool is_blk_ = false;
  uint64_t dev_ = 0, ino_ = 0;
  bool reflink_ = false;  // on a file system that shares extents (file_span())
  int fd_ = -1;
  int direct_fd_ = -1;  // O_DIRECT, when enabled
  int uncached_read_fd_ = -1;  // read-only O_DIRECT for uncached reads; -1: none
  bool dontcache_ = false;     // RWF_DONTCACHE works here (until an EOPNOTSUPP)
  InlineWrites inline_;
  // Last "data" extent seen. Stale data answers are safe (copying zeroes as data
  // is still a correct copy), so only zeroing and discards through us drop it.
  uint64_t data_cache_start_ = 0, data_cache_end_ = 0;
};

}  // namespace blkmirror
