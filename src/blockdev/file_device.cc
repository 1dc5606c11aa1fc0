#include "blockdev/file_device.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <linux/magic.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include <fmt/format.h>

#include "base/align.h"
#include "io/buffer.h"

namespace blkmirror {

namespace {

// RWF_DONTCACHE from Linux 6.14's uapi; older headers (Debian 12's) lack it, and
// an older kernel answers it with EOPNOTSUPP.
constexpr int kRwfDontcache = 0x00000080;

Result<int> open_fd(const std::string& path, int flags) {
  int fd = ::open(path.c_str(), flags | O_CLOEXEC);
  if (fd < 0) return make_error(errno, path);
  return fd;
}

}  // namespace

Result<void> FileDevice::create(const std::string& path, uint64_t size) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) return make_error(errno, path);
  int rc = ::ftruncate(fd, static_cast<off_t>(size));
  int err = errno;
  ::close(fd);
  if (rc < 0) {
    ::unlink(path.c_str());
    return make_error(err, path);
  }
  return {};
}

FileDevice::FileDevice(Loop& loop, std::string path, FileOptions opts)
    : loop_(loop), path_(std::move(path)), opts_(opts) {}

Perms FileDevice::lock_perms(bool read_only, bool force_share) {
  return Perms{kPermConsistentRead | (read_only ? 0u : kPermWrite),
               force_share ? kPermAll : kPermConsistentRead | kPermWriteUnchanged};
}

FileDevice::~FileDevice() {
  if (inline_.stalls() && std::getenv("BLKMIRROR_DEBUG_URING"))
    std::fprintf(stderr, "%s: %llu in-place writes stalled\n", path_.c_str(),
                 static_cast<unsigned long long>(inline_.stalls()));
  if (fd_ >= 0) ::close(fd_);
  if (direct_fd_ >= 0) ::close(direct_fd_);
  if (uncached_read_fd_ >= 0) ::close(uncached_read_fd_);
}

Result<std::shared_ptr<FileDevice>> FileDevice::open(Loop& loop, const std::string& path,
                                                     FileOptions opts) {
  int flags = opts.read_only ? O_RDONLY : O_RDWR;
  // O_NONBLOCK: opening a FIFO would otherwise wait for a writer forever (and
  // freeze the daemon); we look at what was opened before any I/O.
  auto fd = open_fd(path, flags | O_NONBLOCK);
  if (!fd) return make_error(fd.error());
  struct stat st {};
  if (::fstat(*fd, &st) < 0) {
    int err = errno;
    ::close(*fd);
    return make_error(err, path);
  }
  if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
    ::close(*fd);
    if (S_ISDIR(st.st_mode)) return make_error(EISDIR, path);
    return make_plain_error(EINVAL, path + ": not a regular file or block device");
  }
  ::fcntl(*fd, F_SETFL, ::fcntl(*fd, F_GETFL) & ~O_NONBLOCK);
  if (auto l = lock_image(*fd, path, lock_perms(opts.read_only, opts.force_share), opts.locking);
      !l) {
    ::close(*fd);  // drops whatever locks were taken
    return make_error(l.error());
  }
  std::shared_ptr<FileDevice> dev(new FileDevice(loop, path, opts));
  dev->fd_ = *fd;
  dev->dev_ = st.st_dev;
  dev->ino_ = st.st_ino;
  dev->is_blk_ = S_ISBLK(st.st_mode);
  BlockCaps& c = dev->caps_;
  c.read_only = opts.read_only;
  c.can_zero = true;
  if (dev->is_blk_) {
    uint64_t size = 0;
    if (::ioctl(*fd, BLKGETSIZE64, &size) < 0) return make_error(errno, path + ": BLKGETSIZE64");
    dev->length_ = size;
    dev->ino_ = st.st_rdev;  // the device itself, whatever node names it
    c.can_trim = true;
    c.has_block_status = false;
    int lbs = 512;
    ::ioctl(*fd, BLKSSZGET, &lbs);
    c.min_block = static_cast<uint32_t>(std::max(lbs, 1));
  } else {
    dev->length_ = static_cast<uint64_t>(st.st_size);
    c.can_zero_unmap = true;
    c.can_trim = true;
    c.has_block_status = true;
  }
  c.pref_block = static_cast<uint32_t>(std::max<long>(st.st_blksize, 512));
  struct statfs fs {};
  const bool have_fs = !dev->is_blk_ && ::fstatfs(*fd, &fs) == 0;
  if (have_fs) dev->reflink_ = fs.f_type == XFS_SUPER_MAGIC || fs.f_type == BTRFS_SUPER_MAGIC;
  // tmpfs is its page cache: there is nothing to keep out of it.
  const bool in_memory = have_fs && fs.f_type == TMPFS_MAGIC;
  if (!opts.direct && !in_memory) {
    // A file system without O_DIRECT (EINVAL) just has no uncached reads.
    auto ufd = open_fd(path, O_RDONLY | O_DIRECT | O_NONBLOCK);
    struct stat ust {};
    if (ufd && ::fstat(*ufd, &ust) == 0 && ust.st_dev == st.st_dev && ust.st_ino == st.st_ino) {
      ::fcntl(*ufd, F_SETFL, ::fcntl(*ufd, F_GETFL) & ~O_NONBLOCK);
      dev->uncached_read_fd_ = *ufd;
    } else if (ufd) {
      ::close(*ufd);
    }
    dev->dontcache_ = true;
  }
  c.uncached_io = dev->uncached_read_fd_ >= 0;
  if (opts.direct) {
    auto dfd = open_fd(path, flags | O_DIRECT | O_NONBLOCK);
    if (!dfd) return with_context(dfd.error(), "cache.direct");
    dev->direct_fd_ = *dfd;
    // The path is opened twice: both must be the same file.
    struct stat dst {};
    if (::fstat(*dfd, &dst) < 0 || dst.st_dev != st.st_dev || dst.st_ino != st.st_ino)
      return make_plain_error(EAGAIN, path + ": the file was replaced while being opened");
    ::fcntl(*dfd, F_SETFL, ::fcntl(*dfd, F_GETFL) & ~O_NONBLOCK);
  }
  return dev;
}

