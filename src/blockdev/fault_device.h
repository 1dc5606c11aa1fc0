// FaultDevice: wraps a device and fails chosen operations, for tests of error
// paths. A rule names the operations, the byte range they must touch, the chance
// of failing, how many times it may fire, and the errno to return. A failed
// operation does not reach the inner device (no partial writes are simulated).
//
// Threading rule: loop thread only.
#pragma once

#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "blockdev/wrapper.h"

namespace blkmirror {

struct FaultRule {
  enum Op : unsigned {
    kRead = 1,
    kWrite = 2,
    kZero = 4,
    kDiscard = 8,
    kFlush = 16,
    kBlockStatus = 32,
    kAllWrites = kWrite | kZero | kDiscard,
  };
  unsigned ops = kRead;
  uint64_t offset = 0;                                      // range (ignored by flush)
  uint64_t length = std::numeric_limits<uint64_t>::max();
  double rate = 1.0;                                        // probability per matching op
  int64_t remaining = -1;                                   // fires left; -1 unlimited
  int errnum = 5;                                           // EIO
};

class FaultDevice : public BlockDeviceWrapper {
 public:
  explicit FaultDevice(BlockDevicePtr inner, uint64_t seed = 1)
      : BlockDeviceWrapper(std::move(inner)), rng_(seed) {}

  void add_rule(const FaultRule& r) { rules_.push_back(r); }
  void clear_rules() { rules_.clear(); }
  uint64_t injected() const { return injected_; }

  Task<Result<void>> read(uint64_t off, std::span<std::byte> buf, ReadFlags f = {}) override;
  Task<Result<void>> write(uint64_t off, std::span<const std::byte> buf, WriteFlags f) override;
  Task<Result<void>> write_zeroes(uint64_t off, uint64_t len, ZeroFlags f) override;
  Task<Result<void>> discard(uint64_t off, uint64_t len) override;
  Task<Result<void>> flush() override;
  Task<Result<Extent>> block_status(uint64_t off, uint64_t len) override;

 private:
  // The errno to fail with, or 0 to let the operation through.
  int should_fail(FaultRule::Op op, uint64_t off, uint64_t len);

  std::vector<FaultRule> rules_;
  std::mt19937_64 rng_;
  uint64_t injected_ = 0;
};

}  // namespace blkmirror
