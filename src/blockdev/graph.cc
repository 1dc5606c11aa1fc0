#include "blockdev/graph.h"

#include <algorithm>

#include <fmt/format.h>

#include "base/assert.h"

namespace blkmirror {

Task<void> Node::drain() {
  BLKMIRROR_ASSERT_ON_LOOP();
  ++quiesce_;
  while (in_flight_ > 0) co_await changed_.wait();
}

void Node::undrain() {
  BLKMIRROR_ASSERT(quiesce_ > 0, "undrain() without a drain()");
  if (--quiesce_ == 0) changed_.notify_all();
}

Child::Child(Node* node, std::string role) : node_(node), role_(std::move(role)) {
  node_->parents_.push_back(this);
}

Child::~Child() {
  auto& p = node_->parents_;
  p.erase(std::remove(p.begin(), p.end(), this), p.end());
}

void Child::move_to(Node* n) {
  auto& p = node_->parents_;
  p.erase(std::remove(p.begin(), p.end(), this), p.end());
  node_ = n;
  node_->parents_.push_back(this);
}

Task<Node*> Child::enter() {
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

Task<Result<void>> Child::read(uint64_t off, std::span<std::byte> buf) {
  Node* n = co_await enter();
  auto r = co_await n->dev_->read(off, buf);
  leave(n);
  co_return r;
}

Task<Result<void>> Node::perform(const WriteRequest& req) {
  switch (req.kind) {
    case WriteRequest::Kind::kWrite:
      co_return co_await dev_->write(req.offset, req.data, req.wflags);
    case WriteRequest::Kind::kWriteZeroes:
      co_return co_await dev_->write_zeroes(req.offset, req.length, req.zflags);
    case WriteRequest::Kind::kDiscard:
      co_return co_await dev_->discard(req.offset, req.length);
  }
  co_return make_plain_error(EINVAL, "unknown write request");
}

Result<void> Node::set_interceptor(WriteInterceptor* i) {
  if (interceptor_ && interceptor_ != i)
    return make_plain_error(EBUSY, fmt::format("Node '{}' already has a write interceptor", name_));
  interceptor_ = i;
  return {};
}

Task<Result<void>> Child::submit(const WriteRequest& req) {
  Node* n = co_await enter();
  // if/else, not ?: (GCC 12 rule 1, base/task.h).
  Result<void> r;
  if (n->interceptor_)
    r = co_await n->interceptor_->intercept(*n, req);
  else
    r = co_await n->perform(req);
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
  Node* n = co_await enter();
  auto r = co_await n->dev_->flush();
  leave(n);
  co_return r;
}

Task<Result<Extent>> Child::block_status(uint64_t off, uint64_t len) {
  Node* n = co_await enter();
  auto r = co_await n->dev_->block_status(off, len);
  leave(n);
  co_return r;
}

Result<Node*> Graph::add(const std::string& name, BlockDevicePtr dev) {
  if (name.empty()) return make_plain_error(EINVAL, "Parameter 'node-name' must not be empty");
  if (nodes_.count(name)) return make_plain_error(EEXIST, fmt::format("Duplicate nodes with node-name='{}'", name));
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
  auto it = nodes_.find(name);
  if (it == nodes_.end()) return make_plain_error(ENOENT, fmt::format("Failed to find node with node-name='{}'", name));
  if (!it->second->parents_.empty())
    return make_plain_error(EBUSY, fmt::format("Node '{}' is busy: in use by {}", name,
                                         it->second->parents_.front()->role()));
  nodes_.erase(it);
  return {};
}

void Graph::replace(Node* from, Node* to, const std::vector<const Child*>& keep) {
  std::vector<Child*> moving;
  for (Child* c : from->parents_)
    if (std::find(keep.begin(), keep.end(), c) == keep.end()) moving.push_back(c);
  for (Child* c : moving) c->move_to(to);
}

std::vector<Node*> Graph::nodes() const {
  std::vector<Node*> out;
  for (auto& [_, n] : nodes_) out.push_back(n.get());
  return out;
}

}  // namespace blkmirror
