// NBD wire protocol (NetworkBlockDevice/nbd doc/proto.md): constants, message
// structs, and pure encode/decode. Everything on the wire is big-endian
// (network byte order); the structs here hold host-order values and the
// functions convert. No I/O happens here: this is the fuzz surface.
// Thread-safe (pure functions).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "base/limits.h"

namespace blkmirror::nbd {

// Magics.
inline constexpr uint64_t kNbdMagic = 0x4e42444d41474943ull;        // "NBDMAGIC"
inline constexpr uint64_t kOptsMagic = 0x49484156454F5054ull;       // "IHAVEOPT"
inline constexpr uint64_t kOptReplyMagic = 0x0003e889045565a9ull;
inline constexpr uint32_t kRequestMagic = 0x25609513;
inline constexpr uint32_t kSimpleReplyMagic = 0x67446698;
inline constexpr uint32_t kStructuredReplyMagic = 0x668e33ef;

// Handshake flags (server) and client flags.
inline constexpr uint16_t kFlagFixedNewstyle = 1 << 0;
inline constexpr uint16_t kFlagNoZeroes = 1 << 1;
inline constexpr uint32_t kClientFixedNewstyle = 1 << 0;
inline constexpr uint32_t kClientNoZeroes = 1 << 1;

// Options.
enum Opt : uint32_t {
  kOptExportName = 1,
  kOptAbort = 2,
  kOptList = 3,
  kOptStartTls = 5,
  kOptInfo = 6,
  kOptGo = 7,
  kOptStructuredReply = 8,
  kOptListMetaContext = 9,
  kOptSetMetaContext = 10,
};

// Option reply types.
inline constexpr uint32_t kRepAck = 1;
inline constexpr uint32_t kRepServer = 2;
inline constexpr uint32_t kRepInfo = 3;
inline constexpr uint32_t kRepMetaContext = 4;
inline constexpr uint32_t kRepErrBit = 1u << 31;
inline constexpr uint32_t kRepErrUnsup = kRepErrBit | 1;
inline constexpr uint32_t kRepErrPolicy = kRepErrBit | 2;
inline constexpr uint32_t kRepErrInvalid = kRepErrBit | 3;
inline constexpr uint32_t kRepErrPlatform = kRepErrBit | 4;
inline constexpr uint32_t kRepErrTlsReqd = kRepErrBit | 5;
inline constexpr uint32_t kRepErrUnknown = kRepErrBit | 6;
inline constexpr uint32_t kRepErrShutdown = kRepErrBit | 7;
inline constexpr uint32_t kRepErrBlockSizeReqd = kRepErrBit | 8;
inline constexpr uint32_t kRepErrTooBig = kRepErrBit | 9;

// NBD_INFO types.
inline constexpr uint16_t kInfoExport = 0;
inline constexpr uint16_t kInfoName = 1;
inline constexpr uint16_t kInfoDescription = 2;
inline constexpr uint16_t kInfoBlockSize = 3;

// Transmission flags.
inline constexpr uint16_t kFlagHasFlags = 1 << 0;
inline constexpr uint16_t kFlagReadOnly = 1 << 1;
inline constexpr uint16_t kFlagSendFlush = 1 << 2;
inline constexpr uint16_t kFlagSendFua = 1 << 3;
inline constexpr uint16_t kFlagRotational = 1 << 4;
inline constexpr uint16_t kFlagSendTrim = 1 << 5;
inline constexpr uint16_t kFlagSendWriteZeroes = 1 << 6;
inline constexpr uint16_t kFlagSendDf = 1 << 7;
inline constexpr uint16_t kFlagCanMultiConn = 1 << 8;
inline constexpr uint16_t kFlagSendCache = 1 << 10;
inline constexpr uint16_t kFlagSendFastZero = 1 << 11;

// Commands and command flags.
enum Cmd : uint16_t {
  kCmdRead = 0,
  kCmdWrite = 1,
  kCmdDisc = 2,
  kCmdFlush = 3,
  kCmdTrim = 4,
  kCmdCache = 5,
  kCmdWriteZeroes = 6,
  kCmdBlockStatus = 7,
};
inline constexpr uint16_t kCmdFlagFua = 1 << 0;
inline constexpr uint16_t kCmdFlagNoHole = 1 << 1;
inline constexpr uint16_t kCmdFlagDf = 1 << 2;
inline constexpr uint16_t kCmdFlagReqOne = 1 << 3;
inline constexpr uint16_t kCmdFlagFastZero = 1 << 4;

// Structured reply flags and types.
inline constexpr uint16_t kReplyFlagDone = 1 << 0;
inline constexpr uint16_t kReplyNone = 0;
inline constexpr uint16_t kReplyOffsetData = 1;
inline constexpr uint16_t kReplyOffsetHole = 2;
inline constexpr uint16_t kReplyBlockStatus = 5;
inline constexpr uint16_t kReplyError = (1 << 15) + 1;
inline constexpr uint16_t kReplyErrorOffset = (1 << 15) + 2;

// Block status flags for base:allocation.
inline constexpr uint32_t kStateHole = 1 << 0;
inline constexpr uint32_t kStateZero = 1 << 1;

// Errors on the wire (independent of the host's errno values).
inline constexpr uint32_t kEperm = 1;
inline constexpr uint32_t kEio = 5;
inline constexpr uint32_t kEnomem = 12;
inline constexpr uint32_t kEinval = 22;
inline constexpr uint32_t kEnospc = 28;
inline constexpr uint32_t kEoverflow = 75;
inline constexpr uint32_t kEnotsup = 95;
inline constexpr uint32_t kEshutdown = 108;
// Maps a host errno to the wire error the spec allows (unknown -> EINVAL/EIO).
uint32_t errno_to_wire(int errnum);

inline constexpr const char* kBaseAllocation = "base:allocation";
// QEMU's context: per extent, the backing-chain layer that provides it (0 none,
// 1 the exported image, 2 its backing file, ...), as a 32-bit value.
inline constexpr const char* kAllocationDepth = "qemu:allocation-depth";
// Context ids we hand out (any non-zero values would do; they are per connection).
inline constexpr uint32_t kMetaIdBaseAllocation = 1;
inline constexpr uint32_t kMetaIdAllocationDepth = 2;
// QEMU's dirty bitmap contexts, one per exported bitmap: per extent, 1 when it
// is dirty in the bitmap, 0 when clean. Ids kMetaIdFirstBitmap + the bitmap's
// index in the export.
inline constexpr const char* kDirtyBitmapPrefix = "qemu:dirty-bitmap:";
inline constexpr uint32_t kMetaIdFirstBitmap = 16;
inline constexpr uint32_t kStateDirty = 1;
inline constexpr size_t kMaxStringLen = 4096;
inline constexpr size_t kRequestSize = 28;

struct Request {
  uint16_t flags = 0;
  uint16_t type = 0;
  uint64_t cookie = 0;
  uint64_t offset = 0;
  uint32_t length = 0;
};

// A byte cursor for decoding; every read checks bounds.
class Reader {
 public:
  explicit Reader(std::span<const std::byte> data) : data_(data) {}
  bool u16(uint16_t& v);
  bool u32(uint32_t& v);
  bool u64(uint64_t& v);
  bool string(size_t len, std::string& out);
  size_t left() const { return data_.size() - pos_; }

