// Loop: the event loop that owns all engine state, plus a small worker pool for
// blocking system calls (fsync, fallocate, lseek SEEK_DATA/SEEK_HOLE, ioctl).
//
// Threading rule: engine objects live on the loop thread and are never locked.
// blocking(f) runs f on a worker thread and resumes the calling coroutine back on
// the loop, so f must touch nothing but its own arguments (fds, plain values).
#pragma once

#include <chrono>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <type_traits>
#include <utility>

#include <asio.hpp>

#include "base/assert.h"
#include "base/task.h"
#include "io/uring.h"

namespace blkmirror {

class Loop {
 public:
  explicit Loop(unsigned workers = 4) : pool_(workers) {}
  ~Loop() { pool_.join(); }
  Loop(const Loop&) = delete;
  Loop& operator=(const Loop&) = delete;

  asio::io_context& ctx() { return ctx_; }
  // The loop's io_uring, created on first use.
  Uring& uring() {
    if (!uring_) uring_ = std::make_unique<Uring>(ctx_);
    return *uring_;
  }
  asio::any_io_executor executor() { return ctx_.get_executor(); }

  // Runs f() on the worker pool and resumes on the loop with its result.
  // REQUIRES: f is self-contained (captures by value; no loop-owned state), and
  // its captures survive a bitwise move: capture pointers or integers (GCC 12
  // rule 2, base/task.h).
  template <class F>
  Task<std::invoke_result_t<F>> blocking(F f) {
    using R = std::invoke_result_t<F>;
    static_assert(!std::is_void_v<R>, "blocking() needs a value-returning function");
    auto& pool = pool_;
    co_return co_await asio::async_initiate<decltype(asio::use_awaitable), void(R)>(
        [&pool](auto handler, F fn) {
          // Keeps the loop alive while the call is away on the pool.
          auto work = asio::make_work_guard(asio::get_associated_executor(handler));
          asio::post(pool, [fn = std::move(fn), handler = std::move(handler),
                            work = std::move(work)]() mutable {
            R r = fn();
            auto ex = work.get_executor();
            asio::post(ex, [handler = std::move(handler), r = std::move(r)]() mutable {
              std::move(handler)(std::move(r));
            });
          });
        },
        asio::use_awaitable, std::move(f));
  }

  // Runs task to completion on the calling thread, which becomes the loop thread
  // for the duration. Other coroutines still pending when it finishes are left
  // suspended (and destroyed with the Loop). Rethrows the task's exception.
  template <class T>
  T run(Task<T> task) {
    std::exception_ptr error;
    std::optional<std::conditional_t<std::is_void_v<T>, bool, T>> value;
    if constexpr (std::is_void_v<T>) {
      asio::co_spawn(ctx_, std::move(task), [&](std::exception_ptr e) {
        error = e;
        value = true;
        ctx_.stop();
      });
    } else {
      asio::co_spawn(ctx_, std::move(task), [&](std::exception_ptr e, T v) {
        error = e;
        if (!e) value = std::move(v);
        ctx_.stop();
      });
    }
    ctx_.restart();
    auto guard = asio::make_work_guard(ctx_);
    {
      // Marks this thread as a loop thread while it runs (BLKMIRROR_ASSERT_ON_LOOP).
      struct Mark {
        bool was = std::exchange(detail::on_loop_thread, true);
        ~Mark() { detail::on_loop_thread = was; }
      } mark;
      ctx_.run();
    }
    if (error) std::rethrow_exception(error);
    if constexpr (!std::is_void_v<T>) return std::move(*value);
  }

 private:
  asio::io_context ctx_{1};
  std::unique_ptr<Uring> uring_;  // after ctx_: destroyed before it
  asio::thread_pool pool_;
};

// Suspends the calling coroutine for d without blocking the loop.
inline Task<void> sleep_for(std::chrono::steady_clock::duration d) {
  asio::steady_timer t(co_await asio::this_coro::executor, d);
  co_await t.async_wait(asio::use_awaitable);
}

// Lets other ready coroutines on the loop run, then continues.
inline Task<void> yield_now() {
  co_await asio::post(co_await asio::this_coro::executor, asio::use_awaitable);
}

}  // namespace blkmirror
