// Helpers for the qcow2 tests: a temporary directory, running the real peer
// (qemu-img, qemu-io from qemu-utils) and reading a device whole.
#pragma once

#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "blockdev/file_device.h"
#include "blockdev/qcow2/qcow2_device.h"
#include "io/loop.h"

namespace blkmirror::test {

struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/blkmirror-qcow2-XXXXXX";
    path = ::mkdtemp(tmpl);
  }
  ~TempDir() { std::filesystem::remove_all(path); }
  std::string operator/(const std::string& name) const { return path + "/" + name; }
};

struct ShResult {
  int status = -1;
  std::string out;
};

// Runs a shell command; stdout and stderr together.
inline ShResult sh(const std::string& cmd) {
  ShResult r;
  FILE* p = ::popen((cmd + " 2>&1").c_str(), "r");
  if (!p) return r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) r.out.append(buf, n);
  int st = ::pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

inline std::vector<std::byte> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::vector<char> c((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  std::vector<std::byte> out(c.size());
  std::memcpy(out.data(), c.data(), c.size());
  return out;
}

inline Task<Result<std::vector<std::byte>>> read_all(BlockDevice& dev) {
  std::vector<std::byte> out(dev.length());
  const uint64_t chunk = 1 << 20;
  for (uint64_t pos = 0; pos < out.size(); pos += chunk) {
    uint64_t n = std::min<uint64_t>(chunk, out.size() - pos);
    auto r = co_await dev.read(pos, {out.data() + pos, n});
    if (!r) co_return make_error(r.error());
  }
  co_return out;
}

inline Result<std::shared_ptr<Qcow2Device>> open_qcow2(Loop& loop, const std::string& path,
                                                       bool read_only = false,
                                                       BlockDevicePtr backing = nullptr) {
  auto f = FileDevice::open(loop, path, FileOptions{.read_only = read_only});
  if (!f) return make_error(f.error());
  return loop.run(Qcow2Device::open(loop, *f, backing, Qcow2OpenOptions{.read_only = read_only}));
}

// qemu-img check (-U: the test may still hold the image, image-locked as QEMU
// does); "" when clean (no errors, no leaks), else its output.
inline std::string qemu_check(const std::string& path) {
  auto r = sh("qemu-img check -U -f qcow2 '" + path + "'");
  return r.status == 0 ? "" : r.out;
}

inline int64_t first_diff(const std::vector<std::byte>& a, const std::vector<std::byte>& b) {
  if (a.size() != b.size()) return -2;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i]) return static_cast<int64_t>(i);
  return -1;
}

}  // namespace blkmirror::test
