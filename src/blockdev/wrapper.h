// BlockDeviceWrapper: decorates another device, forwarding everything. Wrappers
// (fault injection, throttling) derive from it and override the one method they
// change. Threading rule: as BlockDevice.
#pragma once

#include <utility>

#include "blockdev/block_device.h"

namespace blkmirror {

class BlockDeviceWrapper : public BlockDevice {
 public:
  explicit BlockDeviceWrapper(BlockDevicePtr inner) : inner_(std::move(inner)) {}

  std::string describe() const override { return inner_->describe(); }
  uint64_t length() const override { return inner_->length(); }
  const BlockCaps& caps() const override { return inner_->caps(); }

  Task<Result<void>> read(uint64_t off, std::span<std::byte> buf, ReadFlags f) override {
    return inner_->read(off, buf, f);
  }
  Task<Result<void>> write(uint64_t off, std::span<const std::byte> buf,
                           WriteFlags f) override {
    return inner_->write(off, buf, f);
  }
  Task<Result<void>> write_zeroes(uint64_t off, uint64_t len, ZeroFlags f) override {
    return inner_->write_zeroes(off, len, f);
  }
  Task<Result<void>> discard(uint64_t off, uint64_t len) override {
    return inner_->discard(off, len);
  }
  Task<Result<void>> flush() override { return inner_->flush(); }
  Task<Result<Extent>> block_status(uint64_t off, uint64_t len) override {
    return inner_->block_status(off, len);
  }
  Task<Result<void>> check_unchanged() override { return inner_->check_unchanged(); }
  uint64_t generation() const override { return inner_->generation(); }
  bool can_reconnect() const override { return inner_->can_reconnect(); }
  bool connected() const override { return inner_->connected(); }

  Task<Result<void>> resize(uint64_t new_length) override { return inner_->resize(new_length); }
  Task<Result<void>> set_read_only(bool ro) override { return inner_->set_read_only(ro); }

  const BlockDevicePtr& inner() const { return inner_; }

 private:
  BlockDevicePtr inner_;
};

}  // namespace blkmirror
