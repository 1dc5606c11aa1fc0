// The node graph. A Node is a named place in the graph holding a BlockDevice;
// parents (an NBD export, a job, an in-process client) reach nodes only through
// a Child edge. All I/O made through a Child goes through the node's request
// path, which:
//   - waits while the node is drained (quiesced), then re-reads which node the
//     edge points at, so a request queued across a switch-over lands on the new
//     node;
//   - counts requests in flight, so drain() knows when the node is idle;
//   - hands every write, write-zeroes and discard to the node's WriteInterceptor
//     when it has one (a mirror: in write-blocking mode it also writes the
//     target before the client's reply), else runs it on the device;
//   - records every write-type request that reached the device in the node's
//     named dirty bitmaps (bitmaps()), after the device ran it, whatever its
//     outcome (a failed write may have changed part of the range).
// Graph::replace() moves every parent of one node to another: the switch-over.
// A node may have a backing child (a qcow2 overlay's backing file): an edge like
// the others, which the node names so chain walkers can follow it.
//
// Permissions (permissions.h, docs/design/permissions.md): every edge says what
// its parent needs of the node and what it lets the node's other parents do.
// attach(), Child::set_perms() and replace() refuse a change that would leave a
// node with one parent needing what another does not share, with QEMU's
// "Permission conflict on node ..." text.
//
// Threading rule: loop thread only. Nodes are owned by the Graph; a Child must be
// destroyed before its Graph. Declare the Loop before the Graph (devices use the
// loop's I/O services), and finish jobs and stop servers before leaving, so no
// suspended coroutine still holds an edge when the Graph goes.
#pragma once

#include <cassert>
#include <array>
#include <cstdint>
#include <list>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "base/notifier.h"
#include "bitmap/bitmap_store.h"
#include "bitmap/named_bitmap.h"
#include "blockdev/block_device.h"
#include "base/op_stats.h"
#include "blockdev/permissions.h"

namespace blkmirror {

class Child;
class Graph;
class Node;

// Who holds an edge, for permission checks and their messages.
struct EdgeUse {
  std::string parent;  // as QEMU describes parents: "mirror job 'job0'", "NBD export 'disk'"
  std::string name;    // the child's name in its parent: "source", "target", "root", "file"
  Perms perms;         // EdgeKind::kRoot only; other kinds derive theirs
};

// Loop-thread-only checks: abort in debug and sanitizer builds (assert), free
// in release builds.
#define BLKMIRROR_ASSERT_THREAD(owner) assert((owner) == std::this_thread::get_id())

// One write-type request on its way to a node's device.
struct WriteRequest {
  enum class Kind { kWrite, kWriteZeroes, kDiscard };
  Kind kind = Kind::kWrite;
  uint64_t offset = 0, length = 0;
  std::span<const std::byte> data;  // kWrite: length bytes, outlive the request
  WriteFlags wflags;                // kWrite
  ZeroFlags zflags;                 // kWriteZeroes
};

// Something that takes part in every write to a node *before* the client's reply
// (the mirror job: dirty tracking, and in write-blocking mode the synchronous
// copy to its target). intercept() must run the request on the node's device
// exactly once, through Node::perform(), and return the result the client gets.
// It runs inside the request's in-flight accounting, so a drain waits for it.
// At most one interceptor per node.
class WriteInterceptor {
 public:
  virtual ~WriteInterceptor() = default;
  virtual Task<Result<void>> intercept(Node& node, const WriteRequest& req) = 0;
};

// Something that must know which bytes of a node changed while it looked at
// them (verify: a chunk written while it was being compared is compared
// again). Told of every write-type request made through the node's edges as
// it starts and again as it ends, whatever its result; a job's own direct
// device access (the mirror writing its target) is not a request through an
// edge. Called on the loop thread; must not suspend, nor add or remove
// observers from inside the call. Any number per node.
class WriteObserver {
 public:
  virtual ~WriteObserver() = default;
  virtual void write_started(const Node& node, uint64_t offset, uint64_t length) = 0;
  virtual void write_ended(const Node& node, uint64_t offset, uint64_t length) = 0;
};

class Node {
 public:
  Node(std::string name, BlockDevicePtr dev) : name_(std::move(name)), dev_(std::move(dev)) {}

