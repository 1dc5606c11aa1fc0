// RawDevice: QEMU's `raw` format node: the bytes of another node, unchanged.
// It reaches its file node through a Child edge, so the file node counts as in
// use (blockdev-del refuses it) and I/O through it honours the file node's
// drains. The edge is owned by whoever made the node (the daemon), which
// destroys it before the Graph.
//
// Threading rule: loop thread only.
#pragma once

#include "blockdev/graph.h"

namespace blkmirror {

class RawDevice : public BlockDevice {
 public:
  RawDevice(Child* file, bool read_only) : file_(file), caps_(file->caps()) {
    caps_.read_only = caps_.read_only || read_only;
    caps_.zero_init = false;  // only the creator of an image may promise that
  }
  std::string describe() const override { return "raw:" + file_->node().device().describe(); }
  uint64_t length() const override { return file_->length(); }
  const BlockCaps& caps() const override { return caps_; }

  Task<Result<void>> read(uint64_t off, std::span<std::byte> buf, ReadFlags f) override {
    return file_->read(off, buf, f);
  }
  Task<Result<void>> write(uint64_t off, std::span<const std::byte> buf, WriteFlags f) override {
    return file_->write(off, buf, f);
  }
  Task<Result<void>> write_zeroes(uint64_t off, uint64_t len, ZeroFlags f) override {
    return file_->write_zeroes(off, len, f);
  }
  Task<Result<void>> discard(uint64_t off, uint64_t len) override {
    return file_->discard(off, len);
  }
  Task<Result<void>> flush() override { return file_->flush(); }
  Task<Result<Extent>> block_status(uint64_t off, uint64_t len) override {
    return file_->block_status(off, len);
  }
  Task<Result<void>> resize(uint64_t new_length) override {
    if (caps_.read_only) return read_only_resize();
    return file_->resize(new_length);
  }
  Task<Result<void>> check_unchanged() override { return file_->node().device().check_unchanged(); }
  uint64_t generation() const override { return file_->node().device().generation(); }
  bool connected() const override { return file_->node().device().connected(); }
  bool can_reconnect() const override { return file_->node().device().can_reconnect(); }
  // Raw's data is its file's: read-write only over a read-write file (the
  // caller reopens the file node first, and after this one going read-only).
  Task<Result<void>> set_read_only(bool ro) override {
    if (!ro && file_->caps().read_only)
      co_return make_error(EROFS, describe() + ": its file node is read-only");
    if (ro) {
      if (auto r = co_await file_->flush(); !r) co_return r;
    }
    caps_.read_only = ro;
    co_return Result<void>{};
  }
  // Raw adds nothing to the bytes: a kernel copy of the file is a copy of us.
  std::optional<FileSpan> file_span() const override {
    return file_->node().device().file_span();
  }

 private:
  Task<Result<void>> read_only_resize() {
    co_return make_plain_error(EROFS, describe() + ": read-only, cannot be resized");
  }
  Child* file_;
  BlockCaps caps_;
};

}  // namespace blkmirror
