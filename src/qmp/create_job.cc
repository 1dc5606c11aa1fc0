#include "qmp/create_job.h"

#include <fcntl.h>
#include <unistd.h>

#include <vector>

#include <fmt/format.h>

#include "blockdev/child_device.h"

namespace blkmirror::qmp {

namespace {

// Runs on a worker thread: plain syscalls on its own arguments only.
Result<void> create_file(const CreateFileSpec& s) {
  int fd = ::open(s.path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0)
    return make_plain_error(errno,
                            fmt::format("Could not create '{}': {}", s.path, std::strerror(errno)));
  int err = 0;
  if (::ftruncate(fd, static_cast<off_t>(s.size)) < 0) err = errno;
  if (!err && s.preallocation == "falloc" && s.size > 0)
    err = ::posix_fallocate(fd, 0, static_cast<off_t>(s.size));
  if (!err && s.preallocation == "full") {
    std::vector<char> zeros(1 << 20);
    for (uint64_t off = 0; off < s.size && !err;) {
      size_t n = std::min<uint64_t>(zeros.size(), s.size - off);
      ssize_t w = ::pwrite(fd, zeros.data(), n, static_cast<off_t>(off));
      if (w < 0) err = errno;
      else off += static_cast<uint64_t>(w);
    }
  }
  if (!err && ::fsync(fd) < 0) err = errno;
  ::close(fd);
  if (err) {
    ::unlink(s.path.c_str());  // ours: made by this job a moment ago
    return make_plain_error(err,
                            fmt::format("Could not create '{}': {}", s.path, std::strerror(err)));
  }
  return {};
}

}  // namespace

Task<Result<void>> CreateJob::run() {
  progress_len_ = 1;
  // Capture a pointer, not the strings (GCC 12 rule 2, base/task.h). The job
  // outlives the call (its lifecycle holds a reference).
  const CreateFileSpec* spec = &spec_;
  auto r = co_await loop_.blocking([spec]() { return create_file(*spec); });
  if (r) progress_offset_ = 1;
  co_return r;
}

Task<Result<void>> CreateQcow2Job::run() {
  progress_len_ = 1;
  ChildDevice file(file_.get(), false);
  auto r = co_await Qcow2Device::create(file, opts_);
  if (r) r = co_await file.flush();
  file_.reset();  // the file node is free again (blockdev-add it as qcow2 next)
  if (r) progress_offset_ = 1;
  co_return r;
}

}  // namespace blkmirror::qmp
