#include "blockdev/graph.h"

#include <algorithm>
#include <cstdlib>

#include <fmt/format.h>

#include "base/assert.h"

namespace blkmirror {

Node* Node::backing() const { return backing_ ? &backing_->node() : nullptr; }

Task<void> Node::drain() {
  BLKMIRROR_ASSERT_ON_LOOP();
  ++quiesce_;
  while (in_flight_ > 0) co_await changed_.wait();
}

void Node::undrain() {
  BLKMIRROR_ASSERT(quiesce_ > 0, "undrain() without a drain()");
  if (--quiesce_ == 0) changed_.notify_all();
}

Perms Node::cumulative_perms() const {
  Perms all{0, kPermAll};
  for (const Child* c : parents_) {
    Perms p = c->perms();
    all.need |= p.need;
    all.shared &= p.shared;
  }
  return all;
}

Child::Child(Graph* graph, Node* node, std::string role, EdgeUse use, EdgeKind kind)
    : graph_(graph), node_(node), role_(std::move(role)), use_(std::move(use)), kind_(kind) {
  BLKMIRROR_ASSERT_THREAD(node_->thread_);
  node_->parents_.push_back(this);
}

Child::~Child() {
  BLKMIRROR_ASSERT_THREAD(node_->thread_);
  auto& p = node_->parents_;
  p.erase(std::remove(p.begin(), p.end(), this), p.end());
  if (owner_) {
    auto& c = owner_->children_;
    c.erase(std::remove(c.begin(), c.end(), this), c.end());
  }
}

Perms Child::perms() const {
  if (kind_ == EdgeKind::kRoot) return use_.perms;
  if (!owner_) return Perms{};  // not adopted yet: nobody reaches the node through it
  return derive_child_perms(kind_, owner_->cumulative_perms(), !owner_->device().caps().read_only);
}

namespace {

// QEMU's bdrv_a_allow_b: b needs nothing that a does not share.
Result<void> a_allows_b(const Node& n, const Child& a, const Child& b) {
  uint32_t denied = b.perms().need & ~a.perms().shared;
  if (!denied) return {};
  return make_plain_error(
      EPERM,
      fmt::format(
          "Permission conflict on node '{}': permissions '{}' are both required by {} "
          "(uses node '{}' as '{}' child) and unshared by {} (uses node '{}' as '{}' child).",
          n.name(), perm_names(denied), b.use().parent, n.name(), b.use().name, a.use().parent,
          n.name(), a.use().name));
}

}  // namespace

Result<void> Graph::check_perms() const {
  BLKMIRROR_ASSERT_THREAD(thread_);
  for (const auto& [_, n] : nodes_) {
    // Newest parent first, as QEMU walks its parent list: a conflict caused by
    // a new edge then reads "required by <new> ... unshared by <old>".
    const auto& ps = n->parents_;
    for (auto a = ps.rbegin(); a != ps.rend(); ++a)
      for (auto b = ps.rbegin(); b != ps.rend(); ++b)
        if (a != b)
          if (auto r = a_allows_b(*n, **a, **b); !r) return r;
  }
  return {};
}

Result<void> Child::set_perms(Perms p) {
  BLKMIRROR_ASSERT_THREAD(node_->thread_);
  assert(kind_ == EdgeKind::kRoot);
  Perms old = use_.perms;
  use_.perms = p;
  // The whole graph is checked: the change also reaches the nodes below this
  // one through their derived edges. Graphs here have a handful of nodes.
  if (auto r = graph_->check_perms(); !r) {
    use_.perms = old;
    return r;
  }
  return {};
}

void Child::move_to(Node* n) {
  auto& p = node_->parents_;
  p.erase(std::remove(p.begin(), p.end(), this), p.end());
  node_ = n;
  node_->parents_.push_back(this);
}

Task<Node*> Child::enter() {
  BLKMIRROR_ASSERT_THREAD(node_->thread_);
  // Re-read node_ after every wait: a switch-over may have moved this edge.
  while (node_->quiesce_ > 0) co_await node_->changed_.wait();
  Node* n = node_;
  ++n->in_flight_;
  co_return n;
}

void Child::leave(Node* n) {
  BLKMIRROR_ASSERT(n->in_flight_ > 0, "node requests in flight below zero");
  if (--n->in_flight_ == 0) n->changed_.notify_all();
}

namespace {

using StatClock = std::chrono::steady_clock;

void count(std::array<OpStats, static_cast<size_t>(Node::Op::kCount)>& stats, Node::Op op,
           uint64_t bytes, StatClock::time_point start, bool ok) {
  stats[static_cast<size_t>(op)].record(bytes, StatClock::now() - start, ok);
}

Node::Op op_of(WriteRequest::Kind k) {
  switch (k) {
    case WriteRequest::Kind::kWrite: return Node::Op::kWrite;
    case WriteRequest::Kind::kWriteZeroes: return Node::Op::kWriteZeroes;
    case WriteRequest::Kind::kDiscard: return Node::Op::kDiscard;
  }
  return Node::Op::kWrite;
}

}  // namespace

Task<Result<void>> Child::read(uint64_t off, std::span<std::byte> buf, ReadFlags f) {
  const auto start = StatClock::now();
  Node* n = co_await enter();
  auto r = co_await n->dev_->read(off, buf, f);
  count(n->stats_, Node::Op::kRead, buf.size(), start, r.has_value());
  leave(n);
  co_return r;
}

Task<Result<void>> Node::perform(const WriteRequest& req) {
  Result<void> r;
  switch (req.kind) {
    case WriteRequest::Kind::kWrite:
      r = co_await dev_->write(req.offset, req.data, req.wflags);
      break;
    case WriteRequest::Kind::kWriteZeroes:
      r = co_await dev_->write_zeroes(req.offset, req.length, req.zflags);
      break;
    case WriteRequest::Kind::kDiscard:
      r = co_await dev_->discard(req.offset, req.length);
      break;
    default:
      co_return make_plain_error(EINVAL, "unknown write request");
  }
  // Even a failed request may have changed part of its range: mark it either way.
  bitmaps_.record(req.offset, req.length);
  co_return r;
}

Result<void> Node::set_interceptor(WriteInterceptor* i) {
  if (interceptor_ && interceptor_ != i)
    return make_plain_error(EBUSY, fmt::format("Node '{}' already has a write interceptor", name_));
  interceptor_ = i;
  return {};
}

Task<Result<void>> Child::submit(const WriteRequest& req) {
  const auto start = StatClock::now();
  Node* n = co_await enter();
  for (WriteObserver* o : n->observers_) o->write_started(*n, req.offset, req.length);
  // if/else, not ?: (GCC 12 rule 1, base/task.h).
  Result<void> r;
  if (n->interceptor_)
    r = co_await n->interceptor_->intercept(*n, req);
  else
    r = co_await n->perform(req);
  // An observer added meanwhile sees an end without a start.
  for (WriteObserver* o : n->observers_) o->write_ended(*n, req.offset, req.length);
  count(n->stats_, op_of(req.kind), req.length, start, r.has_value());
  leave(n);
  co_return r;
}

Task<Result<void>> Child::write(uint64_t off, std::span<const std::byte> buf, WriteFlags f) {
  WriteRequest req;
  req.kind = WriteRequest::Kind::kWrite;
  req.offset = off;
  req.length = buf.size();
  req.data = buf;
  req.wflags = f;
  co_return co_await submit(req);
}

Task<Result<void>> Child::write_zeroes(uint64_t off, uint64_t len, ZeroFlags f) {
  WriteRequest req;
  req.kind = WriteRequest::Kind::kWriteZeroes;
  req.offset = off;
  req.length = len;
  req.zflags = f;
  co_return co_await submit(req);
}

Task<Result<void>> Child::discard(uint64_t off, uint64_t len) {
  WriteRequest req;
  req.kind = WriteRequest::Kind::kDiscard;
  req.offset = off;
  req.length = len;
  co_return co_await submit(req);
}

Task<Result<void>> Child::flush() {
  const auto start = StatClock::now();
  Node* n = co_await enter();
  auto r = co_await n->dev_->flush();
  count(n->stats_, Node::Op::kFlush, 0, start, r.has_value());
  leave(n);
  co_return r;
}

Task<Result<Extent>> Child::block_status(uint64_t off, uint64_t len) {
  const auto start = StatClock::now();
  Node* n = co_await enter();
  auto r = co_await n->dev_->block_status(off, len);
  count(n->stats_, Node::Op::kBlockStatus, 0, start, r.has_value());
  leave(n);
  co_return r;
}

Task<Result<void>> Child::resize(uint64_t new_length) {
  Node* n = co_await enter();
  auto r = co_await n->dev_->resize(new_length);
  if (r) n->bitmaps_.resize(n->dev_->length());
  leave(n);
  co_return r;
}

Result<Node*> Graph::add(const std::string& name, BlockDevicePtr dev) {
  BLKMIRROR_ASSERT_THREAD(thread_);
  if (name.empty()) return make_plain_error(EINVAL, "Parameter 'node-name' must not be empty");
  if (nodes_.count(name))
    return make_plain_error(EEXIST, fmt::format("Duplicate nodes with node-name='{}'", name));
  auto node = std::make_unique<Node>(name, std::move(dev));
  Node* raw = node.get();
  nodes_.emplace(name, std::move(node));
  return raw;
}

Node* Graph::find(const std::string& name) const {
  auto it = nodes_.find(name);
  return it == nodes_.end() ? nullptr : it->second.get();
}

Result<void> Graph::remove(const std::string& name) {
  BLKMIRROR_ASSERT_THREAD(thread_);
  auto it = nodes_.find(name);
  if (it == nodes_.end())
    return make_plain_error(ENOENT, fmt::format("Failed to find node with node-name='{}'", name));
  if (!it->second->parents_.empty())
    return make_plain_error(EBUSY, fmt::format("Node '{}' is busy: in use by {}", name,
                                         it->second->parents_.front()->role()));
  for (Child* c : it->second->children_) c->owner_ = nullptr;
  nodes_.erase(it);
  return {};
}

Result<std::unique_ptr<Child>> Graph::attach(Node* node, std::string role, EdgeUse use) {
  BLKMIRROR_ASSERT_THREAD(thread_);
  auto edge = std::make_unique<Child>(this, node, std::move(role), std::move(use));
  if (auto r = check_perms(); !r) return make_error(r.error());  // the edge detaches as it goes
  return edge;
}

std::unique_ptr<Child> Graph::attach(Node* node, std::string role) {
  EdgeUse use{role, "root", Perms{kPermConsistentRead | kPermWrite, kPermAll}};
  auto edge = attach(node, std::move(role), std::move(use));
  assert(edge && "an in-process client edge conflicts with another parent");
  if (!edge) std::abort();
  return std::move(*edge);
}

std::unique_ptr<Child> Graph::attach_child(Node* child, std::string role, EdgeUse use,
                                           EdgeKind kind) {
  BLKMIRROR_ASSERT_THREAD(thread_);
  assert(kind != EdgeKind::kRoot);
  return std::make_unique<Child>(this, child, std::move(role), std::move(use), kind);
}

void Graph::adopt(Node* owner, Child* edge) {
  BLKMIRROR_ASSERT_THREAD(thread_);
  assert(owner->parents_.empty() && !edge->owner_ && edge->kind_ != EdgeKind::kRoot);
  edge->owner_ = owner;
  owner->children_.push_back(edge);
}

namespace {

// n is top or a node below it (through the edges nodes hold to their children).
bool reaches(const Node* top, const Node* n) {
  if (top == n) return true;
  for (const Child* c : top->children())
    if (reaches(&c->node(), n)) return true;
  return false;
}

}  // namespace

Result<void> Graph::replace(Node* from, Node* to, const std::vector<const Child*>& keep) {
  BLKMIRROR_ASSERT_THREAD(thread_);
  // A request mid-flight would finish on the node it started on, after its
  // edge already points elsewhere.
  assert(from->drained() && to->drained() && "Graph::replace REQUIRES both nodes drained");
  assert(from->in_flight_ == 0 && to->in_flight_ == 0);
  std::vector<Child*> moving;
  for (Child* c : from->parents_) {
    if (std::find(keep.begin(), keep.end(), c) != keep.end()) continue;
    // An edge held by `to` or a node below it stays: moved, it would make
    // `to` its own descendant (a loop every read would follow forever), as
    // when a drive-mirror sync=none target reads through its source. QEMU's
    // should_update_child() leaves such edges alone too.
    if (c->owner() && reaches(to, c->owner())) continue;
    moving.push_back(c);
  }
  for (Child* c : moving) c->move_to(to);
  if (auto r = check_perms(); !r) {
    for (Child* c : moving) c->move_to(from);
    return r;
  }
  return {};
}

std::vector<Node*> Graph::nodes() const {
  BLKMIRROR_ASSERT_THREAD(thread_);
  std::vector<Node*> out;
  for (auto& [_, n] : nodes_) out.push_back(n.get());
  return out;
}

const Child* job_edge(const Node& n) {
  for (const Child* c : n.parents())
    if (c->role().rfind("job ", 0) == 0) return c;
  return nullptr;
}

std::string busy_message(const Node& n, const Child& edge) {
  return fmt::format("Node '{}' is busy: block device is in use by {}", n.name(), edge.role());
}

}  // namespace blkmirror
