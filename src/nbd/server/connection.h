// Connection: one NBD client. The handshake (handshake.cc) negotiates options
// and picks an export; the transmission phase (connection.cc) reads requests,
// validates each one before any I/O, runs up to kMaxInFlightPerConn of them
// concurrently, and sends replies (possibly out of order) through a single
// writer so they never interleave on the socket.
//
// What a client can make us hold is bounded: before the handshake completes,
// a kHandshakeReadBuffer read buffer and one option's data (at most
// kMaxOptionData), for at most ServerLimits::handshake_limit; a WRITE payload
// is committed as its bytes arrive (Payload) and a payload that stalls for
// payload_stall_limit closes the connection. One watchdog timer serves both
// deadlines.
//
// With TLS configured on the server (FORCEDTLS mode of the NBD protocol), the
// handshake refuses every option but NBD_OPT_STARTTLS until TLS is on, and from
// then on every byte goes through the connection's TlsStream.
//
// Threading rule: loop thread only.
#pragma once

#include <deque>
#include <memory>
#include <string>
#include <vector>

#include <asio.hpp>

#include "base/gate.h"
#include "base/notifier.h"
#include "nbd/proto/nbd_proto.h"
#include "nbd/server/nbd_server.h"
#include "nbd/server/payload.h"
#include "nbd/server/tls.h"

namespace blkmirror::nbd {

class Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(NbdServer& server, asio::generic::stream_protocol::socket sock);

  Task<void> run(std::shared_ptr<Connection> self);
  void close();
  // The export this connection refers to now: the one an option in progress
  // is about, or the one chosen for transmission. nullptr otherwise.
  Export* current_export() const { return export_.get(); }

 private:
  // Handshake (handshake.cc). True when an export was chosen (held in export_).
  Task<bool> handshake();
  Task<bool> handle_option(const OptionHeader& h, std::vector<std::byte>& data, bool& done);
  Task<bool> reply_info(uint32_t option, const GoRequest& go, const Export& e);
  Task<bool> reply_meta(uint32_t option, const MetaRequest& m, const Export& e);
  Task<bool> send_option_reply(uint32_t option, uint32_t type,
                               std::span<const std::byte> data = {});
  uint16_t transmission_flags(const Export& e) const;

  // Transmission (connection.cc).
  Task<void> transmission();
  Task<void> handle(Request r, Payload payload, std::shared_ptr<Connection> self);
  // Send the reply; return the NBD error sent (0: success), for the statistics.
  Task<uint32_t> do_read(const Request& r);
  Task<uint32_t> do_block_status(const Request& r);
  void send_simple(uint64_t cookie, uint32_t error);
  void send_error(const Request& r, uint32_t error);
  void queue(std::vector<std::byte> buf);
  Task<void> writer(std::shared_ptr<Connection> self);

  // Reads exactly len bytes, through a buffer: at high queue depth one recv
  // brings in many request headers (and small payloads) at once. With
  // guard_stall, every arrival of bytes pushes the watchdog's deadline out by
  // payload_stall_limit (a payload that trickles in is fine; one that stops is not).
  Task<bool> read_exact(void* data, size_t len, bool guard_stall = false);
  // Reads and drops len bytes (an option or payload refused for its size).
  Task<bool> skip(uint64_t len, bool guard_stall);
  Task<bool> write_all(std::span<const std::byte> data);
  // Some bytes from the socket, through TLS once it is on; 0: closed or failed.
  Task<size_t> recv_some(std::span<std::byte> buf);
  // NBD_OPT_STARTTLS on a server that requires TLS: ACK, then the handshake.
  Task<bool> start_tls(const OptionHeader& h, const std::vector<std::byte>& data);

  // The watchdog closes the connection when the deadline passes.
  void arm(std::chrono::milliseconds limit);
  void disarm();
  Task<void> watchdog(std::shared_ptr<Connection> self);

  NbdServer& server_;
  asio::generic::stream_protocol::socket sock_;
  // Set once NBD_OPT_STARTTLS succeeded: every byte after it goes through it.
  std::unique_ptr<TlsStream> tls_;
  asio::steady_timer deadline_;
  bool no_zeroes_ = false;
  bool structured_ = false;
  // Meta contexts chosen by the last NBD_OPT_SET_META_CONTEXT, for meta_export_.
  bool meta_base_allocation_ = false;
  bool meta_allocation_depth_ = false;
  std::vector<size_t> meta_bitmaps_;  // indices into the export's bitmaps
  std::string meta_export_;  // export the meta contexts were negotiated for
  ExportRef export_;
  ExportLimits limits_;
  bool closed_ = false;
  bool negotiated_ = false;  // in transmission
  std::vector<std::byte> in_buf_ = std::vector<std::byte>(NbdServer::kHandshakeReadBuffer);
  size_t in_pos_ = 0, in_end_ = 0;

  std::deque<std::vector<std::byte>> out_;
  uint64_t out_bytes_ = 0;  // queued and not yet written
  bool writing_ = false;
  unsigned in_flight_ = 0;
  Notifier slot_free_;
  Gate requests_;
};

}  // namespace blkmirror::nbd
