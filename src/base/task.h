// Task<T>: the coroutine type of the engine (an Asio awaitable on the loop).
#pragma once

#include <asio/awaitable.hpp>

namespace blkmirror {

template <class T = void>
using Task = asio::awaitable<T>;

}  // namespace blkmirror
