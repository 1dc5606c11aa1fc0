#include "journal/bitmap_file.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <filesystem>

namespace blkmirror {

namespace {

constexpr size_t kHeaderBytes = 56;
constexpr size_t kEntryFixed = 16;
constexpr uint16_t kInUse = 1, kAuto = 2;
constexpr uint32_t kMaxEntries = 65535;

uint64_t pad8(uint64_t n) { return (n + 7) / 8 * 8; }

void put(std::vector<std::byte>& out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out.push_back(static_cast<std::byte>((v >> (8 * i)) & 0xff));
}

uint64_t get(std::span<const std::byte> b, size_t at, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v |= uint64_t{static_cast<uint8_t>(b[at + i])} << (8 * i);
  return v;
}

uint64_t data_bytes(uint64_t length, uint64_t granularity) {
  return ((length + granularity - 1) / granularity + 7) / 8;
}

tl::unexpected<Error> bad(const std::string& what) { return make_plain_error(EINVAL, what); }

}  // namespace

std::string bitmap_file_path(const std::string& image_path) {
  return image_path + kBitmapFileSuffix;
}

Result<ImageStamp> stamp_image(const std::string& image_path) {
  struct stat st {};
  if (::stat(image_path.c_str(), &st) != 0) return make_error(errno, "stat " + image_path);
  ImageStamp s;
  s.dev = st.st_dev;
  s.ino = S_ISBLK(st.st_mode) ? st.st_rdev : st.st_ino;
  s.length = static_cast<uint64_t>(st.st_size);
  s.mtime_ns = uint64_t(st.st_mtim.tv_sec) * 1000000000ull + uint64_t(st.st_mtim.tv_nsec);
  return s;
}

std::vector<std::byte> encode_bitmap_file(const BitmapFileContents& c) {
  std::vector<std::byte> out;
  for (char ch : kBitmapFileMagic) out.push_back(static_cast<std::byte>(ch));
  put(out, kBitmapFileVersion, 4);
  put(out, 0, 4);
  put(out, c.stamp.dev, 8);
  put(out, c.stamp.ino, 8);
  put(out, c.stamp.length, 8);
  put(out, c.stamp.mtime_ns, 8);
  put(out, c.entries.size(), 4);
  put(out, 0, 4);
  for (const auto& e : c.entries) {
    put(out, e.name.size(), 2);
    put(out, (e.in_use ? kInUse : 0) | (e.enabled ? kAuto : 0), 2);
    put(out, static_cast<uint64_t>(std::countr_zero(e.granularity)), 1);
    put(out, 0, 3);
    put(out, e.data.size(), 8);
    for (char ch : e.name) out.push_back(static_cast<std::byte>(ch));
    out.resize(pad8(out.size()), std::byte{0});
  }
  for (const auto& e : c.entries) {
    out.insert(out.end(), e.data.begin(), e.data.end());
    out.resize(pad8(out.size()), std::byte{0});
  }
  put(out, XXH64(out.data(), out.size(), 0), 8);
  return out;
}

Result<BitmapFileContents> parse_bitmap_file(std::span<const std::byte> b) {
  if (b.size() < kHeaderBytes + 8 || std::memcmp(b.data(), kBitmapFileMagic, 8) != 0)
    return bad("not a blkmirror bitmaps file");
  if (get(b, 8, 4) != kBitmapFileVersion)
    return bad(
        fmt::format("version {} (this blkmirror reads {})", get(b, 8, 4), kBitmapFileVersion));
  const size_t body = b.size() - 8;
  if (XXH64(b.data(), body, 0) != get(b, body, 8)) return bad("checksum mismatch");
  BitmapFileContents c;
  c.stamp = {get(b, 16, 8), get(b, 24, 8), get(b, 32, 8), get(b, 40, 8)};
  const uint64_t count = get(b, 48, 4);
  if (count > kMaxEntries) return bad(fmt::format("{} bitmaps (at most {})", count, kMaxEntries));
  size_t pos = kHeaderBytes;
  for (uint64_t i = 0; i < count; ++i) {
    if (body - pos < kEntryFixed) return bad(fmt::format("entry {}: truncated", i));
    BitmapFileEntry e;
    const uint64_t name_len = get(b, pos, 2), flags = get(b, pos + 2, 2);
    const uint64_t gbits = get(b, pos + 4, 1), bytes = get(b, pos + 8, 8);
    if (name_len == 0 || name_len > kMaxBitmapNameLength)
      return bad(fmt::format("entry {}: name of {} bytes", i, name_len));
    if (flags & ~uint64_t{kInUse | kAuto}) return bad(fmt::format("entry {}: unknown flags", i));
    if (gbits < 9 || gbits > 31)
      return bad(fmt::format("entry {}: granularity bits {} out of range", i, gbits));
    if (body - pos - kEntryFixed < pad8(name_len))
      return bad(fmt::format("entry {}: truncated", i));
    e.name.assign(reinterpret_cast<const char*>(&b[pos + kEntryFixed]), name_len);
    e.granularity = uint64_t{1} << gbits;
    e.in_use = flags & kInUse;
    e.enabled = flags & kAuto;
    if (bytes > body) return bad(fmt::format("entry {}: truncated", i));
    const uint64_t want = e.in_use ? 0 : data_bytes(c.stamp.length, e.granularity);
    if (bytes != want)
      return bad(fmt::format("entry {}: {} bytes of data, {} expected", i, bytes, want));
    for (const auto& o : c.entries)
      if (o.name == e.name) return bad(fmt::format("entry {}: bitmap '{}' twice", i, e.name));
    e.data.resize(bytes);  // filled below
    c.entries.push_back(std::move(e));
    pos += kEntryFixed + pad8(name_len);
  }
  for (auto& e : c.entries) {
    if (body - pos < pad8(e.data.size()))
      return bad(fmt::format("bitmap '{}': data truncated", e.name));
    std::copy_n(&b[pos], e.data.size(), e.data.begin());
    pos += pad8(e.data.size());
  }
  if (pos != body) return bad("trailing bytes before the checksum");
  return c;
}

Result<std::shared_ptr<BitmapFile>> BitmapFile::open(const std::string& image, bool writable) {
  const std::string path = bitmap_file_path(image);
  BitmapFileContents c;
  auto now = stamp_image(image);
  if (!now) return make_error(now.error());
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0 && errno != ENOENT) return make_error(errno, "open " + path);
  if (fd >= 0) {
    std::vector<std::byte> bytes;
    std::byte buf[65536];
    ssize_t n;
    while ((n = ::read(fd, buf, sizeof buf)) > 0) bytes.insert(bytes.end(), buf, buf + n);
    const int err = errno;
    ::close(fd);
    if (n < 0) return make_error(err, "read " + path);
    auto p = parse_bitmap_file(bytes);
    if (!p) return make_plain_error(EINVAL, fmt::format("{}: {}", path, p.error().message()));
    c = std::move(*p);
  } else {
    c.stamp = *now;
  }
  // Another program wrote the image since the last clean store: nothing it
  // holds can be trusted.
  const bool changed = !(c.stamp == *now);
  auto f = std::shared_ptr<BitmapFile>(new BitmapFile(image, path, writable, c, changed));
  if (writable && !c.entries.empty()) {
    for (auto& e : c.entries) {
      e.in_use = true;
      e.data.clear();
    }
    if (auto r = f->write(c); !r) return make_error(r.error());
  }
  return f;
}