std::optional<FileSpan> FileDevice::file_span() const {
  if (is_blk_) return std::nullopt;  // copy_file_range takes regular files only
  return FileSpan{fd_, dev_, reflink_};
}

Task<Result<void>> copy_file_range_all(Loop& loop, FileSpan src, FileSpan dst, uint64_t off,
                                       uint64_t len) {
  int in = src.fd, out = dst.fd;
  int err = co_await loop.blocking([in, out, off, len]() -> int {
    uint64_t done = 0;
    while (done < len) {
      loff_t io = static_cast<loff_t>(off + done), oo = io;
      ssize_t n = ::copy_file_range(in, &io, out, &oo, len - done, 0);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return errno;
      if (n == 0) return EIO;  // the source shrank under us
      done += static_cast<uint64_t>(n);
    }
    return 0;
  });
  if (err) co_return make_error(err, fmt::format("copy_file_range at offset {}", off));
  co_return Result<void>{};
}

tl::unexpected<Error> FileDevice::io_error(const char* what, uint64_t off, int errnum) const {
  return make_error(errnum, fmt::format("{} {} at offset {}", what, path_, off));
}

tl::unexpected<Error> FileDevice::shrank_error(uint64_t off) const {
  struct stat st {};
  if (is_blk_ || ::fstat(fd_, &st) < 0) return io_error("read", off, EIO);
  return make_plain_error(
      EIO, fmt::format("read {} at offset {}: {} shrank from {} to {} bytes while in use", path_,
                       off, path_, length_, st.st_size));
}

