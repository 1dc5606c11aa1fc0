// OpStats: counters for one kind of I/O operation (count, bytes, errors, time
// spent) with a latency histogram, as the metrics endpoint exposes them
// (src/metrics/). Recording is a few additions: cheap enough for every NBD
// request and every graph request.
//
// Threading rule: plain data, written and read on the loop thread.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>

namespace blkmirror {

struct OpStats {
  // Upper bounds of the latency buckets, in microseconds (the last bucket,
  // +Inf, is implicit: count).
  static constexpr std::array<uint64_t, 13> kBucketsUs = {
      50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000, 1000000};

  uint64_t count = 0;
  uint64_t bytes = 0;
  uint64_t errors = 0;
  uint64_t ns_total = 0;
  std::array<uint64_t, kBucketsUs.size()> buckets{};  // per bucket, not cumulative

  void record(uint64_t nbytes, std::chrono::nanoseconds took, bool ok) {
    ++count;
    bytes += nbytes;
    if (!ok) ++errors;
    const auto ns = static_cast<uint64_t>(took.count());
    ns_total += ns;
    const uint64_t us = ns / 1000;
    for (size_t i = 0; i < kBucketsUs.size(); ++i)
      if (us <= kBucketsUs[i]) {
        ++buckets[i];
        break;
      }
  }
};

}  // namespace blkmirror