  const std::string& name() const { return name_; }
  // Direct device access, bypassing drain and interceptor: for the job that owns
  // the node's contents (the mirror reading its source).
  BlockDevice& device() { return *dev_; }
  const BlockDevicePtr& device_ptr() const { return dev_; }
  uint64_t length() const { return dev_->length(); }

  // The backing child, or nullptr. The edge (role "backing of NAME") is owned by
  // whoever made the node, which clears it here before destroying it.
  Node* backing() const;
  Child* backing_edge() const { return backing_; }
  void set_backing_edge(Child* edge) { backing_ = edge; }
  // Errors: EBUSY when another interceptor is installed.
  Result<void> set_interceptor(WriteInterceptor* i);
  void clear_interceptor(WriteInterceptor* i) {
    if (interceptor_ == i) interceptor_ = nullptr;
  }
  // The observer stays registered until removed; remove it before it dies.
  void add_observer(WriteObserver* o) { observers_.push_back(o); }
  void remove_observer(WriteObserver* o) { std::erase(observers_, o); }
  // Runs req on the device, nothing else (no drain, no interceptor): for the
  // interceptor.
  Task<Result<void>> perform(const WriteRequest& req);

  // The node's named dirty bitmaps (block-dirty-bitmap-add). perform() records
  // into them; Child::resize() resizes them.
  BitmapSet& bitmaps() { return bitmaps_; }
  const BitmapSet& bitmaps() const { return bitmaps_; }
  // Where the node's persistent bitmaps are kept (its qcow2 image, a raw
  // image's side file), or nullptr: the node cannot store any. Set by whoever
  // opened the node, which also stores them before closing it.
  const BitmapStorePtr& bitmap_store() const { return bitmap_store_; }
  void set_bitmap_store(BitmapStorePtr s) { bitmap_store_ = std::move(s); }

  // Stops new requests from starting and waits for those in flight to finish.
  // Drains nest; each drain() needs one undrain().
  Task<void> drain();
  void undrain();
  bool drained() const { return quiesce_ > 0; }
  uint64_t in_flight() const { return in_flight_; }
  const std::vector<Child*>& parents() const { return parents_; }
  // Edges this node holds to other nodes (raw's file), adopted by Graph::adopt.
  const std::vector<Child*>& children() const { return children_; }
  // What the node's parents need together (ORed) and let others do (ANDed).
  Perms cumulative_perms() const;

  // Requests through the node's edges (its users: exports, clients, formats
  // above it), by kind; a job reading its source directly is not counted here
  // but in its own statistics.
  enum class Op { kRead, kWrite, kWriteZeroes, kDiscard, kFlush, kBlockStatus, kCount };
  const std::array<OpStats, static_cast<size_t>(Op::kCount)>& stats() const { return stats_; }

 private:
  friend class Child;
  friend class Graph;
  std::string name_;
  BlockDevicePtr dev_;
  WriteInterceptor* interceptor_ = nullptr;
  std::vector<WriteObserver*> observers_;
  std::vector<Child*> parents_;
  std::vector<Child*> children_;
  std::thread::id thread_ = std::this_thread::get_id();  // the loop thread
  Child* backing_ = nullptr;
  unsigned quiesce_ = 0;
  uint64_t in_flight_ = 0;
  Notifier changed_;  // in_flight_ reached 0, or the node was undrained
  std::array<OpStats, static_cast<size_t>(Op::kCount)> stats_{};
  BitmapSet bitmaps_;
  BitmapStorePtr bitmap_store_;
};

// A parent's edge to a node. Detaches itself on destruction.
class Child {
 public:
  // Made by Graph::attach / attach_child.
  Child(Graph* graph, Node* node, std::string role, EdgeUse use, EdgeKind kind = EdgeKind::kRoot);
  ~Child();
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;