Task<Result<void>> FileDevice::check_unchanged() {
  struct Seen {
    int fd_err = 0, path_err = 0;
    uint64_t size = 0, dev = 0, ino = 0;
  };
  // stat can block on a network file system: off the loop. Capture plain
  // values and a pointer (the device outlives the call), not the string.
  const std::string* path = &path_;
  int fd = fd_;
  bool blk = is_blk_;
  Seen seen = co_await loop_.blocking([path, fd, blk]() {
    Seen r;
    struct stat st {};
    if (::fstat(fd, &st) < 0) r.fd_err = errno;
    r.size = static_cast<uint64_t>(st.st_size);
    if (blk && ::ioctl(fd, BLKGETSIZE64, &r.size) < 0) r.fd_err = errno;
    struct stat ps {};
    if (::stat(path->c_str(), &ps) < 0) r.path_err = errno;
    r.dev = ps.st_dev;
    r.ino = blk ? ps.st_rdev : ps.st_ino;
    return r;
  });
  if (seen.fd_err) co_return make_error(seen.fd_err, path_);
  if (seen.path_err == ENOENT)
    co_return make_plain_error(
        ESTALE, fmt::format("{} was removed (unlinked or renamed) while in use", path_));
  if (seen.path_err) co_return make_error(seen.path_err, path_);
  if ((!is_blk_ && seen.dev != dev_) || seen.ino != ino_)
    co_return make_plain_error(
        ESTALE,
        fmt::format("{} now names a different file (renamed or replaced while in use)", path_));
  if (seen.size != length_)
    co_return make_plain_error(
        EIO, fmt::format("{} {} from {} to {} bytes while in use", path_,
                         seen.size < length_ ? "shrank" : "grew", length_, seen.size));
  co_return Result<void>{};
}

int FileDevice::fd_for(uint64_t off, const void* buf, uint64_t len) const {
  if (direct_fd_ >= 0 && is_aligned(off, 4096) && is_aligned(len, 4096) &&
      is_aligned(reinterpret_cast<uintptr_t>(buf), 4096))
    return direct_fd_;
  return fd_;
}

int FileDevice::read_fd(uint64_t off, std::span<std::byte> buf, ReadFlags f) const {
  if (f.uncached && uncached_read_fd_ >= 0 && buf.size() >= kUncachedMin &&
      is_aligned(off, 4096) && is_aligned(buf.size(), 4096) &&
      is_aligned(reinterpret_cast<uintptr_t>(buf.data()), 4096))
    return uncached_read_fd_;
  return fd_for(off, buf.data(), buf.size());
}

// Loops until the whole request is done: a short read or write is continued.
Task<Result<void>> FileDevice::read(uint64_t off, std::span<std::byte> buf, ReadFlags f) {
  int fd = read_fd(off, buf, f);
  // Uncached but not through O_DIRECT (small or unaligned): a buffered read
  // whose new pages, readahead's included, leave the cache after the copy.
  int rwf = f.uncached && fd == fd_ && dontcache_ ? kRwfDontcache : 0;
  size_t done = 0;
  while (done < buf.size()) {
    int n = co_await loop_.uring().read(fd, buf.data() + done, buf.size() - done, off + done,
                                        rwf);
    if (n == -EOPNOTSUPP && rwf) {  // a kernel or file system without it
      dontcache_ = false;
      rwf = 0;
      continue;
    }
    if (n == -EINTR || n == -EAGAIN) continue;
    if (n < 0) co_return io_error("read", off, -n);
    if (n == 0) co_return shrank_error(off + done);  // end of file inside the disk
    done += static_cast<size_t>(n);
  }
  co_return Result<void>{};
}

Task<Result<void>> FileDevice::write(uint64_t off, std::span<const std::byte> buf, WriteFlags f) {
  if (caps_.read_only) co_return io_error("write", off, EROFS);
  int fd = fd_for(off, buf.data(), buf.size());
  size_t done = 0;
  // Small buffered writes go in place (io/inline_write.h); an O_DIRECT write
  // waits for the device, so it never does.
  int rwf = f.uncached && dontcache_ && fd != direct_fd_ && buf.size() >= kUncachedMin
                ? kRwfDontcache
                : 0;
  bool in_place = fd != direct_fd_ && !rwf &&
                  inline_.allowed(buf.size(), InlineWrites::Clock::now());
  while (done < buf.size()) {
    int n;  // if/else, not ?: (GCC 12 rule 1, base/task.h)
    if (in_place)
      n = inline_.write(fd, buf.data() + done, buf.size() - done, off + done);
    else
      n = co_await loop_.uring().write(fd, buf.data() + done, buf.size() - done, off + done,
                                       rwf);
    if (n == -EOPNOTSUPP && rwf) {  // a kernel or file system without it
      dontcache_ = false;
      rwf = 0;
      continue;
    }
    if (n == -EINTR || n == -EAGAIN) continue;
    if (n < 0) co_return io_error("write", off, -n);
    if (n == 0) co_return io_error("write", off, EIO);
    done += static_cast<size_t>(n);
  }
  if (f.fua) co_return co_await flush();
  co_return Result<void>{};
}

