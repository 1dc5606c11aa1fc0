#include "blockdev/rbd/rbd_device.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>

#include "blockdev/rbd/rbd_aio.h"

namespace blkmirror {

RbdDevice::RbdDevice(Loop& loop, RbdSpec spec, std::unique_ptr<RbdImage> image,
                     const RbdOptions& opts)
    : loop_(loop), spec_(std::move(spec)), image_(std::move(image)), where_(spec_.describe()) {
  const RbdInfo& info = image_->info();
  length_ = info.size;
  caps_.read_only = opts.read_only || spec_.snapshot.has_value();
  caps_.zero_init = opts.fresh;
  caps_.can_zero = !caps_.read_only;
  caps_.can_zero_unmap = !caps_.read_only;
  caps_.can_trim = !caps_.read_only;
  caps_.can_fua = false;
  caps_.has_block_status = true;
  caps_.cluster_size = info.object_size;
  caps_.min_block = 1;
  caps_.pref_block = 4096;
}

Task<Result<std::shared_ptr<RbdDevice>>> RbdDevice::open(Loop& loop, const RbdSpec& spec,
                                                         const RbdOptions& opts) {
  auto image = co_await RbdImage::open(loop, spec, opts.read_only);
  if (!image) co_return make_error(image.error());
  co_return std::shared_ptr<RbdDevice>(new RbdDevice(loop, spec, std::move(*image), opts));
}

Task<Result<BlockDevicePtr>> open_rbd(Loop& loop, const RbdSpec& spec, const RbdOptions& opts) {
  auto dev = co_await RbdDevice::open(loop, spec, opts);
  if (!dev) co_return make_error(dev.error());
  co_return BlockDevicePtr(*dev);
}

tl::unexpected<Error> RbdDevice::fail(const char* what, uint64_t off, ssize_t r) const {
  int err = r < 0 ? static_cast<int>(-r) : EIO;
  return make_error(err, fmt::format("{}: {} at {}", where_, what, off));
}

Task<Result<void>> RbdDevice::read(uint64_t off, std::span<std::byte> buf, ReadFlags) {
  rbd_image_t img = image_->handle();
  char* p = reinterpret_cast<char*>(buf.data());
  size_t n = buf.size();
  auto issue = [img, off, n, p](rbd_completion_t c) { return rbd_aio_read(img, off, n, p, c); };
  ssize_t r = co_await rbd_aio(issue);
  if (r < 0) co_return fail("read", off, r);
  // librbd reads past the end of a shrunk image as short: the rest is zeroes.
  if (static_cast<size_t>(r) < n) std::memset(p + r, 0, n - r);
  co_return Result<void>{};
}

Task<Result<void>> RbdDevice::write(uint64_t off, std::span<const std::byte> buf, WriteFlags f) {
  if (caps_.read_only) co_return make_error(EROFS, fmt::format("{}: write at {}", where_, off));
  rbd_image_t img = image_->handle();
  const char* p = reinterpret_cast<const char*>(buf.data());
  size_t n = buf.size();
  auto issue = [img, off, n, p](rbd_completion_t c) { return rbd_aio_write(img, off, n, p, c); };
  ssize_t r = co_await rbd_aio(issue);
  if (r < 0) co_return fail("write", off, r);
  if (f.fua) co_return co_await flush();
  co_return Result<void>{};
}

Task<Result<void>> RbdDevice::write_zeroes(uint64_t off, uint64_t len, ZeroFlags f) {
  if (caps_.read_only)
    co_return make_error(EROFS, fmt::format("{}: write zeroes at {}", where_, off));
  rbd_image_t img = image_->handle();
  int zflags = f.may_unmap ? 0 : RBD_WRITE_ZEROES_FLAG_THICK_PROVISION;
  auto issue = [img, off, len, zflags](rbd_completion_t c) {
    return rbd_aio_write_zeroes(img, off, len, c, zflags, 0);
  };
  ssize_t r = co_await rbd_aio(issue);
  if (r < 0) co_return fail("write zeroes", off, r);
  if (f.fua) co_return co_await flush();
  co_return Result<void>{};
}

Task<Result<void>> RbdDevice::discard(uint64_t off, uint64_t len) {
  if (caps_.read_only) co_return make_error(EROFS, fmt::format("{}: discard at {}", where_, off));
  rbd_image_t img = image_->handle();
  auto issue = [img, off, len](rbd_completion_t c) { return rbd_aio_discard(img, off, len, c); };
  ssize_t r = co_await rbd_aio(issue);
  if (r < 0) co_return fail("discard", off, r);
  co_return Result<void>{};
}

Task<Result<void>> RbdDevice::flush() {
  rbd_image_t img = image_->handle();
  auto issue = [img](rbd_completion_t c) { return rbd_aio_flush(img, c); };
  ssize_t r = co_await rbd_aio(issue);
  if (r < 0) co_return make_error(static_cast<int>(-r), where_ + ": flush");
  co_return Result<void>{};
}

namespace {

// The first extent of [off, off+len) as rbd_diff_iterate2 reports allocation:
// reported ranges are data, the gaps between them holes. Stops the iteration
// as soon as the extent at off is known.
struct FirstExtent {
  uint64_t off = 0, end = 0;
  uint64_t data_end = 0;   // end of the data run starting at off (when data)
  bool found = false;      // off lies in a reported range
  uint64_t next_data = 0;  // start of the first reported range after off (hole case)
  bool done = false;

