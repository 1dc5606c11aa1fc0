#include "blockdev/fault_device.h"

#include <fmt/format.h>

namespace blkmirror {

int FaultDevice::should_fail(FaultRule::Op op, uint64_t off, uint64_t len) {
  for (auto& r : rules_) {
    if (!(r.ops & op) || r.remaining == 0) continue;
    // Saturating end: a rule's length may run to "forever".
    uint64_t rule_end = r.length > UINT64_MAX - r.offset ? UINT64_MAX : r.offset + r.length;
    bool touches = op == FaultRule::kFlush || (off < rule_end && off + len > r.offset);
    if (!touches) continue;
    if (r.rate < 1.0 && std::uniform_real_distribution<double>(0, 1)(rng_) >= r.rate) continue;
    if (r.remaining > 0) --r.remaining;
    ++injected_;
    return r.errnum;
  }
  return 0;
}

namespace {
tl::unexpected<Error> injected_error(const BlockDevice& d, const char* what, uint64_t off,
                                     int errnum) {
  return make_error(errnum, fmt::format("{} {} at {} (injected)", what, d.describe(), off));
}
}  // namespace

Task<Result<void>> FaultDevice::read(uint64_t off, std::span<std::byte> buf, ReadFlags f) {
  if (int e = should_fail(FaultRule::kRead, off, buf.size()))
    co_return injected_error(*this, "read", off, e);
  co_return co_await inner()->read(off, buf, f);
}

Task<Result<void>> FaultDevice::write(uint64_t off, std::span<const std::byte> buf, WriteFlags f) {
  if (int e = should_fail(FaultRule::kWrite, off, buf.size()))
    co_return injected_error(*this, "write", off, e);
  co_return co_await inner()->write(off, buf, f);
}

Task<Result<void>> FaultDevice::write_zeroes(uint64_t off, uint64_t len, ZeroFlags f) {
  if (int e = should_fail(FaultRule::kZero, off, len))
    co_return injected_error(*this, "write zeroes", off, e);
  co_return co_await inner()->write_zeroes(off, len, f);
}

Task<Result<void>> FaultDevice::discard(uint64_t off, uint64_t len) {
  if (int e = should_fail(FaultRule::kDiscard, off, len))
    co_return injected_error(*this, "discard", off, e);
  co_return co_await inner()->discard(off, len);
}

Task<Result<void>> FaultDevice::flush() {
  if (int e = should_fail(FaultRule::kFlush, 0, 0)) co_return injected_error(*this, "flush", 0, e);
  co_return co_await inner()->flush();
}

Task<Result<Extent>> FaultDevice::block_status(uint64_t off, uint64_t len) {
  if (int e = should_fail(FaultRule::kBlockStatus, off, len))
    co_return injected_error(*this, "block status", off, e);
  co_return co_await inner()->block_status(off, len);
}

}  // namespace blkmirror
