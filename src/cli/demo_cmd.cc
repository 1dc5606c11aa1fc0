// `blkmirror demo --dir DIR`: a self-contained live mirror. It generates a disk
// with data and holes, mirrors it while an in-process client keeps writing
// through the node graph (exactly as an NBD client's writes would arrive),
// completes, keeps writing to the switched-in target, and checks that the target
// holds every acknowledged write. The client also writes each acknowledged block
// to ref.img (its model of the disk), so `cmp DIR/dst.img DIR/ref.img` is an
// independent check.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <random>
#include <vector>

#include <fmt/format.h>

#include "base/size_parse.h"
#include "blockdev/file_device.h"
#include "cli/commands.h"
#include "cli/drive.h"
#include "cli/exit_codes.h"
#include "cli/mirror_options.h"
#include "cli/signals.h"

namespace blkmirror {

namespace {

struct DemoArgs {
  std::string dir = "demo-out";
  std::string size = "512M";
  uint64_t seed = 1;
  double ready_hold = 1.0;  // seconds of writes while ready, before complete
  MirrorCliOptions opts;
};

// Writes 1 MiB extents of random data into about half of every 4 MiB region,
// leaving the rest as holes, to `path` and the model `ref`.
Result<void> generate_disk(const std::string& path, const std::string& ref, uint64_t size,
                           uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint64_t> block(1 << 17);  // 1 MiB
  int fds[2];
  for (int i = 0; i < 2; ++i) {
    const std::string& p = i == 0 ? path : ref;
    fds[i] = ::open(p.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fds[i] < 0) return make_error(errno, p);
    if (::ftruncate(fds[i], static_cast<off_t>(size)) < 0) return make_error(errno, p);
  }
  for (uint64_t region = 0; region < size; region += 4 << 20) {
    if (rng() % 2) continue;
    uint64_t off = region + (rng() % 4) * (1 << 20);
    if (off >= size) continue;
    uint64_t len = std::min<uint64_t>(1 << 20, size - off);
    for (auto& w : block) w = rng();
    for (int fd : fds)
      if (::pwrite(fd, block.data(), len, static_cast<off_t>(off)) != static_cast<ssize_t>(len))
        return make_error(errno, "generate demo disk");
  }
  for (int fd : fds) ::close(fd);
  return {};
}

struct Writer {
  std::unique_ptr<Child> edge;
  int ref_fd = -1;
  uint64_t size = 0;
  std::mt19937_64 rng;
  bool stop = false, done = false;
  uint64_t writes = 0, after_switch = 0, failed = 0;
  const MirrorJob* job = nullptr;
};

// The in-process client: random 4-64 KiB writes with unique contents. Every
// acknowledged write is also applied to the model file.
Task<void> client_loop(Writer* w) {
  std::vector<std::byte> buf(64 << 10);
  while (!w->stop) {
    uint64_t len = (1 + w->rng() % 16) * 4096;
    uint64_t off = (w->rng() % (w->size / 4096)) * 4096;
    len = std::min(len, w->size - off);
    uint64_t tag = w->writes + 1;
    for (size_t i = 0; i < len; i += 8) {
      uint64_t v = (tag << 32) ^ (off + i) ^ 0x9e3779b97f4a7c15ull;
      std::memcpy(&buf[i], &v, 8);
    }
    auto r = co_await w->edge->write(off, {buf.data(), len});
    if (!r) {
      ++w->failed;
    } else {
      ::pwrite(w->ref_fd, buf.data(), len, static_cast<off_t>(off));
      ++w->writes;
      if (w->job->switched()) ++w->after_switch;
    }
    co_await sleep_for(std::chrono::microseconds(500));
  }
  w->done = true;
}

Result<bool> files_equal(const std::string& a, const std::string& b) {
  int fa = ::open(a.c_str(), O_RDONLY | O_CLOEXEC), fb = ::open(b.c_str(), O_RDONLY | O_CLOEXEC);
  if (fa < 0 || fb < 0) return make_error(errno, "verify");
  std::vector<char> ba(1 << 20), bb(1 << 20);
  bool equal = true;
  for (off_t off = 0;; off += static_cast<off_t>(ba.size())) {
    ssize_t na = ::pread(fa, ba.data(), ba.size(), off),
            nb = ::pread(fb, bb.data(), bb.size(), off);
    if (na != nb ||
        std::memcmp(ba.data(), bb.data(), static_cast<size_t>(std::max<ssize_t>(na, 0))) != 0) {
      equal = false;
      break;
    }
    if (na <= 0) break;
  }
  ::close(fa);
  ::close(fb);
  return equal;
}

int run_demo(const DemoArgs& a) {
  auto size = parse_size(a.size);
  if (!size || *size < (1 << 20)) return fail_input("--size: need at least 1M");
  auto params = a.opts.to_params();
  if (!params) return fail_input(params.error().message());
  std::error_code ec;
  std::filesystem::create_directories(a.dir, ec);
  if (ec) return fail_input(fmt::format("{}: {}", a.dir, ec.message()));
  std::string src_path = a.dir + "/src.img", dst_path = a.dir + "/dst.img",
              ref_path = a.dir + "/ref.img";
  ::unlink(dst_path.c_str());
  if (auto r = generate_disk(src_path, ref_path, *size, a.seed); !r)
    return fail_input(r.error().message());
  if (auto r = FileDevice::create(dst_path, *size); !r) return fail_input(r.error().message());

  Loop loop;
  StraySignalGuard stray_signals(loop);  // before any other signal_set: outlives them
  Graph graph;  // devices use the loop's services: destroyed before the loop
  auto src = FileDevice::open(loop, src_path, FileOptions{.direct = a.opts.direct});
  auto dst = FileDevice::open(loop, dst_path, FileOptions{.direct = a.opts.direct});
  if (!src || !dst) return fail_input(!src ? src.error().message() : dst.error().message());
  (*dst)->set_zero_init(true);
  Node* src_node = *graph.add("src", *src);
  (void)graph.add("dst", *dst);
  params->device = "src";
  params->target = "dst";
  params->job_id = "demo";
  auto job = MirrorJob::create(loop, graph, *params);
  if (!job) return fail_input(job.error().message());

  Writer w;
  w.edge = graph.attach(src_node, "demo client");
  w.ref_fd = ::open(ref_path.c_str(), O_WRONLY | O_CLOEXEC);
  w.size = *size;
  w.rng.seed(a.seed * 7919 + 1);
  w.job = job->get();

  Progress progress(a.opts.progress_style());
  progress.note(fmt::format("demo: live mirror of {} ({}: data and holes) to {} while a client "
                            "writes to it",
                            src_path, format_size(*size), dst_path));
  DriveOptions drive;
  double hold = a.ready_hold;
  drive.before_complete = [&progress, hold]() -> Task<void> {
    progress.note(fmt::format("demo: staying ready for {:.1f}s while the client keeps writing",
                              hold));
    co_await sleep_for(std::chrono::milliseconds(static_cast<int64_t>(hold * 1000)));
  };
  int rc = loop.run([&]() -> Task<int> {
    asio::co_spawn(loop.executor(), client_loop(&w), asio::detached);
    int code = co_await drive_mirror(loop, *job, progress, drive);
    // Keep writing a little after the switch: these must land on the target.
    uint64_t target = w.writes + 200;
    while (code == exit_code::kOk && w.writes < target && w.failed == 0)
      co_await sleep_for(std::chrono::milliseconds(5));
    w.stop = true;
    while (!w.done) co_await sleep_for(std::chrono::milliseconds(1));
    auto f = co_await w.edge->flush();
    if (!f) progress.note("flush: " + f.error().message());
    co_return code;
  }());
  ::close(w.ref_fd);
  if (rc != exit_code::kOk) return rc;
  progress.note(fmt::format("demo: client made {} writes ({} after the switch, {} failed)",
                            w.writes, w.after_switch, w.failed));
  auto eq = files_equal(dst_path, ref_path);
  if (!eq || !*eq || w.failed) {
    progress.note(fmt::format("demo: VERIFY FAILED: {} differs from the client's model {}",
                              dst_path, ref_path));
    return exit_code::kVerifyFailed;
  }
  progress.note(fmt::format("demo: verified: {} holds every acknowledged write ({} == {})",
                            dst_path, dst_path, ref_path));
  return exit_code::kOk;
}

}  // namespace

CommandRunner add_demo_command(CLI::App& app) {
  auto args = std::make_shared<DemoArgs>();
  auto* cmd = app.add_subcommand("demo", "Live mirror of a generated disk with a writing client");
  cmd->add_option("--dir", args->dir, "where to put src.img, dst.img, ref.img")
      ->capture_default_str();
  cmd->add_option("--size", args->size, "disk size")->capture_default_str();
  cmd->add_option("--seed", args->seed, "random seed")->capture_default_str();
  cmd->add_option("--ready-hold", args->ready_hold, "seconds to stay ready before complete")
      ->capture_default_str();
  args->opts.add_to(*cmd);
  return [cmd, args]() -> int {
    if (!cmd->parsed()) return -1;
    return run_demo(*args);
  };
}

}  // namespace blkmirror