  Node& node() const { return *node_; }
  const std::string& role() const { return role_; }
  const EdgeUse& use() const { return use_; }
  EdgeKind kind() const { return kind_; }
  // The node whose edge this is (kinds other than kRoot, once adopted).
  Node* owner() const { return owner_; }
  // What the edge needs and shares now: declared for kRoot, derived otherwise.
  Perms perms() const;
  // Changes a kRoot edge's permissions; refused (nothing changes) when another
  // parent of the node, or of a node below it, would conflict.
  Result<void> set_perms(Perms p);
  uint64_t length() const { return node_->length(); }
  const BlockCaps& caps() const { return node_->dev_->caps(); }

  Task<Result<void>> read(uint64_t off, std::span<std::byte> buf, ReadFlags f = {});
  Task<Result<void>> write(uint64_t off, std::span<const std::byte> buf, WriteFlags f = {});
  Task<Result<void>> write_zeroes(uint64_t off, uint64_t len, ZeroFlags f = {});
  Task<Result<void>> discard(uint64_t off, uint64_t len);
  Task<Result<void>> flush();
  Task<Result<Extent>> block_status(uint64_t off, uint64_t len);
  // Changes the node's length (a format driver growing its image file).
  Task<Result<void>> resize(uint64_t new_length);

 private:
  friend class Graph;
  // Waits out a drain and registers a request on the node the edge points at now.
  Task<Node*> enter();
  void leave(Node* n);
  Task<Result<void>> submit(const WriteRequest& req);
  void move_to(Node* n);

  Graph* graph_;
  Node* node_;
  std::string role_;
  EdgeUse use_;
  EdgeKind kind_;
  Node* owner_ = nullptr;
};

class Graph {
 public:
  // Errors: EEXIST for a taken name, EINVAL for an empty one.
  Result<Node*> add(const std::string& name, BlockDevicePtr dev);
  Node* find(const std::string& name) const;
  // Refuses (EBUSY) a node that still has parents.
  Result<void> remove(const std::string& name);
  // An edge from outside the graph (an export, a job), checked against the
  // node's other parents. Errors: EPERM with QEMU's "Permission conflict" text.
  Result<std::unique_ptr<Child>> attach(Node* node, std::string role, EdgeUse use);
  // An edge that needs consistent read and write and shares everything (an
  // in-process client: demo, tests). REQUIRES: no conflict (asserted).
  std::unique_ptr<Child> attach(Node* node, std::string role);
  // An edge a node will hold to its child (raw's file): it needs nothing until
  // adopt() gives it an owner whose parents need something.
  std::unique_ptr<Child> attach_child(Node* child, std::string role, EdgeUse use, EdgeKind kind);
  // Makes `owner` the holder of `edge`. REQUIRES: owner has no parents yet (a
  // node just added), so nothing can conflict.
  void adopt(Node* owner, Child* edge);
  // Moves every parent of `from` except those in `keep` to `to`, unless that
  // would conflict (EPERM, nothing moved). Edges held by `to` or a node below
  // it stay where they are: moving them would make a loop.
  // REQUIRES: both nodes drained by the caller, so no request is mid-flight.
  Result<void> replace(Node* from, Node* to, const std::vector<const Child*>& keep);
  std::vector<Node*> nodes() const;
  // Every node's parents agree (the first conflict found, as QEMU words it).
  Result<void> check_perms() const;

 private:
  std::map<std::string, std::unique_ptr<Node>> nodes_;
  std::thread::id thread_ = std::this_thread::get_id();
};

// The edge a job holds to n (jobs name their edges "job <id>"), or nullptr. A
// node a job holds is busy: another job may not use it.
const Child* job_edge(const Node& n);

// The message for a node busy with the job holding `edge` (QEMU's op blockers').
std::string busy_message(const Node& n, const Child& edge);

}  // namespace blkmirror
