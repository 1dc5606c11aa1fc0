// What the metrics' per-request statistics cost: two clock reads and one
// OpStats::record, as an NBD request and a graph request each do. Compared with
// scenario 4's server CPU per I/O (tens of microseconds), a few of these per I/O
// must stay far below the 2% budget (docs/metrics.md).
#include <benchmark/benchmark.h>

#include <chrono>

#include "base/op_stats.h"

namespace blkmirror {
namespace {

void BM_RecordOneRequest(benchmark::State& state) {
  OpStats s;
  for (auto _ : state) {
    auto start = std::chrono::steady_clock::now();
    s.record(4096, std::chrono::steady_clock::now() - start, true);
  }
  benchmark::DoNotOptimize(s.count);
}
BENCHMARK(BM_RecordOneRequest);

}  // namespace
}  // namespace blkmirror

BENCHMARK_MAIN();
