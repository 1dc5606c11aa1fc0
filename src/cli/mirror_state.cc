#include "cli/mirror_state.h"

#include <fmt/format.h>
#include <sys/stat.h>

#include <cstring>
#include <ctime>

#include "blockdev/file_device.h"
#include "blockdev/graph.h"
#include "io/buffer.h"
#include "verify/verify_job.h"

namespace blkmirror {

namespace {

// Extents read on both sides to check that the devices are as the state left
// them (each at most one extent long).
constexpr uint64_t kFingerprintExtents = 16;

JournalIdentity identity_of(const OpenedDevice& d, const std::string& spec) {
  JournalIdentity id;
  if (d.file) std::tie(id.dev, id.ino) = d.file->identity();
  id.length = d.dev->length();
  id.name = spec;
  return id;
}

std::string when(uint64_t unix_seconds) {
  std::time_t t = static_cast<std::time_t>(unix_seconds);
  char buf[64];
  std::tm tm{};
  gmtime_r(&t, &tm);
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S UTC", &tm);
  return buf;
}

// The first clean extent of each of kFingerprintExtents stretches of the disk
// reads the same on both devices; the offset of the first that does not.
Task<Result<std::optional<uint64_t>>> fingerprint(const Journal* j, BlockDevice* src,
                                                  BlockDevice* dst) {
  const uint64_t n = j->extents(), ext = j->extent_size(), len = j->header().length;
  AlignedBuffer a(ext), b(ext);
  for (uint64_t k = 0; k < kFingerprintExtents && n > 0; ++k) {
    uint64_t from = k * n / kFingerprintExtents, to = (k + 1) * n / kFingerprintExtents;
    for (uint64_t x = from; x < to; ++x) {
      if (j->dirty(x)) continue;
      uint64_t off = x * ext, l = std::min(ext, len - off);
      if (auto r = co_await src->read(off, a.span(l)); !r) co_return make_error(r.error());
      if (auto r = co_await dst->read(off, b.span(l)); !r) co_return make_error(r.error());
      if (std::memcmp(a.data(), b.data(), l) != 0) co_return std::optional<uint64_t>(off);
      break;
    }
  }
  co_return std::optional<uint64_t>();
}

// Every chunk compared (the verify job); the extents of those that differ are
// marked dirty in j. Returns how many bytes differed.
Task<Result<uint64_t>> verify_into(Loop* loop, Journal* j, BlockDevicePtr src, BlockDevicePtr dst,
                                   uint64_t granularity) {
  Graph g;
  (void)g.add("src", src);
  (void)g.add("dst", dst);
  VerifyParams vp;
  vp.job_id = "verify-resume";
  vp.source = "src";
  vp.target = "dst";
  vp.granularity = granularity;
  vp.auto_dismiss = false;  // dismissed below, so it lets go of g's nodes before g goes
  auto v = VerifyJob::create(*loop, g, vp);
  if (!v) co_return make_error(v.error());
  (*v)->start(loop->executor());
  co_await (*v)->wait_concluded();
  const VerifyReport report = (*v)->report();
  std::optional<Error> failure = (*v)->failure();
  (void)(*v)->dismiss();
  co_await yield_now();
  if (failure) co_return make_error(*failure);
  for (const ByteRange& d : report.differences)
    if (auto m = co_await j->mark(d.offset, d.length); !m) co_return make_error(m.error());
  co_return report.differing;
}

}  // namespace

Result<MirrorState> open_mirror_state(Loop& loop, const MirrorStateOptions& o,
                                      const std::string& dst_spec, const OpenedDevice& src,
                                      const OpenedDevice& dst, MirrorParams& p,
                                      bool granularity_given) {
  MirrorState st;
  if (!o.enabled) {
    if (o.verify_resume) return make_plain_error(EINVAL, "--verify-resume needs --state");
    return st;
  }
  st.path = o.path;
  if (st.path.empty()) {
    if (dst.is_nbd())
      return make_plain_error(EINVAL, "--state needs a PATH when DST is an NBD export");
    st.path = dst_spec + ".blkmirror-state";
  }
  const std::string& path = st.path;
  auto fail = [&path](const std::string& what) {
    return make_plain_error(EINVAL, fmt::format("{}: {}", path, what));
  };
  JournalIdentity sid = identity_of(src, "SRC"), tid = identity_of(dst, "DST");
  struct stat sb {};
  if (::stat(path.c_str(), &sb) != 0) {
    if (o.verify_resume) return fail("no state to resume (--verify-resume)");
    // A new copy: everything may differ until the first checkpoint.
    JournalHeader h;
    h.length = sid.length;
    h.granularity = derive_sizes(p, dst.dev->caps().cluster_size).granularity;
    h.extent_size = Journal::default_extent_size(h.length, h.granularity);
    h.sync = static_cast<uint32_t>(p.sync);
    h.source = sid;
    h.target = tid;
    if (auto c = FileDevice::create(path, 0); !c) return make_error(c.error());
    auto f = FileDevice::open(loop, path, FileOptions{.read_only = false});
    if (!f) return make_error(f.error());
    auto j = loop.run(Journal::create(*f, h));
    if (!j) {
      ::unlink(path.c_str());  // ours, made a moment ago
      return fail(j.error().message());
    }
    st.journal = std::move(*j);
    st.note = fmt::format("crash-safe state in {} ({} extents of {} KiB)", path,
                          st.journal->extents(), st.journal->extent_size() >> 10);
    return st;
  }
  auto f = FileDevice::open(loop, path, FileOptions{.read_only = false});
  if (!f) return make_error(f.error());
  auto opened = loop.run(Journal::open(*f));
  if (!opened) return fail(opened.error().message());
  std::shared_ptr<Journal> j = std::move(*opened);
  const JournalHeader& h = j->header();
  if (h.state == JournalState::kCompleted)
    return fail(
        fmt::format("this mirror completed on {}: the target took the source's place, "
                    "and copying again would undo what was written to it since; remove "
                    "the file to copy anew",
                    when(h.updated_unix)));
  if (h.length != sid.length || h.length != tid.length)
    return fail(fmt::format("made for {}-byte disks; SRC has {} bytes, DST {}", h.length,
                            sid.length, tid.length));
  if (!(h.source == sid)) return fail("made for another source than SRC (device or inode differ)");
  if (!(h.target == tid)) return fail("made for another target than DST (device or inode differ)");
  if (h.sync != static_cast<uint32_t>(p.sync))
    return fail(
        fmt::format("made for another sync mode ({})", to_string(static_cast<SyncMode>(h.sync))));
  if (granularity_given && p.granularity != h.granularity)
    return fail(fmt::format("made with granularity {}; give that or leave --granularity out",
                            h.granularity));
  p.granularity = h.granularity;
  auto fp = loop.run(fingerprint(j.get(), src.dev.get(), dst.dev.get()));
  if (!fp) return fail("checking the devices: " + fp.error().message());
  std::string how;
  if (o.verify_resume) {
    auto d = loop.run(verify_into(&loop, j.get(), src.dev, dst.dev, h.granularity));
    if (!d) return fail("--verify-resume: " + d.error().message());
    how = fmt::format("; --verify-resume compared every chunk: {} bytes differ{}", *d,
                      *fp ? " (SRC or DST changed since the state was written)" : "");
  } else if (*fp) {
    return fail(fmt::format(
        "SRC or DST changed since the state was written: they differ at offset {}, where the "
        "state says the copy was done (--verify-resume compares every chunk and copies what "
        "differs; or remove the file to copy everything)",
        **fp));
  }
  st.journal = std::move(j);
  st.resumed = true;
  st.note = fmt::format("resuming from {} ({}, written {}): {} of {} extents of {} KiB to copy{}",
                        path, to_string(h.state), when(h.updated_unix), st.journal->dirty_count(),
                        st.journal->extents(), st.journal->extent_size() >> 10, how);
  return st;
}

}  // namespace blkmirror
