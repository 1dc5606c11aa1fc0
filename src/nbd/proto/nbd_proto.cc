#include "nbd/proto/nbd_proto.h"

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace blkmirror::nbd {

namespace {

template <class T>
T load_be(const std::byte* p) {
  T v = 0;
  for (size_t i = 0; i < sizeof(T); ++i) v = static_cast<T>((v << 8) | static_cast<uint8_t>(p[i]));
  return v;
}

template <class T>
void store_be(std::vector<std::byte>& out, T v) {
  for (size_t i = 0; i < sizeof(T); ++i)
    out.push_back(static_cast<std::byte>((v >> (8 * (sizeof(T) - 1 - i))) & 0xff));
}

}  // namespace

uint32_t errno_to_wire(int e) {
  switch (e) {
    case 0: return 0;
    case EPERM:
    case EROFS:
    case EACCES: return kEperm;
    case EIO: return kEio;
    case ENOMEM: return kEnomem;
    case EINVAL: return kEinval;
    case ENOSPC:
    case EDQUOT:
    case EFBIG: return kEnospc;
    case EOVERFLOW: return kEoverflow;
    case ENOTSUP: return kEnotsup;
    case ESHUTDOWN: return kEshutdown;
    default: return kEio;
  }
}

bool Reader::u16(uint16_t& v) {
  if (left() < 2) return false;
  v = load_be<uint16_t>(data_.data() + pos_);
  pos_ += 2;
  return true;
}
bool Reader::u32(uint32_t& v) {
  if (left() < 4) return false;
  v = load_be<uint32_t>(data_.data() + pos_);
  pos_ += 4;
  return true;
}
bool Reader::u64(uint64_t& v) {
  if (left() < 8) return false;
  v = load_be<uint64_t>(data_.data() + pos_);
  pos_ += 8;
  return true;
}
bool Reader::string(size_t len, std::string& out) {
  if (len > left() || len > kMaxStringLen) return false;
  out.assign(reinterpret_cast<const char*>(data_.data() + pos_), len);
  pos_ += len;
  // Strings must not contain NUL.
  return out.find('\0') == std::string::npos;
}

Writer& Writer::u16(uint16_t v) { store_be(out_, v); return *this; }
Writer& Writer::u32(uint32_t v) { store_be(out_, v); return *this; }
Writer& Writer::u64(uint64_t v) { store_be(out_, v); return *this; }
Writer& Writer::bytes(std::span<const std::byte> b) {
  out_.insert(out_.end(), b.begin(), b.end());
  return *this;
}
Writer& Writer::str(const std::string& s) {
  return bytes({reinterpret_cast<const std::byte*>(s.data()), s.size()});
}

std::optional<Request> decode_request(std::span<const std::byte, kRequestSize> raw) {
  Reader r(raw);
  uint32_t magic = 0;
  Request req;
  r.u32(magic);
  r.u16(req.flags);
  r.u16(req.type);
  r.u64(req.cookie);
  r.u64(req.offset);
  r.u32(req.length);
  if (magic != kRequestMagic) return std::nullopt;
  return req;
}

void encode_request(const Request& r, std::vector<std::byte>& out) {
  Writer(out).u32(kRequestMagic).u16(r.flags).u16(r.type).u64(r.cookie).u64(r.offset).u32(r.length);
}

std::optional<OptionHeader> decode_option_header(std::span<const std::byte, 16> raw) {
  Reader r(raw);
  uint64_t magic = 0;
  OptionHeader h;
  r.u64(magic);
  r.u32(h.option);
  r.u32(h.length);
  if (magic != kOptsMagic) return std::nullopt;
  return h;
}

std::optional<GoRequest> decode_go(std::span<const std::byte> data) {
  Reader r(data);
  GoRequest g;
  uint32_t name_len = 0;
  uint16_t n = 0;
  if (!r.u32(name_len) || !r.string(name_len, g.name) || !r.u16(n)) return std::nullopt;
  for (uint16_t i = 0; i < n; ++i) {
    uint16_t t = 0;
    if (!r.u16(t)) return std::nullopt;
    g.infos.push_back(t);
  }
  if (r.left() != 0) return std::nullopt;
  return g;
}

std::vector<uint16_t> info_replies(const GoRequest& go) {
  std::vector<uint16_t> out;
  for (uint16_t t : go.infos) {
    if (t != kInfoName && t != kInfoDescription) continue;
    if (std::find(out.begin(), out.end(), t) == out.end()) out.push_back(t);
  }
  return out;
}

std::optional<MetaRequest> decode_meta(std::span<const std::byte> data) {
  Reader r(data);
  MetaRequest m;
  uint32_t name_len = 0, n = 0;
  if (!r.u32(name_len) || !r.string(name_len, m.name) || !r.u32(n)) return std::nullopt;
  if (n > data.size()) return std::nullopt;  // each query needs at least 4 bytes
  for (uint32_t i = 0; i < n; ++i) {
    uint32_t len = 0;
    std::string q;
    if (!r.u32(len) || !r.string(len, q)) return std::nullopt;
    m.queries.push_back(std::move(q));
  }
  if (r.left() != 0) return std::nullopt;
  return m;
}

void encode_option_reply(uint32_t option, uint32_t type, std::span<const std::byte> data,
                         std::vector<std::byte>& out) {
  Writer(out)
      .u64(kOptReplyMagic)
      .u32(option)
      .u32(type)
      .u32(static_cast<uint32_t>(data.size()))
      .bytes(data);
}

void encode_simple_reply(uint32_t error, uint64_t cookie, std::vector<std::byte>& out) {
  Writer(out).u32(kSimpleReplyMagic).u32(error).u64(cookie);
}

void encode_structured_header(uint16_t flags, uint16_t type, uint64_t cookie, uint32_t length,
                              std::vector<std::byte>& out) {
  Writer(out).u32(kStructuredReplyMagic).u16(flags).u16(type).u64(cookie).u32(length);
}

uint32_t validate_request(const Request& r, const ExportLimits& lim) {
  const uint16_t known_flags =
      kCmdFlagFua | kCmdFlagNoHole | kCmdFlagDf | kCmdFlagReqOne | kCmdFlagFastZero;
  if (r.flags & ~known_flags) return kEinval;
  switch (r.type) {
    case kCmdRead:
    case kCmdWrite:
    case kCmdTrim:
    case kCmdWriteZeroes:
    case kCmdCache:
    case kCmdBlockStatus:
      break;
    case kCmdFlush:
      if (r.offset != 0 || r.length != 0) return kEinval;
      return 0;
    case kCmdDisc:
      return 0;
    default:
      return kEinval;
  }
  // Flags only where they mean something.
  if ((r.flags & kCmdFlagFua) && r.type != kCmdWrite && r.type != kCmdTrim &&
      r.type != kCmdWriteZeroes)
    return kEinval;
  if ((r.flags & (kCmdFlagNoHole | kCmdFlagFastZero)) && r.type != kCmdWriteZeroes) return kEinval;
  if ((r.flags & kCmdFlagDf) && (r.type != kCmdRead || !lim.structured)) return kEinval;
  if ((r.flags & kCmdFlagReqOne) && r.type != kCmdBlockStatus) return kEinval;
  if (r.type == kCmdBlockStatus && !lim.meta_base_allocation && !lim.meta_allocation_depth &&
      !lim.meta_dirty_bitmap)
    return kEinval;
  // Range: no overflow, inside the export.
  if (r.offset > lim.size || r.length > lim.size - r.offset) {
    // Writes past the end are "no space"; everything else is invalid.
    return (r.type == kCmdWrite || r.type == kCmdWriteZeroes) && r.offset <= lim.size ? kEnospc
                                                                                         : kEinval;
  }
  if (r.length == 0 && r.type != kCmdCache) return kEinval;
  if ((r.type == kCmdRead || r.type == kCmdWrite) && r.length > lim.max_payload)
    return lim.structured ? kEoverflow : kEinval;
  if (lim.read_only &&
      (r.type == kCmdWrite || r.type == kCmdTrim || r.type == kCmdWriteZeroes))
    return kEperm;
  return 0;
}

}  // namespace blkmirror::nbd
