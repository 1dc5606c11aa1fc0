// The fixed newstyle handshake: greeting, client flags, then options until
// NBD_OPT_GO / NBD_OPT_EXPORT_NAME picks an export (or the client aborts).
//
// An option about an export holds it (ExportRef in export_) while it is
// answered: the replies may wait on a slow reader, and meanwhile the export
// must neither be freed nor be deleted "safely" as if nobody used it.
#include <array>

#include <spdlog/spdlog.h>

#include "nbd/server/connection.h"

namespace blkmirror::nbd {

namespace {
// Option payloads above kMaxOptionData are read and dropped up to this size
// (ERR_TOO_BIG); above it the connection is closed.
constexpr uint32_t kOptionDiscardLimit = 1 << 20;
// A client looping through options forever is cut off.
constexpr int kMaxOptions = 1000;
}  // namespace

uint16_t Connection::transmission_flags(const Export& e) const {
  uint16_t f = kFlagHasFlags | kFlagSendFlush | kFlagSendFua | kFlagSendTrim |
               kFlagSendWriteZeroes | kFlagSendCache | kFlagSendFastZero;
  // One connection at most: multi-conn would promise something nobody can use
  // (QEMU drops it for max-connections=1 too).
  if (server_.limits().max_connections != 1) f |= kFlagCanMultiConn;
  if (structured_) f |= kFlagSendDf;
  if (!e.writable) f |= kFlagReadOnly;
  return f;
}

Task<bool> Connection::send_option_reply(uint32_t option, uint32_t type,
                                         std::span<const std::byte> data) {
  std::vector<std::byte> buf;
  encode_option_reply(option, type, data, buf);
  co_return co_await write_all(buf);
}

Task<bool> Connection::handshake() {
  std::vector<std::byte> hello;
  Writer(hello).u64(kNbdMagic).u64(kOptsMagic).u16(kFlagFixedNewstyle | kFlagNoZeroes);
  if (!co_await write_all(hello)) co_return false;
  std::array<std::byte, 4> cf;
  if (!co_await read_exact(cf.data(), cf.size())) co_return false;
  uint32_t client_flags = 0;
  Reader(cf).u32(client_flags);
  if (client_flags & ~(kClientFixedNewstyle | kClientNoZeroes)) co_return false;
  no_zeroes_ = client_flags & kClientNoZeroes;
  // TLS needs fixed newstyle (NOTLS mode otherwise), and this server has no
  // plain-text mode when TLS is set.
  if (server_.tls() && !(client_flags & kClientFixedNewstyle)) co_return false;

  for (int options = 0; options < kMaxOptions; ++options) {
    std::array<std::byte, 16> raw;
    if (!co_await read_exact(raw.data(), raw.size())) co_return false;
    auto h = decode_option_header(raw);
    if (!h) co_return false;  // bad magic: not an NBD client
    if (h->length > NbdServer::kMaxOptionData) {
      // Too big to act on: skip it if that is cheap, else hang up. Skipping
      // goes through the small read buffer, so it costs no memory.
      if (h->length > kOptionDiscardLimit) co_return false;
      if (!co_await skip(h->length, false)) co_return false;
      if (!co_await send_option_reply(h->option, kRepErrTooBig)) co_return false;
      continue;
    }
    std::vector<std::byte> data(h->length);
    if (h->length && !co_await read_exact(data.data(), data.size())) co_return false;
    if (server_.tls() && !tls_) {
      // FORCEDTLS: nothing but STARTTLS before TLS is on, and nothing about the
      // exports leaks. EXPORT_NAME cannot be refused: hang up.
      if (h->option == kOptStartTls) {
        if (!co_await start_tls(*h, data)) co_return false;
        continue;
      }
      if (h->option == kOptExportName) co_return false;
      if (!co_await send_option_reply(h->option, kRepErrTlsReqd)) co_return false;
      if (h->option == kOptAbort) co_return false;
      continue;
    }
    bool done = false;
    if (!co_await handle_option(*h, data, done)) co_return false;
    if (done) co_return true;
    export_ = {};  // the option is answered: it no longer refers to an export
  }
  co_return false;
}

Task<bool> Connection::handle_option(const OptionHeader& h, std::vector<std::byte>& data,
                                     bool& done) {
  switch (h.option) {
    case kOptExportName: {
      std::string name(reinterpret_cast<const char*>(data.data()), data.size());
      export_ = server_.acquire_export(name);
      if (!export_) co_return false;  // this option has no error reply: hang up
      std::vector<std::byte> buf;
      Writer(buf).u64(export_->edge->length()).u16(transmission_flags(*export_));
      if (!no_zeroes_) buf.resize(buf.size() + 124);
      if (!co_await write_all(buf)) co_return false;
      done = true;
      co_return true;
    }
    case kOptAbort:
      co_await send_option_reply(h.option, kRepAck);
      co_return false;
    case kOptList: {
      if (!data.empty()) co_return co_await send_option_reply(h.option, kRepErrInvalid);
      // A copy: exports may come and go while the replies wait on the client.
      for (auto& [name, description] : server_.export_list()) {
        std::vector<std::byte> d;
        Writer(d).u32(static_cast<uint32_t>(name.size())).str(name).str(description);
        if (!co_await send_option_reply(h.option, kRepServer, d)) co_return false;
      }
      co_return co_await send_option_reply(h.option, kRepAck);
    }
    case kOptStructuredReply:
      if (!data.empty()) co_return co_await send_option_reply(h.option, kRepErrInvalid);
      structured_ = true;
      co_return co_await send_option_reply(h.option, kRepAck);
    case kOptInfo:
    case kOptGo: {
      auto go = decode_go(data);
      if (!go) co_return co_await send_option_reply(h.option, kRepErrInvalid);
      export_ = server_.acquire_export(go->name);
      if (!export_) co_return co_await send_option_reply(h.option, kRepErrUnknown);
      if (!co_await reply_info(h.option, *go, *export_)) co_return false;
      if (h.option == kOptGo) done = true;  // export_ stays: transmission uses it
      co_return true;
    }
    case kOptListMetaContext:
    case kOptSetMetaContext: {
      auto m = decode_meta(data);
      if (!m) co_return co_await send_option_reply(h.option, kRepErrInvalid);
      if (h.option == kOptSetMetaContext && !structured_)
        co_return co_await send_option_reply(h.option, kRepErrInvalid);
      export_ = server_.acquire_export(m->name);
      if (!export_) co_return co_await send_option_reply(h.option, kRepErrUnknown);
      co_return co_await reply_meta(h.option, *m, *export_);
    }
    case kOptStartTls:
      // Already on (its STARTTLS was handled above), or not configured.
      co_return co_await send_option_reply(h.option, tls_ ? kRepErrInvalid : kRepErrPolicy);
    default:
      co_return co_await send_option_reply(h.option, kRepErrUnsup);
  }
}

Task<bool> Connection::start_tls(const OptionHeader& h, const std::vector<std::byte>& data) {
  if (!data.empty()) co_return co_await send_option_reply(h.option, kRepErrInvalid);
  // Bytes already read past this option were sent before our ACK, in plain
  // text: a client (or someone between) injecting them is hung up on rather
  // than having them taken as if they came over TLS.
  if (in_pos_ < in_end_) co_return false;
  auto stream = TlsStream::create(server_.tls(), sock_);
  if (!stream) {
    spdlog::error("NBD client: {}", stream.error().message());
    co_await send_option_reply(h.option, kRepErrInvalid);
    co_return false;
  }
  if (!co_await send_option_reply(h.option, kRepAck)) co_return false;
  if (auto r = co_await (*stream)->handshake(); !r) {
    spdlog::warn("NBD client refused: {}", r.error().message());
    co_return false;
  }
  tls_ = std::move(*stream);
  co_return true;
}

Task<bool> Connection::reply_info(uint32_t option, const GoRequest& go, const Export& e) {
  std::vector<std::byte> d;
  Writer(d).u16(kInfoExport).u64(e.edge->length()).u16(transmission_flags(e));
  if (!co_await send_option_reply(option, kRepInfo, d)) co_return false;
  for (uint16_t info : info_replies(go)) {
    d.clear();
    Writer(d).u16(info).str(info == kInfoName ? e.name : e.description);
    if (!co_await send_option_reply(option, kRepInfo, d)) co_return false;
  }
  d.clear();
  Writer(d).u16(kInfoBlockSize).u32(1).u32(4096).u32(NbdServer::kMaxPayload);
  if (!co_await send_option_reply(option, kRepInfo, d)) co_return false;
  co_return co_await send_option_reply(option, kRepAck);
}

Task<bool> Connection::reply_meta(uint32_t option, const MetaRequest& m, const Export& e) {
  // The contexts: base:allocation; qemu:allocation-depth when the export
  // offers it; qemu:dirty-bitmap:NAME for each exported bitmap. An empty LIST
  // asks for everything; a LIST of "base:", "qemu:" or "qemu:dirty-bitmap:"
  // asks for that whole namespace. Unknown queries match nothing (no error),
  // as the spec asks.
  auto wanted = [&](const std::string& ctx, std::initializer_list<const char*> prefixes) {
    if (m.queries.empty()) return option == kOptListMetaContext;
    for (auto& q : m.queries) {
      if (q == ctx) return true;
      if (option == kOptListMetaContext)
        for (const char* p : prefixes)
          if (q == p) return true;
    }
    return false;
  };
  bool base = wanted(kBaseAllocation, {"base:"});
  bool depth = e.allocation_depth && wanted(kAllocationDepth, {"qemu:"});
  std::vector<size_t> bitmaps;
  for (size_t i = 0; i < e.bitmaps.size(); ++i)
    if (wanted(kDirtyBitmapPrefix + e.bitmaps[i]->name(), {"qemu:", kDirtyBitmapPrefix}))
      bitmaps.push_back(i);
  std::vector<std::byte> d;
  if (base) {
    Writer(d).u32(kMetaIdBaseAllocation).str(kBaseAllocation);
    if (!co_await send_option_reply(option, kRepMetaContext, d)) co_return false;
  }
  if (depth) {
    d.clear();
    Writer(d).u32(kMetaIdAllocationDepth).str(kAllocationDepth);
    if (!co_await send_option_reply(option, kRepMetaContext, d)) co_return false;
  }
  for (size_t i : bitmaps) {
    d.clear();
    Writer(d)
        .u32(kMetaIdFirstBitmap + static_cast<uint32_t>(i))
        .str(kDirtyBitmapPrefix + e.bitmaps[i]->name());
    if (!co_await send_option_reply(option, kRepMetaContext, d)) co_return false;
  }
  if (option == kOptSetMetaContext) {
    meta_base_allocation_ = base;
    meta_allocation_depth_ = depth;
    meta_bitmaps_ = std::move(bitmaps);
    meta_export_ = e.name;
  }
  co_return co_await send_option_reply(option, kRepAck);
}

}  // namespace blkmirror::nbd
