// RbdDevice: a BlockDevice on a Ceph RBD image (rbd_image.h opens it), through
// librbd's asynchronous API: every request is one rbd_aio_* call awaited with
// rbd_aio() (rbd_aio.h), so the loop never waits on the cluster.
//
// Mapping: read/write -> rbd_aio_read/write (FUA: the write, then a flush; librbd
// has no FUA); write_zeroes -> rbd_aio_write_zeroes (may_unmap: whole objects are
// removed, partial ones zeroed; otherwise THICK_PROVISION keeps them allocated);
// discard -> rbd_aio_discard; flush -> rbd_aio_flush; block_status ->
// rbd_diff_iterate2 on the worker pool (it is blocking), whole-object granularity
// when fast-diff's object map is valid (it answers from the map without asking
// the OSDs). resize -> rbd_resize on the worker pool.
//
// Caps: object size as the cluster size; zero_init only for an image this
// process just created (opts.fresh). A cluster that stops answering (an OSD
// down) makes requests wait, not fail: librbd retries them until it returns.
//
// Threading rule: loop thread only. Buffers must outlive the awaited call.
#pragma once

#include <memory>
#include <string>

#include "blockdev/block_device.h"
#include "blockdev/rbd/rbd_image.h"
#include "blockdev/rbd/rbd_spec.h"
#include "io/loop.h"

namespace blkmirror {

struct RbdOptions {
  bool read_only = false;
  bool fresh = false;  // just created: reads as zeroes (caps().zero_init)
};

class RbdDevice : public BlockDevice {
 public:
  // REQUIRES: spec and opts outlive the co_await (GCC 12 rule 2, base/task.h).
  static Task<Result<std::shared_ptr<RbdDevice>>> open(Loop& loop, const RbdSpec& spec,
                                                       const RbdOptions& opts);

  std::string describe() const override { return where_; }
  uint64_t length() const override { return length_; }
  const BlockCaps& caps() const override { return caps_; }

  Task<Result<void>> read(uint64_t off, std::span<std::byte> buf, ReadFlags f = {}) override;
  Task<Result<void>> write(uint64_t off, std::span<const std::byte> buf, WriteFlags f) override;
  Task<Result<void>> write_zeroes(uint64_t off, uint64_t len, ZeroFlags f) override;
  Task<Result<void>> discard(uint64_t off, uint64_t len) override;
  Task<Result<void>> flush() override;
  Task<Result<Extent>> block_status(uint64_t off, uint64_t len) override;
  Task<Result<void>> resize(uint64_t new_length) override;

  // The creator of a fresh image says it reads as zeroes (caps().zero_init).
  void set_zero_init(bool z) { caps_.zero_init = z; }
  const RbdSpec& spec() const { return spec_; }
  const RbdInfo& info() const { return image_->info(); }

 private:
  RbdDevice(Loop& loop, RbdSpec spec, std::unique_ptr<RbdImage> image, const RbdOptions& opts);
  tl::unexpected<Error> fail(const char* what, uint64_t off, ssize_t r) const;

  Loop& loop_;
  RbdSpec spec_;
  std::unique_ptr<RbdImage> image_;
  std::string where_;
  uint64_t length_ = 0;
  BlockCaps caps_;
};

// The factory the CLI and QMP use: an RbdDevice as a plain BlockDevicePtr.
Task<Result<BlockDevicePtr>> open_rbd(Loop& loop, const RbdSpec& spec, const RbdOptions& opts);

}  // namespace blkmirror
