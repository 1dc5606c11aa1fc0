// Notifier: a broadcast wake-up for coroutines on one loop ("something changed,
// look again"). Waiters always re-check their condition after waking, so a
// notify that happens while nobody waits is harmless to lose.
//
// Threading rule: loop thread only.
#pragma once

#include <chrono>
#include <list>

#include <asio.hpp>

#include "base/task.h"

namespace blkmirror {

class Notifier {
 public:
  // Wakes when notify_all() is called, or after timeout (whichever first).
  Task<void> wait(std::chrono::steady_clock::duration timeout =
                      std::chrono::steady_clock::duration::max()) {
    auto ex = co_await asio::this_coro::executor;
    asio::steady_timer timer(ex);
    if (timeout == std::chrono::steady_clock::duration::max())
      timer.expires_at(asio::steady_timer::time_point::max());
    else
      timer.expires_after(timeout);
    auto it = waiters_.insert(waiters_.end(), &timer);
    std::error_code ec;
    co_await timer.async_wait(asio::redirect_error(asio::use_awaitable, ec));
    waiters_.erase(it);
  }

  void notify_all() {
    for (auto* t : waiters_) t->cancel();
  }

  bool has_waiters() const { return !waiters_.empty(); }

 private:
  std::list<asio::steady_timer*> waiters_;
};

}  // namespace blkmirror
