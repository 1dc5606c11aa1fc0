// TLS for the NBD server (NBD_OPT_STARTTLS, FORCEDTLS mode), on GnuTLS as
// qemu-nbd and nbdkit use it.
//
// TlsServerCreds: what a server proves itself with and whom it lets in,
// loaded once (a bad file is refused when the server is configured, not at
// the first client):
// - X.509: a directory with QEMU's file names, server-cert.pem and
//   server-key.pem, and ca-cert.pem when client certificates are verified
//   (verify_peer: a client without a certificate signed by that CA, or with
//   an expired one, is refused);
// - PSK: a keys.psk file of "username:hexkey" lines (QEMU's and GnuTLS's
//   format).
// An authorization list, when set, names the clients allowed after the
// handshake: the certificate's distinguished name (GnuTLS's form, as QEMU's
// authz objects see it: "CN=client,O=Example") or the PSK username; entries
// match exactly or, with glob, as fnmatch patterns.
//
// TlsStream: one connection's TLS session over its non-blocking socket.
// GnuTLS reads and writes the descriptor itself; when it would block, the
// stream waits for the socket to become ready through Asio, so the loop never
// blocks. One reader and one writer may use it at once (GnuTLS allows one of
// each direction), as Connection's request reader and reply writer do.
//
// Threading rule: loop thread only (TlsServerCreds is immutable once loaded
// and may be shared by every connection).
#pragma once

#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <asio.hpp>

#include "base/result.h"
#include "io/loop.h"

namespace blkmirror::nbd {

struct TlsAuthzRule {
  std::string match;
  bool allow = true;
  bool glob = false;  // fnmatch pattern instead of an exact match
};

// Whom the server lets in after the handshake (QEMU's authz-simple is one
// exact allow rule with a deny default; authz-list has rules and a default).
struct TlsAuthz {
  std::vector<TlsAuthzRule> rules;
  bool allow_by_default = false;
  bool allows(const std::string& identity) const;
};

struct TlsServerConfig {
  enum class Kind { kX509, kPsk };
  Kind kind = Kind::kX509;
  std::string dir;       // kX509: server-cert.pem, server-key.pem, ca-cert.pem
  std::string psk_file;  // kPsk: keys.psk
  bool verify_peer = false;
  std::optional<TlsAuthz> authz;
};

class TlsServerCreds {
 public:
  // Errors name the file and what was wrong with it (EINVAL, ENOENT, EACCES).
  static Result<std::shared_ptr<const TlsServerCreds>> load(const TlsServerConfig& cfg);
  ~TlsServerCreds();
  TlsServerCreds(const TlsServerCreds&) = delete;
  TlsServerCreds& operator=(const TlsServerCreds&) = delete;

  const TlsServerConfig& config() const { return cfg_; }

 private:
  friend class TlsStream;
  explicit TlsServerCreds(TlsServerConfig cfg) : cfg_(std::move(cfg)) {}
  TlsServerConfig cfg_;
  void* x509_ = nullptr;  // gnutls_certificate_credentials_t
  void* psk_ = nullptr;   // gnutls_psk_server_credentials_t
};

class TlsStream {
 public:
  using Socket = asio::generic::stream_protocol::socket;
  // Sets the socket non-blocking and makes a server session on it.
  static Result<std::unique_ptr<TlsStream>> create(std::shared_ptr<const TlsServerCreds> creds,
                                                   Socket& sock);
  ~TlsStream();
  TlsStream(const TlsStream&) = delete;
  TlsStream& operator=(const TlsStream&) = delete;

  // The handshake, then the client's certificate and authorization checks.
  // The error says why a client was refused (for the log; the client only
  // sees the connection end, as the protocol requires).
  Task<Result<void>> handshake();
  // Some bytes (at least one), or 0 at the end of the stream or on an error.
  Task<size_t> read_some(std::span<std::byte> buf);
  // Everything, or false.
  Task<bool> write_all(std::span<const std::byte> data);
  // Who the client is: its certificate's DN or its PSK username ("" if none).
  const std::string& peer() const { return peer_; }

 private:
  TlsStream(std::shared_ptr<const TlsServerCreds> creds, Socket& sock)
      : creds_(std::move(creds)), sock_(sock) {}
  Task<bool> wait(bool for_write);
  Result<void> check_peer();

  std::shared_ptr<const TlsServerCreds> creds_;
  Socket& sock_;
  void* session_ = nullptr;  // gnutls_session_t
  std::string peer_;
};

}  // namespace blkmirror::nbd