BitmapFile::BitmapFile(std::string image, std::string path, bool writable, BitmapFileContents c,
                       bool stale)
    : image_(std::move(image)),
      path_(std::move(path)),
      writable_(writable),
      contents_(c),
      loaded_(c) {
  for (const auto& e : c.entries)
    if (e.in_use || stale) stale_.push_back(e.name);
}

Result<void> BitmapFile::write(const BitmapFileContents& c) {
  if (c.entries.empty()) {
    if (::unlink(path_.c_str()) != 0 && errno != ENOENT)
      return make_error(errno, "unlink " + path_);
    contents_ = c;
    return {};
  }
  const auto bytes = encode_bitmap_file(c);
  const std::string tmp = path_ + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return make_error(errno, "create " + tmp);
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = n < 0 ? errno : EIO;
      ::close(fd);
      ::unlink(tmp.c_str());
      return make_error(err, "write " + tmp);
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) {
    const int err = errno;
    ::close(fd);
    ::unlink(tmp.c_str());
    return make_error(err, "fsync " + tmp);
  }
  ::close(fd);
  if (::rename(tmp.c_str(), path_.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    return make_error(err, "rename " + tmp);
  }
  const std::string dir = std::filesystem::path(path_).parent_path().string();
  int dfd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    (void)::fsync(dfd);
    ::close(dfd);
  }
  contents_ = c;
  return {};
}

