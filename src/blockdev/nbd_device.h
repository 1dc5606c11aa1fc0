// NbdDevice: a BlockDevice on a remote NBD export (qemu-nbd, nbdkit, another
// blkmirror), through libnbd's asynchronous API on the Loop (nbd_connection.h).
//
// Mapping: read/write -> NBD_CMD_READ/WRITE (FUA native when the server offers
// it, else write + flush); write_zeroes -> NBD_CMD_WRITE_ZEROES with NO_HOLE
// unless may_unmap, FAST_ZERO for no_fallback (ENOTSUP without asking when the
// server has no fast zero); discard -> TRIM (a no-op when unsupported);
// block_status -> NBD_CMD_BLOCK_STATUS on "base:allocation" (without it,
// everything is data). caps() reports what the server negotiated.
//
// Block sizes: requests are split to the server's maximum payload (32 MiB when
// it gives none). Requests not aligned to the server's minimum block size are
// widened: reads through a bounce buffer, writes and zeroing by read-modify-
// write of the edge blocks. The read-modify-write is not atomic against a
// concurrent write to the same edge block; the mirror never issues overlapping
// operations, so it is safe for the job.
//
// Connections: one, or up to opts.max_connections when the server advertises
// multi-conn (then a flush on one covers writes completed on all); each
// request goes to the least busy one.
//
// Failures: a lost connection fails its pending requests with EIO (the mirror
// re-dirties them; confirmed writes stay confirmed). When no connection is
// left, the next request reconnects once, shared by all concurrent requests;
// if that fails, requests fail at once for a second before another attempt, so
// an `ignore` policy does not spin against a dead server.
//
// Threading rule: loop thread only. Buffers must outlive the awaited call.
#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "base/notifier.h"
#include "blockdev/block_device.h"
#include "blockdev/nbd_connection.h"
#include "blockdev/nbd_uri.h"
#include "io/loop.h"

namespace blkmirror {

class NbdDevice : public BlockDevice {
 public:
  // Connects (and opens the extra multi-conn connections). Errors are one
  // line: "nbd://host:10809/disk: cannot connect: <libnbd's reason>".
  static Task<Result<std::shared_ptr<NbdDevice>>> open(Loop& loop, NbdConnectOptions opts);

  std::string describe() const override { return where_; }
  uint64_t length() const override { return length_; }
  const BlockCaps& caps() const override { return caps_; }

  Task<Result<void>> read(uint64_t off, std::span<std::byte> buf, ReadFlags f = {}) override;
  Task<Result<void>> write(uint64_t off, std::span<const std::byte> buf, WriteFlags f) override;
  Task<Result<void>> write_zeroes(uint64_t off, uint64_t len, ZeroFlags f) override;
  Task<Result<void>> discard(uint64_t off, uint64_t len) override;
  Task<Result<void>> flush() override;
  Task<Result<Extent>> block_status(uint64_t off, uint64_t len) override;
  // Each reconnect is a new generation: the server may have lost what it
  // acknowledged but had not flushed (mirror/target_tracker.h).
  uint64_t generation() const override { return reconnects_; }
  bool can_reconnect() const override { return true; }
  bool connected() const override { return connections() > 0; }

  const NbdConnectOptions& options() const { return opts_; }
  bool can_fast_zero() const { return can_fast_zero_; }
  bool multi_conn() const { return multi_conn_; }
  // Live connections right now, and successful reconnects so far.
  size_t connections() const;
  uint64_t reconnects() const { return reconnects_; }

 private:
  using Conns = std::vector<std::unique_ptr<NbdConnection>>;
  NbdDevice(Loop& loop, NbdConnectOptions opts);

  static Task<Result<Conns>> connect_all(Loop& loop, NbdConnectOptions opts);
  void learn(nbd_handle* h);
  // A live connection, reconnecting first when none is left.
  Task<Result<NbdConnection*>> connection();
  Task<Result<void>> reconnect();
  // Runs a batch on one connection; errors name the operation and offset.
  Task<Result<void>> run(const char* what, uint64_t off, std::vector<NbdConnection::Issue> batch);
  Task<Result<void>> read_aligned(uint64_t off, std::span<std::byte> buf);
  Task<Result<void>> write_aligned(uint64_t off, std::span<const std::byte> buf, bool fua);
  Task<Result<void>> write_unaligned(uint64_t off, std::span<const std::byte> buf, bool fua);
  Task<Result<void>> write_zero_data(uint64_t off, uint64_t len, bool fua);
  tl::unexpected<Error> fail(const char* what, uint64_t off, int err,
                             const std::string& why = {}) const;

  Loop& loop_;
  NbdConnectOptions opts_;
  std::string where_;
  uint64_t length_ = 0;
  BlockCaps caps_;
  bool can_flush_ = false, can_fast_zero_ = false, multi_conn_ = false;
  Conns conns_;
  bool reconnecting_ = false;
  Notifier reconnected_;
  std::optional<Error> reconnect_error_;
  std::chrono::steady_clock::time_point retry_after_{};
  uint64_t reconnects_ = 0;
};

// The factory the CLI and QMP use: an NbdDevice as a plain BlockDevicePtr.
Task<Result<BlockDevicePtr>> open_nbd(Loop& loop, NbdConnectOptions opts);

}  // namespace blkmirror
