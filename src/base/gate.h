// Gate: shut down through a gate. Each request enters (holds) the gate while it
// runs; close() stops new entries and waits until every holder has left. A gate
// is closed once (checked: a second close() aborts, see base/assert.h).
//
// Threading rule: loop thread only.
#pragma once

#include <cstdint>

#include "base/assert.h"
#include "base/notifier.h"

namespace blkmirror {

class Gate {
 public:
  class Holder {
   public:
    Holder() = default;
    explicit Holder(Gate* g) : gate_(g) {}
    Holder(Holder&& o) noexcept : gate_(o.gate_) { o.gate_ = nullptr; }
    Holder& operator=(Holder&& o) noexcept {
      release();
      gate_ = o.gate_;
      o.gate_ = nullptr;
      return *this;
    }
    ~Holder() { release(); }
    explicit operator bool() const { return gate_ != nullptr; }
    void release() {
      if (!gate_) return;
      BLKMIRROR_ASSERT(gate_->count_ > 0, "gate holder count below zero");
      if (--gate_->count_ == 0) gate_->idle_.notify_all();
      gate_ = nullptr;
    }

   private:
    Gate* gate_ = nullptr;
  };

  // An empty Holder when the gate is closed: the caller must refuse the work.
  Holder try_enter() {
    if (closed_) return Holder();
    ++count_;
    return Holder(this);
  }

  bool closed() const { return closed_; }
  uint64_t count() const { return count_; }

  Task<void> close() {
    BLKMIRROR_ASSERT_ON_LOOP();
    BLKMIRROR_ASSERT(!closed_, "gate closed twice");
    closed_ = true;
    while (count_ > 0) co_await idle_.wait();
  }

 private:
  bool closed_ = false;
  uint64_t count_ = 0;
  Notifier idle_;
};

}  // namespace blkmirror