 private:
  std::span<const std::byte> data_;
  size_t pos_ = 0;
};

// Appends big-endian values to a buffer.
class Writer {
 public:
  explicit Writer(std::vector<std::byte>& out) : out_(out) {}
  Writer& u16(uint16_t v);
  Writer& u32(uint32_t v);
  Writer& u64(uint64_t v);
  Writer& bytes(std::span<const std::byte> b);
  Writer& str(const std::string& s);

 private:
  std::vector<std::byte>& out_;
};

// Request header: nullopt when the magic is wrong.
std::optional<Request> decode_request(std::span<const std::byte, kRequestSize> raw);
void encode_request(const Request& r, std::vector<std::byte>& out);

// Option header from the client (after IHAVEOPT): option and its data length.
struct OptionHeader {
  uint32_t option = 0;
  uint32_t length = 0;
};
std::optional<OptionHeader> decode_option_header(std::span<const std::byte, 16> raw);

// NBD_OPT_GO / NBD_OPT_INFO data: export name and requested info types.
struct GoRequest {
  std::string name;
  std::vector<uint16_t> infos;
};
std::optional<GoRequest> decode_go(std::span<const std::byte> data);
// The optional NBD_INFO replies a GO/INFO request gets (kInfoName,
// kInfoDescription), each once, in the order first asked: however often a
// client repeats a type, the reply stays a few messages. NBD_INFO_EXPORT and
// NBD_INFO_BLOCK_SIZE are always sent and unknown types ignored, so neither
// appears here.
std::vector<uint16_t> info_replies(const GoRequest& go);

// NBD_OPT_{LIST,SET}_META_CONTEXT data: export name and queries.
struct MetaRequest {
  std::string name;
  std::vector<std::string> queries;
};
std::optional<MetaRequest> decode_meta(std::span<const std::byte> data);

void encode_option_reply(uint32_t option, uint32_t type, std::span<const std::byte> data,
                         std::vector<std::byte>& out);
void encode_simple_reply(uint32_t error, uint64_t cookie, std::vector<std::byte>& out);
// Structured reply chunk header; the payload (length bytes) follows.
void encode_structured_header(uint16_t flags, uint16_t type, uint64_t cookie, uint32_t length,
                              std::vector<std::byte>& out);

// What an export offers a request, for validation.
struct ExportLimits {
  uint64_t size = 0;
  bool read_only = false;
  bool structured = false;       // structured replies negotiated
  bool meta_base_allocation = false;
  bool meta_allocation_depth = false;
  bool meta_dirty_bitmap = false;  // at least one qemu:dirty-bitmap context
  uint32_t max_payload = kMaxRequestBytes;
};

// Validate, then dispatch: the wire error for a request before any I/O, or 0.
uint32_t validate_request(const Request& r, const ExportLimits& lim);

}  // namespace blkmirror::nbd
