// ChildDevice: a BlockDevice view of a Child edge, for a format driver that
// reaches its file or backing node through the graph (a qcow2 node's `file` and
// `backing` children). I/O through it takes the edge, so it honours the child
// node's drains, and the child counts as in use while the edge exists.
// describe() is the child device's own, so a driver's errors name the file.
// The edge is owned by whoever made the node (the daemon) and outlives this
// view's use: the format device is closed before its edges go.
//
// Threading rule: loop thread only.
#pragma once

#include "blockdev/graph.h"

namespace blkmirror {

class ChildDevice : public BlockDevice {
 public:
  ChildDevice(Child* edge, bool read_only) : edge_(edge), caps_(edge->caps()) {
    caps_.read_only = caps_.read_only || read_only;
  }
  std::string describe() const override { return edge_->node().device().describe(); }
  uint64_t length() const override { return edge_->length(); }
  const BlockCaps& caps() const override { return caps_; }

  Task<Result<void>> read(uint64_t off, std::span<std::byte> buf, ReadFlags f) override {
    return edge_->read(off, buf, f);
  }
  Task<Result<void>> write(uint64_t off, std::span<const std::byte> buf, WriteFlags f) override {
    return edge_->write(off, buf, f);
  }
  Task<Result<void>> write_zeroes(uint64_t off, uint64_t len, ZeroFlags f) override {
    return edge_->write_zeroes(off, len, f);
  }
  Task<Result<void>> discard(uint64_t off, uint64_t len) override {
    return edge_->discard(off, len);
  }
  Task<Result<void>> flush() override { return edge_->flush(); }
  Task<Result<Extent>> block_status(uint64_t off, uint64_t len) override {
    return edge_->block_status(off, len);
  }
  Task<Result<void>> resize(uint64_t new_length) override { return edge_->resize(new_length); }
  // The view follows a reopen of its format node: read-only when asked, or
  // when the child node is (reopen the child first when going read-write).
  Task<Result<void>> set_read_only(bool ro) override {
    if (!ro && edge_->caps().read_only)
      co_return make_error(EROFS, describe() + ": the node is read-only");
    caps_ = edge_->caps();
    caps_.read_only = caps_.read_only || ro;
    co_return Result<void>{};
  }

 private:
  Child* edge_;
  BlockCaps caps_;
};

}  // namespace blkmirror
