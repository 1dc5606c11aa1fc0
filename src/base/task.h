// Task<T>: the coroutine type of the engine (an Asio awaitable on the loop).
//
// Threading rule: a Task runs on the loop thread that co_spawns or awaits it.
//
// Rules for writing coroutines here. GCC 12 (Debian 12's compiler) miscompiles a few
// shapes of coroutine code; each rule avoids one, and every site that bends its code
// for a rule says "GCC 12 rule N (base/task.h)" rather than explaining it again.
//
//   1. No co_await inside ?: -- write if/else. GCC 12 destroys the temporary of a
//      co_await that sits in a conditional expression twice.
//   2. No temporary lambda with non-trivial captures inside a co_await expression
//      (e.g. loop.blocking([s = std::string(...)] {...})). GCC 12 destroys such a
//      temporary twice, and it relocates a coroutine's by-value arguments and captures
//      bitwise, which breaks std::string's small-string buffer. Capture pointers or
//      integers to data that lives in the awaiting frame; it waits, untouched, until
//      the call returns.
//   3. No braced init list inside a co_await expression: name a local variable first
//      (the std::initializer_list's backing array is another mis-destroyed temporary).
//   4. GCC 12 warns -Wmismatched-new-delete about Asio's coroutine frames (its frame
//      allocator's new/delete pairs are its own). Where it fires, silence it for that
//      file with a pragma and a one-line pointer here.
//
// And one rule that is not a compiler bug (STYLE.md habit 6): a coroutine lambda takes
// what it needs as parameters by value, never by capture -- the lambda object is
// usually gone after the first suspension, and its captures with it.
#pragma once

#include <asio/awaitable.hpp>

namespace blkmirror {

template <class T = void>
using Task = asio::awaitable<T>;

}  // namespace blkmirror
