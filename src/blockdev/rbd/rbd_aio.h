// rbd_aio(): awaits one librbd asynchronous request (rbd_aio_read, _write,
// _flush, ...) without blocking the loop. librbd calls the completion on one of
// its own threads; the callback only reads the return value and posts the
// resumption to the loop's executor, so the awaiting coroutine always continues
// on the loop thread. No thread per request: librbd's threads do the waiting.
//
// Threading rule: await on the loop thread; `issue` runs there, synchronously,
// and must only start the request (librbd's aio calls do not block).
#pragma once

#include <rbd/librbd.h>
#include <sys/types.h>

#include <asio.hpp>
#include <memory>
#include <utility>

#include "base/task.h"

namespace blkmirror {

// issue(completion) starts the request and returns librbd's int (< 0: not
// started). Resumes with the request's return value (bytes, 0, or -errno).
// REQUIRES: issue captures only pointers and integers (GCC 12 rule 2, base/task.h).
template <class Issue>
Task<ssize_t> rbd_aio(Issue issue) {
  co_return co_await asio::async_initiate<decltype(asio::use_awaitable), void(ssize_t)>(
      [](auto handler, Issue start) {
        using Handler = decltype(handler);
        struct Op {
          Handler handler;
          asio::executor_work_guard<asio::associated_executor_t<Handler>> work;
          // Runs on the loop: hands the result to the awaiting coroutine.
          static void finish(Op* raw, ssize_t r) {
            auto ex = raw->work.get_executor();
            asio::post(ex, [raw, r]() {
              std::unique_ptr<Op> op(raw);
              op->work.reset();
              std::move(op->handler)(r);
            });
          }
        };
        auto ex = asio::get_associated_executor(handler);
        auto* op = new Op{std::move(handler), asio::make_work_guard(ex)};
        rbd_completion_t c = nullptr;
        // On a librbd thread: read the result and leave at once.
        auto done = [](rbd_completion_t comp, void* arg) {
          ssize_t r = rbd_aio_get_return_value(comp);
          rbd_aio_release(comp);
          Op::finish(static_cast<Op*>(arg), r);
        };
        int r = rbd_aio_create_completion(op, done, &c);
        if (r < 0) {
          Op::finish(op, r);
          return;
        }
        r = start(c);
        if (r < 0) {
          rbd_aio_release(c);
          Op::finish(op, r);
        }
      },
      asio::use_awaitable, std::move(issue));
}

}  // namespace blkmirror
