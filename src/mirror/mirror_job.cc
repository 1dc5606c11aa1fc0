#include "mirror/mirror_job.h"

#include <algorithm>

#include <fmt/format.h>

#include "base/assert.h"

namespace blkmirror {

namespace {

std::string node_not_found(const std::string& name) {
  return fmt::format("Cannot find device='{}' nor node-name='{}'", name, name);
}

// A node is busy when a job already holds an edge to it.
const Child* job_edge(const Node& n) {
  for (const Child* c : n.parents())
    if (c->role().rfind("job ", 0) == 0) return c;
  return nullptr;
}

}  // namespace

Result<std::shared_ptr<MirrorJob>> MirrorJob::create(Loop& loop, Graph& graph, MirrorParams p) {
  if (auto r = validate_params(p); !r) return make_error(r.error());
  Node* src = graph.find(p.device);
  if (!src) return make_plain_error(ENOENT, node_not_found(p.device));
  Node* tgt = graph.find(p.target);
  if (!tgt) return make_plain_error(ENOENT, node_not_found(p.target));
  if (src == tgt) return make_plain_error(EINVAL, "Can't mirror node into itself");
  Node* replaces = src;
  if (p.replaces) {
    replaces = graph.find(*p.replaces);
    if (!replaces) return make_plain_error(ENOENT, fmt::format("Node name '{}' not found", *p.replaces));
  }
  for (Node* n : {src, tgt}) {
    if (const Child* c = job_edge(*n))
      return make_plain_error(EBUSY, fmt::format("Node '{}' is busy: block device is in use by {}",
                                           n->name(), c->role()));
  }
  if (tgt->device().caps().read_only)
    return make_plain_error(EROFS, fmt::format("Target node '{}' is read-only", tgt->name()));
  if (src->length() != tgt->length())
    return make_plain_error(EINVAL, "Source and target image have different sizes");
  if (p.job_id.empty()) p.job_id = p.device;
  // One bit per chunk: refuse a bitmap that would not fit rather than fail an
  // allocation (a 1 PiB node at 512-byte chunks would need 256 GiB).
  MirrorSizes sizes = derive_sizes(p, tgt->device().caps().cluster_size);
  uint64_t gran = sizes.granularity;
  if (uint64_t bytes = div_round_up(src->length(), gran) / 8; bytes > kMaxBitmapBytes)
    return make_plain_error(EFBIG, fmt::format("A {}-byte disk needs a {}-byte dirty bitmap at granularity {}; "
                                               "use a larger granularity",
                                               src->length(), bytes, gran));
  return std::shared_ptr<MirrorJob>(
      new MirrorJob(loop, graph, std::move(p), sizes, src, tgt, replaces));
}

MirrorJob::MirrorJob(Loop& loop, Graph& graph, MirrorParams p, MirrorSizes sizes, Node* src,
                     Node* tgt, Node* replaces)
    : Job(p.job_id, "mirror", p.device, p.auto_finalize, p.auto_dismiss),
      loop_(loop),
      graph_(graph),
      p_(std::move(p)),
      src_node_(src),
      tgt_node_(tgt),
      replaces_node_(replaces),
      src_edge_(graph.attach(src, "job " + p_.job_id)),
      tgt_edge_(graph.attach(tgt, "job " + p_.job_id)),
      src_(src->device()),
      tgt_(tgt->device()),
      length_(src->length()),
      gran_(sizes.granularity),
      buf_size_(sizes.buf_size),
      max_op_(sizes.max_op),
      dirty_(div_round_up(length_, gran_)),
      mode_(p_.copy_mode),
      adaptive_(p_.adaptive_window_ms),
      pool_(max_op_, buf_size_ / max_op_ + 1) {
  auto s = src_.file_span(), t = tgt_.file_span();
  if (p_.copy_offload && s && t && s->fs_dev == t->fs_dev) offload_ = Offload{*s, *t};
  rate_.set_speed(static_cast<uint64_t>(p_.speed));
  // create() refused a node another job holds, so the slot is free.
  (void)src_node_->set_interceptor(this);
}

MirrorJob::~MirrorJob() { detach(); }

void MirrorJob::detach() {
  if (!attached_) return;
  attached_ = false;
  src_node_->clear_interceptor(this);
}

void MirrorJob::mark_dirty(uint64_t off, uint64_t len) {
  if (len == 0 || off >= length_) return;
  uint64_t end = std::min(off + len, length_);
  uint64_t first = off / gran_, last = div_round_up(end, gran_);
  dirty_.set(first, last - first);
}

ByteRange MirrorJob::chunk_bytes(uint64_t first, uint64_t end) const {
  uint64_t off = first * gran_;
  return {off, std::min(end * gran_, length_) - off};
}

uint64_t MirrorJob::dirty_bytes() const {
  uint64_t bytes = dirty_.count() * gran_;
  // The last chunk may be short.
  uint64_t n = dirty_.size();
  if (n > 0 && dirty_.test(n - 1)) bytes -= n * gran_ - length_;
  return bytes;
}

uint64_t MirrorJob::progress_len() const {
  uint64_t in_flight = 0;
  for (auto& op : in_flight_) in_flight += op.range.length;
  return progress_offset_ + dirty_bytes() + in_flight + active_bytes_;
}

void MirrorJob::update_len() { progress_len_ = progress_len(); }

JobInfo MirrorJob::info() const {
  // Fresh, not the last update_len(): client writes dirty chunks in between.
  JobInfo i = Job::info();
  i.len = progress_len();
  i.actively_synced = actively_synced();
  return i;
}

Result<void> MirrorJob::on_complete() {
  if (p_.replaces && !graph_.find(*p_.replaces))
    return make_plain_error(ENOENT, fmt::format("Node name '{}' not found", *p_.replaces));
  should_complete_ = true;
  swap_on_finish_ = true;
  return {};
}

bool MirrorJob::on_soft_cancel() {
  // After ready, a soft cancel finishes the final sync and leaves the target a
  // consistent point-in-time copy, without the swap.
  should_complete_ = true;
  swap_on_finish_ = false;
  return true;
}

Task<void> MirrorJob::wait_idle() {
  while (!in_flight_.empty()) co_await wake_.wait();
}

Task<void> MirrorJob::drain_sources() {
  co_await src_node_->drain();
  if (replaces_node_ != src_node_) co_await replaces_node_->drain();
  drained_ = true;
}

void MirrorJob::undrain_sources() {
  if (!drained_) return;
  drained_ = false;
  if (replaces_node_ != src_node_) replaces_node_->undrain();
  src_node_->undrain();
}

Task<Result<void>> MirrorJob::run() {
  if (auto r = co_await dirty_init(); !r) co_return r;
  for (;;) {
    update_len();
    if (fatal_) {
      co_await wait_idle();
      undrain_sources();
      co_return make_error(*fatal_);
    }
    if (cancel_requested()) {
      co_await wait_idle();
      undrain_sources();
      co_return Result<void>{};
    }
    if (pause_requested()) {
      // Nothing moves while paused: let running operations finish first, and
      // never keep clients drained across a pause.
      co_await wait_idle();
      undrain_sources();
      update_len();
      BLKMIRROR_ASSERT(in_flight_.empty() && !drained_, "paused with I/O in flight or drained");
      co_await pause_point();
      adaptive_.restart();  // a pause is not a failure to converge
      continue;
    }
    check_adaptive();
    if (dirty_.count() > 0) {
      if (auto d = rate_.delay(); d > RateLimiter::Clock::duration::zero()) {
        co_await wake_.wait(d);
        continue;
      }
      if (launch_next()) continue;
      co_await wake_.wait();  // every dirty chunk is in flight, or the buffer is full
      continue;
    }
    if (!in_flight_.empty()) {
      co_await wake_.wait();
      continue;
    }
    // Nothing dirty, nothing in flight: source and target agree.
    if (!synced_) {
      if (auto f = co_await tgt_.flush(); !f) {
        on_op_error(f.error(), false);
        continue;
      }
      synced_ = true;
      set_ready();
      continue;
    }
    if (should_complete_) {
      if (!drained_) {
        // Stop client I/O on the source, then loop to copy what is still dirty.
        co_await drain_sources();
        continue;
      }
      if (auto f = co_await tgt_.flush(); !f) {
        undrain_sources();
        on_op_error(f.error(), false);
        continue;
      }
      co_return Result<void>{};  // stays drained until commit() or abort()
    }
    note_synced_state();
    co_await wake_.wait();
  }
}

Task<void> MirrorJob::commit() {
  if (swap_on_finish_) {
    graph_.replace(replaces_node_, tgt_node_, {src_edge_.get(), tgt_edge_.get()});
    switched_ = true;
  }
  detach();
  undrain_sources();
  co_return;
}

Task<void> MirrorJob::abort() {
  co_await wait_idle();
  detach();
  // Client writes the job saw finish before it reports the end: no target write
  // after BLOCK_JOB_CANCELLED / COMPLETED.
  while (intercepts_ > 0) co_await intercepts_done_.wait();
  undrain_sources();
}

}  // namespace blkmirror
