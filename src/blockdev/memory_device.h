// MemoryDevice: a sparse in-memory disk for tests. Data lives in 4 KiB pages;
// pages never written (or zeroed with may_unmap) are holes, so block_status()
// reports real holes. Each operation yields to the loop before and after it takes
// effect, so concurrent operations interleave the way real I/O does.
//
// Threading rule: loop thread only.
#pragma once

#include <array>
#include <map>
#include <memory>
#include <random>

#include "blockdev/block_device.h"

namespace blkmirror {

class MemoryDevice : public BlockDevice {
 public:
  static constexpr uint64_t kPage = 4096;

  struct Options {
    BlockCaps caps{};          // read_only, zero_init, cluster_size... honoured as given
    bool yield = true;         // interleave operations on the loop
    unsigned jitter = 0;       // extra random yields (0..jitter) per step, to shuffle order
    uint64_t seed = 1;
  };
  MemoryDevice(uint64_t length, Options opts);
  explicit MemoryDevice(uint64_t length) : MemoryDevice(length, Options{defaults()}) {}

  static BlockCaps defaults();

  std::string describe() const override { return "memory"; }
  uint64_t length() const override { return length_; }
  const BlockCaps& caps() const override { return opts_.caps; }

  Task<Result<void>> read(uint64_t off, std::span<std::byte> buf, ReadFlags f = {}) override;
  Task<Result<void>> write(uint64_t off, std::span<const std::byte> buf, WriteFlags f) override;
  Task<Result<void>> write_zeroes(uint64_t off, uint64_t len, ZeroFlags f) override;
  Task<Result<void>> discard(uint64_t off, uint64_t len) override;
  Task<Result<void>> flush() override;
  Task<Result<Extent>> block_status(uint64_t off, uint64_t len) override;
  // Shrinking drops the pages past the new end.
  Task<Result<void>> resize(uint64_t new_length) override;
  Task<Result<void>> set_read_only(bool ro) override {
    opts_.caps.read_only = ro;
    co_return Result<void>{};
  }

  // Synchronous access for tests (no yield).
  void read_now(uint64_t off, std::span<std::byte> buf) const;
  void write_now(uint64_t off, std::span<const std::byte> buf);
  void zero_now(uint64_t off, uint64_t len, bool unmap);
  uint64_t allocated_bytes() const { return pages_.size() * kPage; }
  uint64_t writes() const { return writes_; }
  uint64_t bytes_written() const { return bytes_written_; }

 private:
  using Page = std::array<std::byte, kPage>;
  Task<void> maybe_yield();
  Result<void> check(uint64_t off, uint64_t len, bool writing) const;

  uint64_t length_;
  Options opts_;
  std::map<uint64_t, std::unique_ptr<Page>> pages_;  // page index -> data
  std::mt19937_64 rng_;
  uint64_t writes_ = 0;
  uint64_t bytes_written_ = 0;
};

}  // namespace blkmirror
