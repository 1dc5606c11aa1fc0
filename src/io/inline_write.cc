#include "io/inline_write.h"

#include <unistd.h>

#include <cerrno>

namespace blkmirror {

int InlineWrites::write(int fd, const void* buf, size_t len, uint64_t off) {
  auto t0 = Clock::now();
  ssize_t n = ::pwrite(fd, buf, len, static_cast<off_t>(off));
  int res = n < 0 ? -errno : static_cast<int>(n);
  record(t0, Clock::now());
  return res;
}

void InlineWrites::record(Clock::time_point start, Clock::time_point end) {
  if (end - start <= kStallLimit) return;
  ++stalls_;
  off_until_ = end + kBackoff;
}

}  // namespace blkmirror