  static int cb(uint64_t o, size_t l, int exists, void* arg) {
    auto* s = static_cast<FirstExtent*>(arg);
    uint64_t e = o + l;
    if (!exists || e <= s->off) return 0;
    if (!s->found) {
      if (o <= s->off) {
        s->found = true;
        s->data_end = e;
        return 0;
      }
      s->next_data = o;
      s->done = true;
      return -ECANCELED;
    }
    if (o <= s->data_end) {
      s->data_end = std::max(s->data_end, e);
      return 0;
    }
    s->done = true;
    return -ECANCELED;
  }
};

// Bounds one block-status query: a walk without fast-diff asks the OSDs about
// every object in the range.
constexpr uint64_t kMaxStatusBytes = 1ull << 30;

}  // namespace

Task<Result<Extent>> RbdDevice::block_status(uint64_t off, uint64_t len) {
  len = std::min(len, kMaxStatusBytes);
  rbd_image_t img = image_->handle();
  bool whole = image_->info().fast_diff;
  auto walked = co_await loop_.blocking([img, off, len, whole]() -> Result<Extent> {
    FirstExtent s;
    s.off = off;
    s.end = off + len;
    int r = rbd_diff_iterate2(img, nullptr, off, len, 1, whole ? 1 : 0, &FirstExtent::cb, &s);
    if (r < 0 && !(r == -ECANCELED && s.done)) return make_error(-r, "rbd_diff_iterate2");
    Extent e;
    if (s.found) {
      e.length = std::min(s.data_end, s.end) - off;
      e.allocated = true;
      e.zero = false;
    } else {
      e.length = (s.done ? std::min(s.next_data, s.end) : s.end) - off;
      e.allocated = false;
      e.zero = true;
    }
    return e;
  });
  if (!walked)
    co_return with_context(walked.error(), fmt::format("{}: block status at {}", where_, off));
  co_return *walked;
}

Task<Result<void>> RbdDevice::resize(uint64_t new_length) {
  if (caps_.read_only) co_return make_error(EROFS, where_ + ": resize");
  RbdImage* image = image_.get();
  auto r = co_await loop_.blocking([image, new_length]() -> Result<void> {
    int rc = rbd_resize(image->handle(), new_length);
    if (rc < 0) return make_error(-rc, "rbd_resize");
    return image->refresh();
  });
  if (!r) co_return with_context(r.error(), where_);
  length_ = image_->info().size;
  co_return Result<void>{};
}

}  // namespace blkmirror
