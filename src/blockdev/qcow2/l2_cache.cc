#include "blockdev/qcow2/l2_cache.h"

#include <fmt/format.h>

namespace blkmirror::qcow2 {

void L2Cache::touch(const L2Ptr& t) {
  lru_.splice(lru_.begin(), lru_, t->lru);
}

void L2Cache::evict() {
  // Drops clean, loaded tables from the cold end until under capacity.
  auto it = lru_.end();
  while (tables_.size() > capacity_ && it != lru_.begin()) {
    --it;
    auto found = tables_.find(*it);
    const L2Ptr& t = found->second;
    if (t->dirty || t->loading) continue;
    auto victim = it++;
    tables_.erase(found);
    lru_.erase(victim);
  }
}

Task<Result<L2Ptr>> L2Cache::get(uint64_t host) {
  while (true) {
    auto it = tables_.find(host);
    if (it == tables_.end()) break;
    L2Ptr t = it->second;
    if (!t->loading) {
      ++hits_;
      touch(t);
      co_return t;
    }
    co_await loaded_.wait();  // someone else is reading it: look again afterwards
  }
  ++misses_;
  auto t = std::make_shared<L2Table>();
  t->host = host;
  t->loading = true;
  t->data.resize(table_bytes_);
  lru_.push_front(host);
  t->lru = lru_.begin();
  tables_[host] = t;
  auto r = co_await file_.read(host, t->data);
  t->loading = false;
  if (!r) {
    lru_.erase(t->lru);
    tables_.erase(host);
    loaded_.notify_all();
    co_return make_error(r.error());
  }
  loaded_.notify_all();
  evict();
  co_return t;
}

L2Ptr L2Cache::create(uint64_t host) {
  auto t = std::make_shared<L2Table>();
  t->host = host;
  t->data.assign(table_bytes_, std::byte{0});
  lru_.push_front(host);
  t->lru = lru_.begin();
  tables_[host] = t;
  mark_dirty(t);
  evict();
  return t;
}

void L2Cache::mark_dirty(const L2Ptr& t) {
  if (!t->dirty) {
    t->dirty = true;
    ++dirty_;
  }
}

std::vector<DirtyTable> L2Cache::take_dirty() {
  std::vector<DirtyTable> out;
  if (dirty_ == 0) return out;
  for (auto& [host, t] : tables_) {
    if (!t->dirty) continue;
    out.push_back(DirtyTable{host, t->data});
    t->dirty = false;
  }
  dirty_ = 0;
  return out;
}

void L2Cache::redirty(const std::vector<DirtyTable>& tables) {
  for (const auto& d : tables) {
    auto it = tables_.find(d.host);
    if (it != tables_.end()) {
      mark_dirty(it->second);
    } else {
      // Evicted while its write was under way: the copy is the newest content.
      L2Ptr t = create(d.host);
      t->data = d.data;
    }
  }
}

}  // namespace blkmirror::qcow2
