#include "blockdev/image_format.h"

#include <sys/stat.h>

#include <array>
#include <cstring>
#include <filesystem>

#include <fmt/format.h>

namespace blkmirror {

const char* to_string(ImageFormat f) { return f == ImageFormat::kQcow2 ? "qcow2" : "raw"; }

Result<ImageFormat> parse_image_format(std::string_view name) {
  if (name == "raw") return ImageFormat::kRaw;
  if (name == "qcow2") return ImageFormat::kQcow2;
  return make_plain_error(EINVAL, fmt::format("unknown image format '{}' (raw or qcow2)", name));
}

Task<Result<ImageFormat>> detect_image_format(BlockDevice& file) {
  static constexpr std::array<unsigned char, 4> kMagic = {'Q', 'F', 'I', 0xfb};
  if (file.length() < kMagic.size()) co_return ImageFormat::kRaw;
  std::array<std::byte, 4> head{};
  auto r = co_await file.read(0, head);
  if (!r) co_return make_error(r.error());
  co_return std::memcmp(head.data(), kMagic.data(), kMagic.size()) == 0 ? ImageFormat::kQcow2
                                                                       : ImageFormat::kRaw;
}

Result<std::string> resolve_backing_path(const std::string& overlay_path, bool overlay_is_local,
                                         const std::string& backing_name) {
  std::filesystem::path b(backing_name);
  if (b.is_absolute()) return backing_name;
  if (!overlay_is_local)
    return make_plain_error(EINVAL, fmt::format("Cannot use relative backing file name '{}' for "
                                                "'{}': it has no directory",
                                                backing_name, overlay_path));
  return (std::filesystem::path(overlay_path).parent_path() / b).lexically_normal().string();
}

Result<void> ChainGuard::enter(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0)
    return make_plain_error(errno,
                            fmt::format("Could not open '{}': {}", path, std::strerror(errno)));
  if (top_.empty()) top_ = path;
  if (!seen_.emplace(st.st_dev, st.st_ino).second)
    return make_plain_error(ELOOP, fmt::format("Backing chain of '{}' loops: '{}' is already in "
                                               "the chain",
                                               top_, path));
  return {};
}

std::string absolute_path(const std::string& p) {
  std::error_code ec;
  auto a = std::filesystem::absolute(p, ec);
  return ec ? p : a.lexically_normal().string();
}

}  // namespace blkmirror
