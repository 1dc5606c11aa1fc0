#include "cli/state_option.h"

#include <fmt/format.h>

#include "blockdev/graph.h"
#include "verify/verify_job.h"

namespace blkmirror {

namespace {

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

JournalIdentity identity_of(const OpenedDevice& d, const std::string& spec) {
  // The file's, not the format's: a qcow2 device over it has no inode.
  if (d.file) return device_identity(*d.file, spec);
  return device_identity(*d.dev, spec);
}

}  // namespace

void StateOption::add_to(CLI::App& cmd) {
  cmd.add_option_function<std::string>(
         "--state",
         [this](const std::string& v) {
           enabled = true;
           path = v;
         },
         "crash-safe state file (default DST.blkmirror-state): a killed mirror run again with "
         "the same --state copies only what may differ")
      ->expected(0, 1);
  cmd.add_flag("--verify-resume", verify_resume,
               "resuming: compare every chunk of SRC and DST first (checksums) and copy what "
               "differs too; needed when the devices changed behind the state's back");
}

Result<MirrorState> StateOption::open(Loop& loop, const std::string& src_spec,
                                      const std::string& dst_spec, const OpenedDevice& src,
                                      const OpenedDevice& dst, MirrorParams& p,
                                      bool granularity_given) const {
  if (!enabled) {
    if (verify_resume) return make_plain_error(EINVAL, "--verify-resume needs --state");
    return MirrorState{};
  }
  MirrorStateRequest req;
  req.path = path;
  if (req.path.empty()) {
    if (dst.is_nbd())
      return make_plain_error(EINVAL, "--state needs a PATH when DST is an NBD export");
    req.path = dst_spec + ".blkmirror-state";
  }
  req.src = src.dev.get();
  req.dst = dst.dev.get();
  req.src_id = identity_of(src, src_spec);
  req.dst_id = identity_of(dst, dst_spec);
  req.allow_changed = verify_resume;
  auto st = loop.run(open_mirror_state(loop, &req, &p, granularity_given));
  if (!st) return st;
  if (verify_resume) {
    auto d = loop.run(verify_into(&loop, st->journal.get(), src.dev, dst.dev, p.granularity));
    if (!d)
      return make_plain_error(
          EINVAL, fmt::format("{}: --verify-resume: {}", req.path, d.error().message()));
    st->note += fmt::format("; --verify-resume compared every chunk: {} bytes differ{}", *d,
                            st->changed ? " (SRC or DST changed since the state was written)" : "");
  }
  p.journal = st->journal;
  p.resume = st->resumed;
  return st;
}

}  // namespace blkmirror