Task<Result<void>> FileDevice::write_zero_buffers(uint64_t off, uint64_t len) {
  constexpr uint64_t kChunk = 1 << 20;
  AlignedBuffer zeroes(std::min(len, kChunk));
  std::memset(zeroes.data(), 0, zeroes.size());
  for (uint64_t pos = off; pos < off + len;) {
    uint64_t n = std::min<uint64_t>(zeroes.size(), off + len - pos);
    if (auto r = co_await write(pos, {zeroes.data(), n}, {}); !r) co_return r;
    pos += n;
  }
  co_return Result<void>{};
}

Task<Result<void>> FileDevice::write_zeroes(uint64_t off, uint64_t len, ZeroFlags f) {
  if (caps_.read_only) co_return io_error("write zeroes", off, EROFS);
  if (len == 0) co_return Result<void>{};
  data_cache_end_ = data_cache_start_;  // this range may turn into a hole
  int fd = fd_;
  bool blk = is_blk_, unmap = f.may_unmap;
  // A zero range that runs to the end of a file ends in a partial block; punch
  // the whole block (KEEP_SIZE keeps the length) so it becomes a hole too.
  uint64_t punch_len = !blk && off + len == length_ ? align_up(off + len, 4096) - off : len;
  int err = 0;  // 0, or the errno of the last method tried
  if (blk) {
    err = co_await loop_.blocking([fd, off, len]() -> int {
      if (!is_aligned(off, 512) || !is_aligned(len, 512)) return EOPNOTSUPP;
      uint64_t range[2] = {off, len};
      return ::ioctl(fd, BLKZEROOUT, range) == 0 ? 0 : errno;
    });
  } else {
    int rc = -EOPNOTSUPP;
    if (unmap)
      rc = co_await loop_.uring().fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off,
                                            punch_len);
    if (rc < 0)
      rc = co_await loop_.uring().fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, off,
                                            len);
    err = -rc;
  }
  if (err == 0) {
    if (f.fua) co_return co_await flush();
    co_return Result<void>{};
  }
  if (err != EOPNOTSUPP && err != ENOTTY && err != EINVAL)
    co_return io_error("write zeroes", off, err);
  if (f.no_fallback) co_return io_error("write zeroes", off, ENOTSUP);
  auto r = co_await write_zero_buffers(off, len);
  if (r && f.fua) co_return co_await flush();
  co_return r;
}

Task<Result<void>> FileDevice::discard(uint64_t off, uint64_t len) {
  if (caps_.read_only) co_return io_error("discard", off, EROFS);
  if (len == 0) co_return Result<void>{};
  data_cache_end_ = data_cache_start_;
  int fd = fd_;
  bool blk = is_blk_;
  int err;
  if (blk) {
    err = co_await loop_.blocking([fd, off, len]() -> int {
      uint64_t range[2] = {off, len};
      return ::ioctl(fd, BLKDISCARD, range) == 0 ? 0 : errno;
    });
  } else {
    err = -co_await loop_.uring().fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off,
                                            len);
  }
  // Discard is advisory: a device that cannot do it has done nothing, correctly.
  if (err && err != EOPNOTSUPP && err != ENOTTY && err != EINVAL)
    co_return io_error("discard", off, err);
  co_return Result<void>{};
}

Task<Result<void>> FileDevice::flush() {
  int rc = co_await loop_.uring().fdatasync(fd_);
  if (rc < 0) co_return io_error("flush", 0, -rc);
  co_return Result<void>{};
}

