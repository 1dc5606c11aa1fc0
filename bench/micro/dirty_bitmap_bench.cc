// Micro benchmarks for DirtyBitmap at production scale: a 16 TiB disk tracked at
// 64 KiB granularity is 2^28 bits (32 MiB of level 0).
#include <benchmark/benchmark.h>

#include <cstdint>
#include <random>
#include <vector>

#include "bitmap/dirty_bitmap.h"

namespace blkmirror {
namespace {

constexpr uint64_t kBits = uint64_t{1} << 28;  // 16 TiB / 64 KiB
constexpr uint64_t kRangeBits = 16;            // 1 MiB / 64 KiB

// Random range starts, precomputed so the RNG stays out of the timed loop.
std::vector<uint64_t> RandomStarts(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<uint64_t> dist(0, kBits - kRangeBits);
  std::vector<uint64_t> starts(n);
  for (auto& s : starts) s = dist(rng);
  return starts;
}

// Visits every set bit through next_set; returns how many it found.
uint64_t IterateSetBits(const DirtyBitmap& bm) {
  uint64_t visited = 0;
  for (auto b = bm.next_set(0); b; b = bm.next_set(*b + 1)) ++visited;
  return visited;
}

// Marks random 1 MiB guest writes dirty, as the write-tracking path does.
void BM_SetRandom1MiB(benchmark::State& state) {
  DirtyBitmap bm(kBits);
  const auto starts = RandomStarts(1 << 16, 1);
  size_t i = 0;
  for (auto _ : state) {
    bm.set(starts[i], kRangeBits);
    i = (i + 1) & (starts.size() - 1);
  }
  benchmark::DoNotOptimize(bm.count());
  state.SetItemsProcessed(state.iterations());  // items = 1 MiB ranges
}
BENCHMARK(BM_SetRandom1MiB);

// Clears random 1 MiB ranges, as the copy path does after a chunk is mirrored.
void BM_ResetRandom1MiB(benchmark::State& state) {
  DirtyBitmap bm(kBits);
  bm.set_all();
  const auto starts = RandomStarts(1 << 16, 2);
  size_t i = 0;
  for (auto _ : state) {
    bm.reset(starts[i], kRangeBits);
    i = (i + 1) & (starts.size() - 1);
  }
  benchmark::DoNotOptimize(bm.count());
  state.SetItemsProcessed(state.iterations());  // items = 1 MiB ranges
}
BENCHMARK(BM_ResetRandom1MiB);

// Marks the whole disk dirty (start of a full mirror).
void BM_SetAll(benchmark::State& state) {
  DirtyBitmap bm(kBits);
  for (auto _ : state) {
    state.PauseTiming();
    bm.reset_all();
    state.ResumeTiming();
    bm.set_all();
  }
  benchmark::DoNotOptimize(bm.count());
  state.SetItemsProcessed(state.iterations() * kBits);  // items = bits
}
BENCHMARK(BM_SetAll)->Unit(benchmark::kMillisecond);

// set_all, then clear the whole disk in large sequential ranges of
// state.range(0) bits (16384 bits = 1 GiB, 2^20 bits = 64 GiB).
void BM_SetAllThenResetLarge(benchmark::State& state) {
  const uint64_t chunk = state.range(0);
  DirtyBitmap bm(kBits);
  for (auto _ : state) {
    bm.set_all();
    for (uint64_t s = 0; s < kBits; s += chunk) bm.reset(s, chunk);
  }
  benchmark::DoNotOptimize(bm.count());
  state.SetItemsProcessed(state.iterations() * kBits);  // items = bits reset
}
BENCHMARK(BM_SetAllThenResetLarge)->Arg(1 << 14)->Arg(1 << 20)->Unit(benchmark::kMillisecond);

// Walks a mostly clean disk with ~1000 dirty 1 MiB ranges: the common case for
// an incremental mirror pass, and where the summary levels pay off.
void BM_IterateSparse(benchmark::State& state) {
  DirtyBitmap bm(kBits);
  for (uint64_t s : RandomStarts(1000, 3)) bm.set(s, kRangeBits);
  uint64_t visited = 0;
  for (auto _ : state) {
    visited = IterateSetBits(bm);
    benchmark::DoNotOptimize(visited);
  }
  state.counters["set_bits"] = static_cast<double>(visited);
  state.SetItemsProcessed(state.iterations() * visited);  // items = set bits visited
}
BENCHMARK(BM_IterateSparse)->Unit(benchmark::kMicrosecond);

// Walks a half-dirty disk (every other 1 MiB range set): the worst case for
// iteration, dominated by per-bit next_set cost.
void BM_IterateDense(benchmark::State& state) {
  DirtyBitmap bm(kBits);
  for (uint64_t s = 0; s < kBits; s += 2 * kRangeBits) bm.set(s, kRangeBits);
  uint64_t visited = 0;
  for (auto _ : state) {
    visited = IterateSetBits(bm);
    benchmark::DoNotOptimize(visited);
  }
  state.counters["set_bits"] = static_cast<double>(visited);
  state.SetItemsProcessed(state.iterations() * visited);  // items = set bits visited
}
BENCHMARK(BM_IterateDense)->Unit(benchmark::kMillisecond);

// count() is read on every progress report; it must stay O(1).
void BM_Count(benchmark::State& state) {
  DirtyBitmap bm(kBits);
  for (uint64_t s : RandomStarts(1000, 4)) bm.set(s, kRangeBits);
  for (auto _ : state) benchmark::DoNotOptimize(bm.count());
}
BENCHMARK(BM_Count);

}  // namespace
}  // namespace blkmirror

BENCHMARK_MAIN();
