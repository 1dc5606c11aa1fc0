#include "verify/verify_job.h"

#include <fmt/format.h>

#include <algorithm>
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <bit>

#include "base/limits.h"
#include "verify/checksum.h"

namespace blkmirror {

namespace {

constexpr uint64_t kDefaultGranularity = 64 << 10;
constexpr uint64_t kMinGranularity = 512;
constexpr uint64_t kMaxGranularity = 64 << 20;
// Mismatch events sent per second at most; the next one sent says how many
// were left out (a disk that differs everywhere would otherwise send one per
// segment). The report lists them all.
constexpr unsigned kMismatchEventsPerSecond = 10;

// A buffer of the job's pool, given back however the comparison ends.
class PoolBuffer {
 public:
  explicit PoolBuffer(BufferPool& pool) : pool_(pool), buf_(pool.take()) {}
  ~PoolBuffer() { pool_.give(std::move(buf_)); }
  PoolBuffer(const PoolBuffer&) = delete;
  PoolBuffer& operator=(const PoolBuffer&) = delete;
  std::span<std::byte> span(size_t n) { return buf_.span(n); }

 private:
  BufferPool& pool_;
  AlignedBuffer buf_;
};

// The target's read, run beside the source's.
struct ReadHalf {
  bool done = false;
  Result<void> result;
  Notifier finished;
};

Task<void> read_half(Child* edge, uint64_t off, std::span<std::byte> buf,
                     std::shared_ptr<ReadHalf> half) {
  half->result = co_await edge->read(off, buf);
  half->done = true;
  half->finished.notify_all();
}

void erase_one(std::vector<ByteRange>& v, uint64_t off, uint64_t len) {
  auto it = std::find_if(v.begin(), v.end(),
                         [&](const ByteRange& r) { return r.offset == off && r.length == len; });
  if (it != v.end()) v.erase(it);
}

}  // namespace

Result<std::shared_ptr<VerifyJob>> VerifyJob::create(Loop& loop, Graph& graph, VerifyParams p) {
  Node* src = graph.find(p.source);
  if (!src) return make_plain_error(ENODEV, fmt::format("Cannot find node '{}'", p.source));
  Node* tgt = graph.find(p.target);
  if (!tgt) return make_plain_error(ENODEV, fmt::format("Cannot find node '{}'", p.target));
  if (src == tgt)
    return make_plain_error(EINVAL,
                            fmt::format("Cannot verify node '{}' against itself", p.source));
  uint64_t gran = p.granularity ? p.granularity : kDefaultGranularity;
  if (gran < kMinGranularity || gran > kMaxGranularity || !std::has_single_bit(gran))
    return make_plain_error(EINVAL, "Granularity must be a power of 2 between 512 and 64M");
  if (p.speed < 0)
    return make_plain_error(EINVAL, "Parameter 'speed' expects a non-negative value");
  if (src->length() != tgt->length())
    return make_plain_error(
        EINVAL, fmt::format("Source and target image have different sizes ({} and {} bytes)",
                            src->length(), tgt->length()));
  if (p.repair && tgt->device().caps().read_only)
    return make_plain_error(EROFS,
                            fmt::format("Cannot repair target '{}': it is read-only", p.target));
  const std::string who = fmt::format("verify job '{}'", p.job_id);
  // Sizes must hold still; everything else may go on (that is the point).
  constexpr uint32_t kShared = kPermAll & ~kPermResize;
  auto s = graph.attach(src, "source of " + who,
                        EdgeUse{who, "source", Perms{kPermConsistentRead, kShared}});
  if (!s) return make_error(s.error());
  auto t = graph.attach(tgt, "target of " + who,
                        EdgeUse{who, "target", Perms{p.repair ? kPermWrite : 0u, kShared}});
  if (!t) return make_error(t.error());
  return std::shared_ptr<VerifyJob>(
      new VerifyJob(loop, std::move(p), gran, src, tgt, std::move(*s), std::move(*t)));
}

VerifyJob::VerifyJob(Loop& loop, VerifyParams p, uint64_t gran, Node* src, Node* tgt,
                     std::unique_ptr<Child> src_edge, std::unique_ptr<Child> tgt_edge)
    : Job(p.job_id, "verify", p.source, p.auto_finalize, p.auto_dismiss),
      loop_(loop),
      p_(std::move(p)),
      gran_(gran),
      length_(src->length()),
      src_node_(src),
      tgt_node_(tgt),
      src_edge_(std::move(src_edge)),
      tgt_edge_(std::move(tgt_edge)),
      written_(div_round_up(length_, gran)),
      recheck_(div_round_up(length_, gran)),
      different_(div_round_up(length_, gran)),
      mismatch_events_(kMismatchEventsPerSecond, std::chrono::seconds(1)),
      seg_(std::max(gran, kSegment)),
      pool_(seg_, 2 * kDepth) {
  report_.length = length_;
  // Watching starts now, before the first read: a write already in flight is
  // seen ending, which marks its chunks too.
  src_node_->add_observer(this);
  tgt_node_->add_observer(this);
  observing_ = true;
}

VerifyJob::~VerifyJob() { detach(); }

void VerifyJob::detach() {
  if (observing_) {
    src_node_->remove_observer(this);
    tgt_node_->remove_observer(this);
    observing_ = false;
  }
  src_edge_.reset();
  tgt_edge_.reset();
}

ByteRange VerifyJob::chunk_range(uint64_t first, uint64_t end) const {
  uint64_t off = first * gran_;
  return {off, std::min(end * gran_, length_) - off};
}

namespace {

// The chunks [first, end) covering [off, off+len), clipped to the device.
std::pair<uint64_t, uint64_t> chunks_of(uint64_t off, uint64_t len, uint64_t gran,
                                        uint64_t length) {
  if (len == 0 || off >= length) return {0, 0};
  uint64_t end = std::min(off + len, length);
  return {off / gran, div_round_up(end, gran)};
}

}  // namespace

void VerifyJob::write_started(const Node& node, uint64_t offset, uint64_t length) {
  for (auto& own : own_writes_)
    if (&node == tgt_node_ && own.offset == offset && own.length == length) return;
  auto [first, end] = chunks_of(offset, length, gran_, length_);
  written_.set(first, end - first);
  writes_in_flight_.push_back({offset, length});
}

void VerifyJob::write_ended(const Node& node, uint64_t offset, uint64_t length) {
  for (auto& own : own_writes_)
    if (&node == tgt_node_ && own.offset == offset && own.length == length) return;
  auto [first, end] = chunks_of(offset, length, gran_, length_);
  written_.set(first, end - first);
  erase_one(writes_in_flight_, offset, length);
}

bool VerifyJob::unsettled(const ByteRange& r) const {
  for (auto& w : writes_in_flight_)
    if (w.overlaps(r)) return true;
  return p_.copy_pending && p_.copy_pending(r.offset, r.length);
}

bool VerifyJob::written_since_reset(const ByteRange& r) const {
  auto [first, end] = chunks_of(r.offset, r.length, gran_, length_);
  return written_.count_range(first, end - first) > 0;
}

bool VerifyJob::moved(const ByteRange& r) const { return written_since_reset(r) || unsettled(r); }

void VerifyJob::defer(const ByteRange& r) {
  auto [first, end] = chunks_of(r.offset, r.length, gran_, length_);
  recheck_.set(first, end - first);
  report_.rechecks += end - first;
}

void VerifyJob::settle(const ByteRange& r) {
  report_.compared += r.length;
  progress_offset_ += r.length;
  last_settled_ = std::chrono::steady_clock::now();
}

void VerifyJob::add_difference(const ByteRange& r, bool repaired) {
  auto [first, end] = chunks_of(r.offset, r.length, gran_, length_);
  // A chunk found again (written and compared once more) is counted once.
  for (uint64_t c = first; c < end; ++c) {
    if (different_.test(c)) continue;
    different_.set(c, 1);
    ByteRange cr = chunk_range(c, c + 1);
    report_.differing += cr.length;
    if (repaired) report_.repaired += cr.length;
  }
  if (mismatch_events_.allow(EventThrottle::Clock::now())) {
    JobEvent e{JobEvent::Kind::kMismatch, id()};
    e.type = "verify";
    e.device = id();
    e.offset = r.offset;
    e.len = r.length;
    e.action = repaired ? "repaired" : "reported";
    e.suppressed = mismatch_events_.take_suppressed();
    emit(std::move(e));
  }
}

void VerifyJob::launch(ByteRange r) {
  ++in_flight_;
  asio::co_spawn(loop_.executor(),
                 check_range(r, std::static_pointer_cast<VerifyJob>(shared_from_this())),
                 asio::detached);
}

Task<void> VerifyJob::check_range(ByteRange r, std::shared_ptr<VerifyJob> self) {
  auto res = co_await compare(r);
  if (!res && !fatal_) fatal_ = res.error();
  --in_flight_;
  wake_.notify_all();
}

Task<void> VerifyJob::wait_idle() {
  while (in_flight_ > 0) co_await wake_.wait();
}

Task<Result<void>> VerifyJob::compare(ByteRange r) {
  if (!src_edge_ || !tgt_edge_) co_return Result<void>{};  // dismissed meanwhile
  if (&src_edge_->node() != src_node_ || &tgt_edge_->node() != tgt_node_)
    co_return make_plain_error(EBUSY,
                               "a switch-over moved the job's source or target to another node");
  // Chunks a write or a copy is busy with right now: a difference in them is
  // not trusted even if they look settled once read (the copy may land
  // between the two reads).
  auto [first, end] = chunks_of(r.offset, r.length, gran_, length_);
  std::vector<bool> busy(end - first);
  bool any_busy = false;
  for (uint64_t c = first; c < end; ++c) {
    busy[c - first] = unsettled(chunk_range(c, c + 1));
    any_busy = any_busy || busy[c - first];
  }
  written_.reset(first, end - first);
  // Both sides say the whole range reads as zeroes: nothing to read. A source
  // known to hold data further on is not asked again for every segment.
  // One question at a time: segments launched together would each ask, and
  // on a dense tmpfs file every SEEK_HOLE walks the page cache to the end (16
  // asks took 0.45 s of a 512 MiB verify that then took 0.3 s).
  while (status_busy_) co_await status_done_.wait();
  if (!any_busy && r.end() > src_data_until_) {
    status_busy_ = true;
    auto se = co_await src_edge_->block_status(r.offset, length_ - r.offset);
    status_busy_ = false;
    status_done_.notify_all();
    if (!se)
      co_return make_plain_error(se.error().errnum(), fmt::format("source block status at {}: {}",
                                                                  r.offset, se.error().message()));
    if (!se->zero) src_data_until_ = std::max(src_data_until_, r.offset + se->length);
    if (se->zero && se->length >= r.length) {
      auto te = co_await tgt_edge_->block_status(r.offset, r.length);
      if (!te)
        co_return make_plain_error(
            te.error().errnum(),
            fmt::format("target block status at {}: {}", r.offset, te.error().message()));
      if (te->zero && te->length >= r.length) {
        if (moved(r)) {
          defer(r);
        } else {
          report_.zero_skipped += r.length;
          settle(r);
        }
        co_return Result<void>{};
      }
    }
  }
  PoolBuffer sbuf(pool_), tbuf(pool_);
  auto s = sbuf.span(r.length), t = tbuf.span(r.length);
  auto half = std::make_shared<ReadHalf>();
  asio::co_spawn(loop_.executor(), read_half(tgt_edge_.get(), r.offset, t, half), asio::detached);
  auto sr = co_await src_edge_->read(r.offset, s);
  while (!half->done) co_await half->finished.wait();
  if (!sr)
    co_return make_plain_error(
        sr.error().errnum(), fmt::format("source read at {}: {}", r.offset, sr.error().message()));
  if (!half->result)
    co_return make_plain_error(
        half->result.error().errnum(),
        fmt::format("target read at {}: {}", r.offset, half->result.error().message()));
  report_.bytes_read += 2 * r.length;
  // Checksums on a worker thread: the loop thread is busy enough copying what
  // the reads bring (a page-cache read runs inline in io_uring), and the two
  // can use both cores (docs/design/verify.md, "Speed"). Pointers and sizes
  // only into the lambda (GCC 12 rule 2, base/task.h); the buffers stay put
  // until it returns.
  const std::byte* sp = s.data();
  const std::byte* tp = t.data();
  const uint64_t len = r.length, gran = gran_;
  std::vector<char> same = co_await loop_.blocking([sp, tp, len, gran] {
    std::vector<char> eq;
    for (uint64_t pos = 0; pos < len; pos += gran) {
      uint64_t n = std::min(gran, len - pos);
      eq.push_back(chunk_sum({sp + pos, n}) == chunk_sum({tp + pos, n}));
    }
    return eq;
  });
  // Adjacent differing chunks are reported (and repaired) as one range.
  std::optional<ByteRange> run;
  for (uint64_t off = r.offset; off < r.end(); off += gran_) {
    ByteRange c{off, std::min(gran_, r.end() - off)};
    if (same[(off - r.offset) / gran_]) {
      settle(c);
      continue;
    }
    // Something wrote the chunk while it was read, or a copy still owes it:
    // the difference may be the moment's, not the copy's. Compare it again.
    if (busy[off / gran_ - first] || moved(c)) {
      defer(c);
      continue;
    }
    if (run && run->end() == c.offset) {
      run->length += c.length;
      continue;
    }
    if (run) {
      auto f = co_await found(
          *run, std::span<const std::byte>(s).subspan(run->offset - r.offset, run->length));
      if (!f) co_return f;
    }
    run = c;
  }
  if (!run) co_return Result<void>{};
  co_return co_await found(
      *run, std::span<const std::byte>(s).subspan(run->offset - r.offset, run->length));
}

Task<Result<void>> VerifyJob::found(ByteRange r, std::span<const std::byte> data) {
  if (p_.repair) co_return co_await repair(r, data);
  add_difference(r, false);
  settle(r);
  co_return Result<void>{};
}

Task<Result<void>> VerifyJob::repair(ByteRange r, std::span<const std::byte> data) {
  own_writes_.push_back(r);
  auto w = co_await tgt_edge_->write(r.offset, data);
  erase_one(own_writes_, r.offset, r.length);
  if (!w)
    co_return make_plain_error(w.error().errnum(), fmt::format("repairing the target at {}: {}",
                                                               r.offset, w.error().message()));
  // The source changed since it was read: what was written may be old.
  if (moved(r)) {
    defer(r);
    co_return Result<void>{};
  }
  add_difference(r, true);
  settle(r);
  co_return Result<void>{};
}

Task<Result<void>> VerifyJob::run() {
  progress_len_ = length_;
  rate_.set_speed(static_cast<uint64_t>(p_.speed));
  last_settled_ = std::chrono::steady_clock::now();
  // Pass 1: every segment once, kDepth at a time.
  uint64_t cursor = 0;
  auto stop_now = [this] { return fatal_ || cancel_requested(); };
  while (cursor < length_ && !stop_now()) {
    if (pause_requested()) {
      co_await wait_idle();
      co_await pause_point();
      continue;
    }
    if (in_flight_ >= kDepth) {
      co_await wake_.wait();
      continue;
    }
    if (auto d = rate_.delay(); d > RateLimiter::Clock::duration::zero()) {
      co_await wake_.wait(d);
      continue;
    }
    ByteRange r{cursor, std::min(seg_, length_ - cursor)};
    cursor = r.end();
    rate_.charge(r.length);
    launch(r);
  }
  co_await wait_idle();
  // Pass 2: the chunks that changed while compared, again and again, waiting
  // a little longer each round nothing settled, until none is left or none
  // has settled for settle_timeout.
  auto delay = std::chrono::milliseconds(1);
  while (recheck_.count() > 0 && !stop_now()) {
    if (pause_requested()) {
      co_await pause_point();
      continue;
    }
    if (std::chrono::steady_clock::now() - last_settled_ > p_.settle_timeout) {
      for (uint64_t from = 0; auto first = recheck_.next_set(from);) {
        uint64_t end = recheck_.next_clear(*first).value_or(recheck_.size());
        report_.unverified.push_back(chunk_range(*first, end));
        from = end;
      }
      recheck_.reset_all();
      break;
    }
    co_await sleep_for(delay);
    const uint64_t before = report_.compared;
    const uint64_t per_segment = seg_ / gran_;
    for (uint64_t from = 0; auto first = recheck_.next_set(from);) {
      uint64_t end =
          std::min(recheck_.next_clear(*first).value_or(recheck_.size()), *first + per_segment);
      recheck_.reset(*first, end - *first);
      while (in_flight_ >= kDepth) co_await wake_.wait();
      launch(chunk_range(*first, end));
      from = end;
    }
    co_await wait_idle();
    delay = report_.compared > before ? std::chrono::milliseconds(1)
                                      : std::min(delay * 2, std::chrono::milliseconds(100));
  }
  co_await wait_idle();
  if (fatal_) co_return make_error(*fatal_);
  if (cancel_requested()) co_return Result<void>{};
  if (report_.repaired > 0) {
    if (auto f = co_await tgt_edge_->flush(); !f)
      co_return make_plain_error(f.error().errnum(),
                                 "flushing the repaired target: " + f.error().message());
  }
  report_.differences = differences_so_far();
  co_return Result<void>{};
}

std::vector<ByteRange> VerifyJob::differences_so_far() const {
  std::vector<ByteRange> out;  // ascending, adjacent chunks merged
  for (uint64_t from = 0; auto first = different_.next_set(from);) {
    uint64_t end = different_.next_clear(*first).value_or(different_.size());
    out.push_back(chunk_range(*first, end));
    from = end;
  }
  return out;
}

}  // namespace blkmirror