Task<Result<std::vector<NamedBitmap>>> BitmapFile::load() {
  std::vector<NamedBitmap> out;
  auto now = stamp_image(image_);
  if (!now) co_return make_error(now.error());
  for (const auto& e : loaded_.entries) {
    NamedBitmap& b = out.emplace_back(e.name, e.granularity, now->length);
    b.persistent = true;
    b.enabled = e.enabled;
    b.read_only = !writable_;
    if (std::find(stale_.begin(), stale_.end(), e.name) != stale_.end()) {
      b.inconsistent = true;
      continue;
    }
    const std::vector<std::byte>& data = e.data;
    DirtyBitmap bits = b.bits();
    for (uint64_t i = 0; i < bits.size() && i / 8 < data.size(); ++i)
      if ((static_cast<uint8_t>(data[i / 8]) >> (i % 8)) & 1) bits.set(i, 1);
    b.restore(bits);
  }
  co_return out;
}

Result<void> BitmapFile::can_store(const BitmapSet& set, const std::string& name,
                                   uint64_t granularity) const {
  if (name.size() > kMaxBitmapNameLength)
    return make_plain_error(
        EINVAL, fmt::format("Name length exceeds maximum ({} characters)", kMaxBitmapNameLength));
  if (granularity > (uint64_t{1} << 31))
    return make_plain_error(EINVAL, "Granularity exceeds maximum (2147483648 bytes)");
  size_t n = 1;
  for (const NamedBitmap& b : set) n += b.persistent;
  if (n > kMaxEntries)
    return make_plain_error(EINVAL, "Maximum number of persistent bitmaps is already reached");
  return {};
}

Task<Result<void>> BitmapFile::store(const BitmapSet& set) {
  if (!writable_) co_return Result<void>{};
  auto now = stamp_image(image_);
  if (!now) co_return make_error(now.error());
  BitmapFileContents c;
  c.stamp = *now;
  // Oldest first; inconsistent ones stay as found (in use).
  std::vector<const NamedBitmap*> order;
  for (const NamedBitmap& b : set)
    if (b.persistent) order.insert(order.begin(), &b);
  for (const NamedBitmap* b : order) {
    BitmapFileEntry e{b->name(), b->granularity(), b->inconsistent, b->enabled, {}};
    if (!b->inconsistent) {
      e.data.assign(data_bytes(now->length, b->granularity()), std::byte{0});
      for (auto r = b->bits().next_set(0); r; r = b->bits().next_set(*r + 1))
        if (*r / 8 < e.data.size()) e.data[*r / 8] |= static_cast<std::byte>(1u << (*r % 8));
    }
    c.entries.push_back(std::move(e));
  }
  co_return write(c);
}

Task<Result<void>> BitmapFile::remove(const std::string& name) {
  if (!writable_) co_return make_error(EROFS, path_);
  BitmapFileContents c = contents_;
  std::erase_if(c.entries, [&](const BitmapFileEntry& e) { return e.name == name; });
  if (c.entries.size() == contents_.entries.size()) co_return Result<void>{};
  co_return write(c);
}

}  // namespace blkmirror
