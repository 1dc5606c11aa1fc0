#include "mirror/mirror_job.h"

#include <algorithm>

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>

#include <fmt/format.h>

#include "base/assert.h"

namespace blkmirror {

namespace {

std::string node_not_found(const std::string& name) {
  return fmt::format("Cannot find device='{}' nor node-name='{}'", name, name);
}

// What the job's target edge lets others do: read it (a read-only export
// watching the copy; QEMU refuses even that) and writes that change nothing.
// Never other writers or a resize: the copy would no longer match the source.
constexpr uint32_t kTargetShared = kPermConsistentRead | kPermWriteUnchanged;

// True when `below` is `top` or a node `top` reaches through filter edges only
// (raw, blkdebug): its visible data is top's, so swapping it for a copy of top
// changes nothing a reader sees. QEMU's bdrv_recurse_can_replace.
bool carries_data_of(const Node* top, const Node* below) {
  for (const Node* n = top; n;) {
    if (n == below) return true;
    const Node* next = nullptr;
    for (const Child* c : n->children())
      if (c->kind() == EdgeKind::kFilteredFile) next = &c->node();
    n = next;
  }
  return false;
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
    if (!replaces)
      return make_plain_error(ENOENT, fmt::format("Node name '{}' not found", *p.replaces));
    if (!carries_data_of(src, replaces))
      return make_plain_error(
          EINVAL, fmt::format("Cannot replace '{}' by a node mirrored from '{}', because it "
                              "cannot be guaranteed that doing so would not lead to an "
                              "abrupt change of visible data",
                              replaces->name(), src->name()));
  }
  for (Node* n : {src, tgt}) {
    if (const Child* c = job_edge(*n)) return make_plain_error(EBUSY, busy_message(*n, *c));
  }
  if (tgt->device().caps().read_only)
    return make_plain_error(EROFS, fmt::format("Target node '{}' is read-only", tgt->name()));
  // Active commit: the base's depth in the source's chain (the source is 1).
  uint32_t base_depth = 0;
  std::vector<Node*> between;  // the layers strictly between source and base
  if (p.commit) {
    uint32_t d = 1;
    for (Node* n = src->backing(); n; n = n->backing()) {
      ++d;
      if (n == tgt) {
        base_depth = d;
        break;
      }
      between.push_back(n);
    }
    if (!base_depth)
      return make_plain_error(
          EINVAL, fmt::format("'{}' is not in this backing file chain", tgt->name()));
    for (Node* n : between) {
      if (const Child* c = job_edge(*n)) return make_plain_error(EBUSY, busy_message(*n, *c));
    }
  } else if (src->length() != tgt->length()) {
    return make_plain_error(EINVAL, "Source and target image have different sizes");
  }
  // A base smaller than the source grows before the copy (QEMU's commit does);
  // a larger one keeps its size.
  const bool grow = p.commit && tgt->length() < src->length();
  if (p.job_id.empty()) p.job_id = p.device;
  // One bit per chunk: refuse a bitmap that would not fit rather than fail an
  // allocation (a 1 PiB node at 512-byte chunks would need 256 GiB).
  MirrorSizes sizes = derive_sizes(p, tgt->device().caps().cluster_size, src->length());
  uint64_t gran = sizes.granularity;
  if (uint64_t bytes = div_round_up(src->length(), gran) / 8; bytes > kMaxBitmapBytes)
    return make_plain_error(
        EFBIG, fmt::format("A {}-byte disk needs a {}-byte dirty bitmap at granularity {}; "
                           "use a larger granularity",
                           src->length(), bytes, gran));
  NamedBitmap* sync_bitmap = nullptr;
  if (p.sync == SyncMode::kBitmap) {
    sync_bitmap = src->bitmaps().find(p.bitmap);
    if (!sync_bitmap)
      return make_plain_error(ENOENT, fmt::format("Bitmap '{}' could not be found", p.bitmap));
    if (sync_bitmap->busy)
      return make_plain_error(
          EBUSY, fmt::format("Bitmap '{}' is currently in use by another operation and cannot "
                             "be used",
                             p.bitmap));
    if (sync_bitmap->inconsistent)
      return make_plain_error(
          EINVAL, fmt::format("Bitmap '{}' is inconsistent and cannot be used", p.bitmap));
    // on-success clears it: not a bitmap of a read-only image (QEMU's check).
    if (sync_bitmap->read_only && p.bitmap_mode != BitmapMode::kNever)
      return make_plain_error(
          EROFS, fmt::format("Bitmap '{}' is readonly and cannot be modified", p.bitmap));
  }
  // The edges last: a permission conflict refuses the job before anything else
  // happened (the edges made so far detach as they go).
  const std::string who = fmt::format("mirror job '{}'", p.job_id);
  const std::string role = "job " + p.job_id;
  Edges edges;
  auto s = graph.attach(
      src, role, EdgeUse{who, "source", Perms{kPermConsistentRead, kPermAll & ~kPermResize}});
  if (!s) return make_error(s.error());
  edges.src = std::move(*s);
  auto t = graph.attach(
      tgt, role,
      EdgeUse{who, p.commit ? "base" : "target",
              Perms{kPermWrite | (grow ? kPermResize : 0u), kTargetShared}});
  if (!t) return make_error(t.error());
  edges.tgt = std::move(*t);
  // The layers being committed: busy for other jobs and blockdev-del while the
  // job runs (QEMU blocks them as commit targets); the job needs nothing of them.
  for (Node* n : between) {
    auto b = graph.attach(n, role, EdgeUse{who, "intermediate layer", Perms{0, kPermAll}});
    if (!b) return make_error(b.error());
    edges.between.push_back(std::move(*b));
  }
  if (replaces != src) {
    auto r = graph.attach(replaces, role, EdgeUse{who, "replaced node", Perms{0, kPermAll}});
    if (!r) return make_error(r.error());
    edges.replaces = std::move(*r);
  }
  auto job = std::shared_ptr<MirrorJob>(new MirrorJob(loop, graph, std::move(p), sizes, src, tgt,
                                                      replaces, base_depth, std::move(edges)));
  // Busy while the job runs: QMP may not clear, merge into or remove it.
  if (sync_bitmap) {
    sync_bitmap->busy = true;
    job->sync_bitmap_ = sync_bitmap;
  }
  return job;
}

MirrorJob::MirrorJob(Loop& loop, Graph& graph, MirrorParams p, MirrorSizes sizes, Node* src,
                     Node* tgt, Node* replaces, uint32_t base_depth, Edges edges)
    : Job(p.job_id, p.commit ? "commit" : "mirror", p.device, p.auto_finalize, p.auto_dismiss),
      loop_(loop),
      graph_(graph),
      p_(std::move(p)),
      src_node_(src),
      tgt_node_(tgt),
      replaces_node_(replaces),
      src_edge_(std::move(edges.src)),
      tgt_edge_(std::move(edges.tgt)),
      replaces_edge_(std::move(edges.replaces)),
      between_edges_(std::move(edges.between)),
      tracker_(std::make_shared<TargetTracker>(
          tgt->device_ptr(),
          sizes.granularity,
          [this](uint64_t off, uint64_t len) {
            mark_dirty(off, len);
            touch(off, len);  // not durable on the target after all: no clearing now
            wake_.notify_all();
          },
          TargetTracker::kCheckpoint, src->length())),
      src_(src->device()),
      tgt_(*tracker_),
      length_(src->length()),
      gran_(sizes.granularity),
      buf_size_(sizes.buf_size),
      max_op_(sizes.max_op),
      base_depth_(base_depth),
      // A commit's base reads its own backing file's data, which is already
      // the chain's: no padding needed there.
      cow_cluster_(!p_.commit && tgt->device().caps().has_backing &&
                           tgt->device().caps().cluster_size > gran_
                       ? tgt->device().caps().cluster_size
                       : 0),
      cow_written_(cow_cluster_ ? div_round_up(length_, cow_cluster_) : 0),
      dirty_(div_round_up(length_, gran_)),
      mode_(p_.copy_mode),
      target_sized_(tgt->length() >= length_),
      adaptive_(p_.adaptive_window_ms),
      pool_(max_op_, buf_size_ / max_op_ + 1),
      journal_(p_.journal),
      touched_(journal_ ? journal_->extents() : 0) {
  // The target's own device, not the tracker: offload needs a local file,
  // which never reconnects, so copies the tracker does not see are safe.
  // A kernel copy that moves data (no reflink: ext4) goes through the page
  // cache on both sides and leaves its large folios there, under the clients'
  // small writes; where the source can be read uncached, reading and writing
  // uncached costs an idle copy about as much and a live one's clients far
  // less (docs/design/data-path.md, "The copy's page cache"). So the kernel
  // copies only what it can share, or where nothing can be kept out (tmpfs).
  auto s = src_.file_span(), t = tgt->device().file_span();
  if (p_.copy_offload && s && t && s->fs_dev == t->fs_dev &&
      (s->reflink || !src_.caps().uncached_io))
    offload_ = Offload{*s, *t};
  rate_.set_speed(static_cast<uint64_t>(p_.speed));
  // A buf-size the user gave is never overridden.
  if (p_.buf_size == 0)
    depth_.emplace(buf_size_, std::max(max_buf_size(), buf_size_), std::min(max_op_, buf_size_));
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
  if (auto r = check_still_replaceable(); !r) return r;
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

Task<Result<void>> MirrorJob::check_devices() {
  // One call per device, no temporaries across co_await (GCC 12 coroutines).
  auto r = co_await src_.check_unchanged();
  if (!r) co_return make_plain_error(r.error().errnum(), "source " + r.error().message());
  r = co_await tgt_.check_unchanged();
  if (!r) co_return make_plain_error(r.error().errnum(), "target " + r.error().message());
  co_return Result<void>{};
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
  // A client write that reached the source before the interceptor was
  // installed is not marked dirty; once it finishes, dirty init's block status
  // sees it. Wait for such writes (the node's in-flight requests) first:
  // otherwise sync=top can read "not in the top layer" for a cluster a write
  // is still allocating there, and never copy it.
  co_await src_node_->drain();
  src_node_->undrain();
  if (auto r = co_await grow_base(); !r) co_return r;
  if (auto r = co_await dirty_init(); !r) co_return r;
  if (journal_)
    asio::co_spawn(loop_.executor(),
                   run_checkpoints(std::static_pointer_cast<MirrorJob>(shared_from_this())),
                   asio::detached);
  for (;;) {
    update_len();
    if (!fatal_ && tracker_->fatal()) fatal_ = *tracker_->fatal();
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
    adjust_depth();
    // Operations failed under `ignore` and nothing has succeeded since: wait
    // before retrying (a success elsewhere ends the hold at once).
    if (auto hold = backoff_.hold(RetryBackoff::Clock::now());
        hold > RetryBackoff::Clock::duration::zero()) {
      co_await wake_.wait(hold);
      continue;
    }
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
      on_op_success();
      // Ready promises a copy where the user asked for it: both disks must
      // still be the files opened, at the length copied.
      if (auto c = co_await check_devices(); !c) {
        fatal_ = c.error();
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
      if (auto c = co_await check_devices(); !c) {
        fatal_ = c.error();
        continue;
      }
      co_return Result<void>{};  // stays drained until commit() or abort()
    }
    note_synced_state();
    co_await wake_.wait();
  }
}

Task<Result<void>> MirrorJob::grow_base() {
  if (!p_.commit || tgt_node_->length() >= length_) co_return Result<void>{};
  // Through the job's own edge, which asked for resize when the job was made.
  auto r = co_await tgt_edge_->resize(length_);
  target_sized_ = r.has_value();
  if (!r)
    co_return make_plain_error(r.error().errnum(),
                               fmt::format("Could not grow base '{}' to {} bytes: {}",
                                           tgt_node_->name(), length_, r.error().message()));
  co_return Result<void>{};
}

Result<void> MirrorJob::check_still_replaceable() const {
  if (carries_data_of(src_node_, replaces_node_)) return {};
  return make_plain_error(
      EINVAL, fmt::format("Can no longer replace '{}' by '{}', because it can no longer be "
                          "guaranteed that doing so would not lead to an abrupt change of "
                          "visible data",
                          replaces_node_->name(), tgt_node_->name()));
}

Task<Result<void>> MirrorJob::prepare() {
  if (!swap_on_finish_) co_return Result<void>{};
  if (auto r = check_still_replaceable(); !r) co_return r;
  // The job lets go of its own needs first (QEMU drops the target's write and
  // the source's read before bdrv_replace_node): the target's new parents may
  // well need write. Relaxing never conflicts.
  Perms src_perms = src_edge_->perms(), tgt_perms = tgt_edge_->perms();
  (void)src_edge_->set_perms(Perms{});
  (void)tgt_edge_->set_perms(Perms{});
  // The state says completed before anyone can write the target: after a
  // crash past this point the target (an exact copy now: the source is
  // drained, everything copied and flushed) must never be copied over again,
  // whether or not the switch below happened.
  if (journal_) {
    co_await stop_checkpoints();
    if (auto j = co_await journal_->set_state(JournalState::kCompleted); !j) {
      (void)src_edge_->set_perms(src_perms);
      (void)tgt_edge_->set_perms(tgt_perms);
      co_return make_plain_error(j.error().errnum(), "crash-safe state: " + j.error().message());
    }
  }
  // The target too must be quiet while edges move onto it.
  co_await tgt_node_->drain();
  std::vector<const Child*> keep{src_edge_.get(), tgt_edge_.get()};
  if (replaces_edge_) keep.push_back(replaces_edge_.get());
  for (auto& e : between_edges_) keep.push_back(e.get());
  auto r = graph_.replace(replaces_node_, tgt_node_, keep);
  tgt_node_->undrain();
  if (!r) {
    (void)src_edge_->set_perms(src_perms);
    (void)tgt_edge_->set_perms(tgt_perms);
    co_await record_end(JournalState::kRunning);  // not switched: still resumable
    co_return r;
  }
  switched_ = true;
  co_return Result<void>{};
}

void MirrorJob::release_sync_bitmap(bool in_sync) {
  if (!sync_bitmap_) return;
  // In sync and drained: everything the bitmap marks (writes during the job
  // included) is on the target, so on-success starts it over from here.
  if (in_sync && p_.bitmap_mode == BitmapMode::kOnSuccess) sync_bitmap_->clear();
  sync_bitmap_->busy = false;
  sync_bitmap_ = nullptr;
}

Task<void> MirrorJob::commit() {
  release_sync_bitmap(true);
  co_await stop_checkpoints();
  // Switched: prepare() recorded it. A soft cancel leaves a consistent copy:
  // resumable.
  if (!switched_) co_await record_end(JournalState::kCancelled);
  detach();
  undrain_sources();
  release_permissions();
  co_return;
}

void MirrorJob::release_permissions() {
  // The job is over: it needs nothing of its nodes any more, so a base can be
  // reopened read-only and others may write, before the job is dismissed.
  for (Child* e : {src_edge_.get(), tgt_edge_.get(), replaces_edge_.get()})
    if (e) (void)e->set_perms(Perms{0, kPermAll});
  for (auto& e : between_edges_) (void)e->set_perms(Perms{0, kPermAll});
}

void MirrorJob::on_dismissed() {
  src_edge_.reset();
  tgt_edge_.reset();
  replaces_edge_.reset();
  between_edges_.clear();
}

Task<void> MirrorJob::abort() {
  co_await wait_idle();
  release_sync_bitmap(false);
  co_await stop_checkpoints();
  // A cancel says so; a failure leaves the state running: resume after fixing
  // the cause copies what it says.
  if (cancel_requested()) co_await record_end(JournalState::kCancelled);
  detach();
  // Client writes the job saw finish before it reports the end: no target write
  // after BLOCK_JOB_CANCELLED / COMPLETED.
  while (intercepts_ > 0) co_await intercepts_done_.wait();
  undrain_sources();
  release_permissions();
}

}  // namespace blkmirror
