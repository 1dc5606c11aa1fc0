// BLKMIRROR_ASSERT: checks what a comment promises (a counter never goes below zero,
// a gate is closed once, nothing is in flight at a pause point, "loop thread only").
// A violation is a programming error, not an I/O error: it prints the condition, the
// place and an optional message to stderr and aborts, so every test suite catches it.
//
// The checks are on in every build, release (RelWithDebInfo defines NDEBUG) included:
// each one is a compare and a predictable branch, the release binary is what the
// integration tests run, and a mirror that carries on past a broken invariant can
// write wrong data to the user's disk. Keep them that cheap; anything costlier
// belongs in a test.
//
// BLKMIRROR_ASSERT_ON_LOOP() checks that the calling thread is running a Loop
// (Loop::run marks its thread; the worker pool's threads are never marked).
//
// Threading rule: any thread.
#pragma once

#include <cstdio>
#include <cstdlib>

namespace blkmirror {

namespace detail {

// True while this thread is inside Loop::run (set by io/loop.h).
inline thread_local bool on_loop_thread = false;

[[noreturn, gnu::cold, gnu::noinline]] inline void assert_failed(const char* cond,
                                                                  const char* file, int line,
                                                                  const char* func,
                                                                  const char* msg) {
  std::fprintf(stderr, "%s:%d: %s: assertion failed: %s%s%s\n", file, line, func, cond,
               msg[0] ? ": " : "", msg);
  std::fflush(stderr);
  std::abort();
}

}  // namespace detail

// True while the calling thread runs a Loop.
inline bool on_loop_thread() { return detail::on_loop_thread; }

}  // namespace blkmirror

// BLKMIRROR_ASSERT(cond) or BLKMIRROR_ASSERT(cond, "string literal saying why").
#define BLKMIRROR_ASSERT(cond, ...)                                                      \
  do {                                                                                   \
    if (!(cond)) [[unlikely]]                                                            \
      ::blkmirror::detail::assert_failed(#cond, __FILE__, __LINE__, __func__,            \
                                         "" __VA_ARGS__);                                \
  } while (0)

#define BLKMIRROR_ASSERT_ON_LOOP() \
  BLKMIRROR_ASSERT(::blkmirror::on_loop_thread(), "called off the loop thread")
