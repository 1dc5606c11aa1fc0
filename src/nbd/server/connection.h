// Connection: one NBD client. The handshake (handshake.cc) negotiates options
// and picks an export; the transmission phase (connection.cc) reads requests,
// validates each one before any I/O, runs up to kMaxInFlightPerConn of them
// concurrently, and sends replies (possibly out of order) through a single
// writer so they never interleave on the socket.
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

namespace blkmirror::nbd {

class Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(NbdServer& server, asio::generic::stream_protocol::socket sock)
      : server_(server), sock_(std::move(sock)) {}

  Task<void> run(std::shared_ptr<Connection> self);
  void close();
  Export* current_export() const { return export_; }

 private:
  // Handshake (handshake.cc). Returns the chosen export, or nullptr to close.
  Task<Export*> handshake();
  Task<bool> handle_option(const OptionHeader& h, std::vector<std::byte>& data, Export*& chosen,
                           bool& done);
  Task<bool> reply_info(uint32_t option, const GoRequest& go, Export* exp);
  Task<bool> reply_meta(uint32_t option, const MetaRequest& m, Export* exp);
  Task<bool> send_option_reply(uint32_t option, uint32_t type,
                               std::span<const std::byte> data = {});
  uint16_t transmission_flags(const Export& e) const;

  // Transmission (connection.cc).
  Task<void> transmission(Export* exp);
  Task<void> handle(Request r, std::vector<std::byte> payload, std::shared_ptr<Connection> self);
  Task<void> do_read(const Request& r);
  Task<void> do_block_status(const Request& r);
  void send_simple(uint64_t cookie, uint32_t error);
  void send_error(const Request& r, uint32_t error);
  void queue(std::vector<std::byte> buf);
  Task<void> writer(std::shared_ptr<Connection> self);

  // Reads exactly len bytes, through a buffer: at high queue depth one recv
  // brings in many request headers (and small payloads) at once.
  Task<bool> read_exact(void* data, size_t len);
  Task<bool> write_all(std::span<const std::byte> data);

  NbdServer& server_;
  asio::generic::stream_protocol::socket sock_;
  bool no_zeroes_ = false;
  bool structured_ = false;
  // Meta contexts chosen by the last NBD_OPT_SET_META_CONTEXT, for meta_export_.
  bool meta_base_allocation_ = false;
  bool meta_allocation_depth_ = false;
  std::string meta_export_;  // export the meta contexts were negotiated for
  Export* export_ = nullptr;
  ExportLimits limits_;
  bool closed_ = false;
  std::vector<std::byte> in_buf_ = std::vector<std::byte>(256 << 10);
  size_t in_pos_ = 0, in_end_ = 0;

  std::deque<std::vector<std::byte>> out_;
  uint64_t out_bytes_ = 0;  // queued and not yet written
  bool writing_ = false;
  unsigned in_flight_ = 0;
  Notifier slot_free_;
  Gate requests_;
};

}  // namespace blkmirror::nbd
