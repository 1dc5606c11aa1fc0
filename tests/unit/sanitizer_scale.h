// How many seeds (or rounds) a randomized model test runs. The release build runs every
// one. The asan-ubsan build (clang at -O0, every access checked) runs the same tests 10-50
// times slower; its job is to catch memory and undefined-behaviour errors on the same
// code paths, which a quarter of the seeds reaches, so it runs that much and CI keeps its
// time budget.
#pragma once

#include <cstdint>

namespace blkmirror::test {

#if defined(__SANITIZE_ADDRESS__)
inline constexpr bool kSanitized = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
inline constexpr bool kSanitized = true;
#else
inline constexpr bool kSanitized = false;
#endif
#else
inline constexpr bool kSanitized = false;
#endif

// `full` normally; a quarter of it, at least one, under the sanitizers.
constexpr uint64_t seeds(uint64_t full) { return kSanitized ? (full + 3) / 4 : full; }

}  // namespace blkmirror::test
