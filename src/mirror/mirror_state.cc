#include "mirror/mirror_state.h"

#include <fmt/format.h>
#include <sys/stat.h>

#include <cstring>
#include <ctime>

#include "blockdev/file_device.h"
#include "io/buffer.h"

namespace blkmirror {

namespace {

// Extents read on both sides to check that the devices are as the state left
// them (each at most one extent long).
constexpr uint64_t kFingerprintExtents = 16;

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

}  // namespace

JournalIdentity device_identity(const BlockDevice& dev, std::string name) {
  JournalIdentity id;
  if (auto* f = dynamic_cast<const FileDevice*>(&dev)) std::tie(id.dev, id.ino) = f->identity();
  id.length = dev.length();
  id.name = std::move(name);
  return id;
}

Task<Result<MirrorState>> open_mirror_state(Loop& loop, const MirrorStateRequest* rq,
                                            MirrorParams* p, bool granularity_given) {
  const MirrorStateRequest& req = *rq;
  MirrorState st;
  st.path = req.path;
  const std::string& path = req.path;
  auto fail = [&path](const std::string& what) {
    return make_plain_error(EINVAL, fmt::format("{}: {}", path, what));
  };
  const JournalIdentity& sid = req.src_id;
  const JournalIdentity& tid = req.dst_id;
  struct stat sb {};
  if (::stat(path.c_str(), &sb) != 0) {
    if (req.allow_changed) co_return fail("no state to resume (--verify-resume)");
    // A new copy: everything may differ until the first checkpoint.
    JournalHeader h;
    h.length = sid.length;
    h.granularity = derive_sizes(*p, req.dst->caps().cluster_size, sid.length).granularity;
    h.extent_size = Journal::default_extent_size(h.length, h.granularity);
    h.sync = static_cast<uint32_t>(p->sync);
    h.source = sid;
    h.target = tid;
    if (auto c = FileDevice::create(path, 0); !c) co_return make_error(c.error());
    auto f = FileDevice::open(loop, path, FileOptions{.read_only = false});
    if (!f) co_return make_error(f.error());
    auto j = co_await Journal::create(*f, h);
    if (!j) {
      ::unlink(path.c_str());  // ours, made a moment ago
      co_return fail(j.error().message());
    }
    st.journal = std::move(*j);
    st.note = fmt::format("crash-safe state in {} ({} extents of {} KiB)", path,
                          st.journal->extents(), st.journal->extent_size() >> 10);
    co_return st;
  }
  auto f = FileDevice::open(loop, path, FileOptions{.read_only = false});
  if (!f) co_return make_error(f.error());
  auto opened = co_await Journal::open(*f);
  if (!opened) co_return fail(opened.error().message());
  std::shared_ptr<Journal> j = std::move(*opened);
  const JournalHeader& h = j->header();
  if (h.state == JournalState::kCompleted)
    co_return fail(fmt::format(
        "this mirror completed on {}: the target took the source's place, and copying again "
        "would undo what was written to it since; remove the file to copy anew",
        when(h.updated_unix)));
  if (h.length != sid.length || h.length != tid.length)
    co_return fail(fmt::format("made for {}-byte disks; the source has {} bytes, the target {}",
                               h.length, sid.length, tid.length));
  if (!(h.source == sid))
    co_return fail("made for another source than " + sid.name + " (device or inode differ)");
  if (!(h.target == tid))
    co_return fail("made for another target than " + tid.name + " (device or inode differ)");
  if (h.sync != static_cast<uint32_t>(p->sync))
    co_return fail(
        fmt::format("made for another sync mode ({})", to_string(static_cast<SyncMode>(h.sync))));
  if (granularity_given && p->granularity != h.granularity)
    co_return fail(fmt::format("made with granularity {}; give that or leave the granularity out",
                               h.granularity));
  p->granularity = h.granularity;
  auto fp = co_await fingerprint(j.get(), req.src, req.dst);
  if (!fp) co_return fail("checking the devices: " + fp.error().message());
  if (*fp && !req.allow_changed)
    co_return fail(fmt::format(
        "the source or target changed since the state was written: they differ at offset {}, "
        "where the state says the copy was done (--verify-resume compares every chunk and "
        "copies what differs; or remove the file to copy everything)",
        **fp));
  st.changed = fp->has_value();
  st.journal = std::move(j);
  st.resumed = true;
  st.note = fmt::format("resuming from {} ({}, written {}): {} of {} extents of {} KiB to copy",
                        path, to_string(h.state), when(h.updated_unix), st.journal->dirty_count(),
                        st.journal->extents(), st.journal->extent_size() >> 10);
  co_return st;
}

}  // namespace blkmirror
