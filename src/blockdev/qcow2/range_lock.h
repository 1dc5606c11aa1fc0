// Serialization of in-flight qcow2 requests.
//
// ClusterLock: shared/exclusive locks over ranges of guest clusters. Reads and
// in-place writes take a range shared; anything that changes a cluster's mapping
// (allocation, zeroing, discard) takes it exclusive, so two requests never
// allocate the same guest cluster twice, and a host cluster is never freed (and
// reused) while a request still reads or writes it.
// AsyncMutex: one holder at a time (the allocator, the flusher).
// Both hand out RAII guards; a range is taken whole or not at all (no deadlock).
//
// Threading rule: loop thread only.
// On-disk ORDERING RULE: none (in-memory only).
#pragma once

#include <cstdint>
#include <list>

#include "base/notifier.h"
#include "base/task.h"

namespace blkmirror::qcow2 {

struct Held {
  uint64_t first, last;
  bool exclusive;
};

class ClusterLock {
 public:
  class Guard {
   public:
    Guard() = default;
    Guard(ClusterLock* l, std::list<Held>::iterator it) : lock_(l), it_(it) {}
    Guard(Guard&& o) noexcept : lock_(o.lock_), it_(o.it_) { o.lock_ = nullptr; }
    Guard& operator=(Guard&& o) noexcept {
      release();
      lock_ = o.lock_;
      it_ = o.it_;
      o.lock_ = nullptr;
      return *this;
    }
    ~Guard() { release(); }
    void release() {
      if (!lock_) return;
      lock_->held_.erase(it_);
      lock_->changed_.notify_all();
      lock_ = nullptr;
    }

   private:
    ClusterLock* lock_ = nullptr;
    std::list<Held>::iterator it_;
  };

  // Clusters [first, last], both inclusive.
  Task<Guard> lock(uint64_t first, uint64_t last, bool exclusive) {
    while (conflicts(first, last, exclusive)) co_await changed_.wait();
    held_.push_back(Held{first, last, exclusive});
    co_return Guard(this, std::prev(held_.end()));
  }

 private:
  friend class Guard;
  bool conflicts(uint64_t first, uint64_t last, bool exclusive) const {
    for (const auto& h : held_)
      if (h.first <= last && first <= h.last && (exclusive || h.exclusive)) return true;
    return false;
  }
  std::list<Held> held_;
  Notifier changed_;
};

class AsyncMutex {
 public:
  class Guard {
   public:
    Guard() = default;
    explicit Guard(AsyncMutex* m) : m_(m) {}
    Guard(Guard&& o) noexcept : m_(o.m_) { o.m_ = nullptr; }
    Guard& operator=(Guard&& o) noexcept {
      release();
      m_ = o.m_;
      o.m_ = nullptr;
      return *this;
    }
    ~Guard() { release(); }
    void release() {
      if (!m_) return;
      m_->locked_ = false;
      m_->changed_.notify_all();
      m_ = nullptr;
    }

   private:
    AsyncMutex* m_ = nullptr;
  };
  Task<Guard> lock() {
    while (locked_) co_await changed_.wait();
    locked_ = true;
    co_return Guard(this);
  }
  bool locked() const { return locked_; }

 private:
  bool locked_ = false;
  Notifier changed_;
};

}  // namespace blkmirror::qcow2
