// PowerCutFile: a disk in memory that remembers what is durable. It keeps the
// bytes as of the last flush plus the writes since; crash_image() makes what a
// power cut may leave: the durable bytes plus a random subset of the later
// writes (in any order a disk may have applied them).
#pragma once

#include <cstring>
#include <functional>
#include <random>
#include <vector>

#include "blockdev/block_device.h"

namespace blkmirror::test {

// The image file in memory; loop thread only (the test runs one coroutine).
class PowerCutFile : public BlockDevice {
 public:
  explicit PowerCutFile(std::vector<std::byte> bytes) : live_(bytes), durable_(std::move(bytes)) {
    caps_.can_zero = caps_.can_trim = caps_.can_zero_unmap = true;
  }
  // Called after every write, zero, discard, resize or flush took effect.
  std::function<void()> on_op;

  // Every write so far, as a process that died (kill -9) leaves the file.
  const std::vector<std::byte>& live() const { return live_; }

  std::vector<std::byte> crash_image(std::mt19937_64& rng) const {
    std::vector<std::byte> img = durable_;
    for (const Op& op : pending_)
      if (rng() & 1) apply(img, op);
    return img;
  }

  std::string describe() const override { return "power-cut file"; }
  uint64_t length() const override { return live_.size(); }
  const BlockCaps& caps() const override { return caps_; }
  Task<Result<void>> read(uint64_t off, std::span<std::byte> buf, ReadFlags = {}) override {
    if (off + buf.size() > live_.size()) co_return make_error(EIO, "read past the end");
    std::memcpy(buf.data(), live_.data() + off, buf.size());
    co_return Result<void>{};
  }
  Task<Result<void>> write(uint64_t off, std::span<const std::byte> buf, WriteFlags) override {
    record(Op{off, std::vector<std::byte>(buf.begin(), buf.end()), 0});
    co_return Result<void>{};
  }
  Task<Result<void>> write_zeroes(uint64_t off, uint64_t len, ZeroFlags) override {
    record(Op{off, std::vector<std::byte>(len), 0});
    co_return Result<void>{};
  }
  Task<Result<void>> discard(uint64_t off, uint64_t len) override {
    return write_zeroes(off, len, {});
  }
  Task<Result<void>> flush() override {
    durable_ = live_;
    pending_.clear();
    if (on_op) on_op();
    co_return Result<void>{};
  }
  // No hole information (caps().has_block_status is false): all data.
  Task<Result<Extent>> block_status(uint64_t off, uint64_t len) override {
    co_return Extent{len, true, false};
  }
  Task<Result<void>> resize(uint64_t n) override {
    record(Op{0, {}, n});
    co_return Result<void>{};
  }

 private:
  struct Op {
    uint64_t off;
    std::vector<std::byte> data;
    uint64_t new_length;  // a resize when data is empty
  };
  static void apply(std::vector<std::byte>& img, const Op& op) {
    if (op.data.empty()) {
      img.resize(op.new_length);
      return;
    }
    if (img.size() < op.off + op.data.size()) img.resize(op.off + op.data.size());
    std::memcpy(img.data() + op.off, op.data.data(), op.data.size());
  }
  void record(Op op) {
    apply(live_, op);
    pending_.push_back(std::move(op));
    if (on_op) on_op();
  }
  std::vector<std::byte> live_, durable_;
  std::vector<Op> pending_;
  BlockCaps caps_{};
};

}  // namespace blkmirror::test
