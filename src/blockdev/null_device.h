// NullDevice: reads zeroes, accepts and drops writes (QEMU's null-co). Useful as
// a throw-away target for measuring the read side. Threading rule: loop thread.
#pragma once

#include <cstring>

#include "blockdev/block_device.h"

namespace blkmirror {

class NullDevice : public BlockDevice {
 public:
  explicit NullDevice(uint64_t length) : length_(length) {
    caps_.zero_init = true;
    caps_.can_zero = true;
    caps_.can_zero_unmap = true;
    caps_.can_trim = true;
    caps_.can_fua = true;
    caps_.has_block_status = true;
  }
  std::string describe() const override { return "null"; }
  uint64_t length() const override { return length_; }
  const BlockCaps& caps() const override { return caps_; }

  Task<Result<void>> read(uint64_t, std::span<std::byte> buf, ReadFlags) override {
    std::memset(buf.data(), 0, buf.size());
    co_return Result<void>{};
  }
  Task<Result<void>> write(uint64_t, std::span<const std::byte>, WriteFlags) override {
    co_return Result<void>{};
  }
  Task<Result<void>> write_zeroes(uint64_t, uint64_t, ZeroFlags) override {
    co_return Result<void>{};
  }
  Task<Result<void>> discard(uint64_t, uint64_t) override { co_return Result<void>{}; }
  Task<Result<void>> flush() override { co_return Result<void>{}; }
  Task<Result<Extent>> block_status(uint64_t, uint64_t len) override {
    co_return Extent{len, false, true};
  }
  Task<Result<void>> set_read_only(bool ro) override {
    caps_.read_only = ro;
    co_return Result<void>{};
  }

 private:
  uint64_t length_;
  BlockCaps caps_;
};

}  // namespace blkmirror