Task<Result<Extent>> FileDevice::block_status(uint64_t off, uint64_t len) {
  if (len == 0 || !range_within(off, len, length_))
    co_return make_error(EINVAL,
                         fmt::format("block status {} at {}+{}: out of range", path_, off, len));
  if (!caps_.has_block_status) co_return Extent{len, true, false};
  if (off >= data_cache_start_ && off < data_cache_end_)
    co_return Extent{std::min(len, data_cache_end_ - off), true, false};
  int fd = fd_;
  uint64_t size = length_;
  struct Answer {
    int err = 0;
    bool data = true;
    uint64_t end = 0;  // end of the extent that starts at off
  };
  Answer a = co_await loop_.blocking([fd, off, size]() -> Answer {
    Answer ans;
    off_t d = ::lseek(fd, static_cast<off_t>(off), SEEK_DATA);
    if (d < 0) {
      if (errno == ENXIO) return Answer{0, false, size};  // a hole to the end
      if (errno == EINVAL || errno == EOPNOTSUPP) return Answer{0, true, size};
      return Answer{errno, true, 0};
    }
    if (static_cast<uint64_t>(d) > off) return Answer{0, false, std::min<uint64_t>(d, size)};
    off_t h = ::lseek(fd, static_cast<off_t>(off), SEEK_HOLE);
    if (h < 0) return Answer{errno, true, 0};
    ans.end = std::min<uint64_t>(static_cast<uint64_t>(h), size);
    return ans;
  });
  if (a.err) co_return io_error("block status", off, a.err);
  if (a.end <= off) a.end = size;  // the file grew or shrank under us: call it data
  if (a.data) {
    data_cache_start_ = off;
    data_cache_end_ = a.end;
  }
  co_return Extent{std::min(len, a.end - off), a.data, !a.data};
}

Task<Result<void>> FileDevice::resize(uint64_t new_length) {
  if (caps_.read_only) co_return io_error("resize", new_length, EROFS);
  if (is_blk_) co_return io_error("resize", new_length, ENOTSUP);
  int fd = fd_;
  int err = co_await loop_.blocking([fd, new_length]() -> int {
    return ::ftruncate(fd, static_cast<off_t>(new_length)) == 0 ? 0 : errno;
  });
  if (err) co_return io_error("resize", new_length, err);
  length_ = new_length;
  data_cache_end_ = data_cache_start_;
  co_return Result<void>{};
}

Task<Result<void>> FileDevice::set_read_only(bool ro) {
  if (ro == caps_.read_only) co_return Result<void>{};
  if (!ro && opts_.force_share)
    co_return make_plain_error(EINVAL, "force-share=on can only be used with read-only images");
  if (ro) {
    if (auto r = co_await flush(); !r) co_return r;
  }
  // New descriptors first: until the swap at the end, the old ones stay as they
  // were, so any failure below leaves the device unchanged.
  const int flags = ro ? O_RDONLY : O_RDWR;
  auto fd = open_fd(path_, flags);
  if (!fd) co_return make_error(fd.error());
  int new_direct = -1;
  auto drop_new = [&] {
    ::close(*fd);
    if (new_direct >= 0) ::close(new_direct);
  };
  struct stat st {};
  const bool same = ::fstat(*fd, &st) == 0 && (is_blk_ || st.st_dev == dev_) &&
                    (is_blk_ ? st.st_rdev : st.st_ino) == ino_;
  if (!same) {
    drop_new();
    co_return make_plain_error(
        ESTALE, fmt::format("{} now names a different file (renamed or replaced while in use)",
                            path_));
  }
  if (direct_fd_ >= 0) {
    auto dfd = open_fd(path_, flags | O_DIRECT);
    if (!dfd) {
      drop_new();
      co_return with_context(dfd.error(), "cache.direct");
    }
    new_direct = *dfd;
  }
  // The locks change on the old descriptor (our own locks never conflict with
  // themselves), then the new one takes the same set before the old one closes.
  const Perms from = lock_perms(caps_.read_only, opts_.force_share);
  const Perms to = lock_perms(ro, opts_.force_share);
  if (auto l = relock_image(fd_, path_, from, to, opts_.locking); !l) {
    drop_new();
    co_return make_error(l.error());
  }
  if (auto l = copy_image_locks(*fd, path_, to, opts_.locking); !l) {
    drop_new();
    (void)relock_image(fd_, path_, to, from, opts_.locking);
    co_return make_error(l.error());
  }
  ::close(fd_);
  if (direct_fd_ >= 0) ::close(direct_fd_);
  fd_ = *fd;
  direct_fd_ = new_direct;
  caps_.read_only = ro;
  opts_.read_only = ro;
  co_return Result<void>{};
}

}  // namespace blkmirror
