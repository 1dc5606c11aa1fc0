// NbdConnectOptions: where and how to reach one NBD export, as plain values, and
// the parser that fills it from an NBD URI. The QMP layer builds the same struct
// from blockdev-add {driver: nbd, server, export, tls-creds}; the CLI from a URI.
//
// URI forms (the NBD URI spec, github.com/NetworkBlockDevice/nbd doc/uri.md):
//   nbd://HOST[:PORT][/EXPORT]            TCP, port 10809 by default
//   nbds://HOST[:PORT][/EXPORT]           TCP with TLS required
//   nbd+unix:///[EXPORT]?socket=PATH      UNIX socket
//   nbds+unix:///[EXPORT]?socket=PATH     UNIX socket with TLS required
// HOST may be a name, an IPv4 address or [IPv6]. USER@HOST sets the TLS PSK
// username. Query parameters (as libnbd's nbd_connect_uri understands them):
//   socket=PATH             the UNIX socket (required for +unix, refused otherwise)
//   tls-certificates=DIR    X.509: DIR holds ca-cert.pem [client-cert.pem client-key.pem]
//   tls-psk-file=FILE       PSK: FILE holds "username:hexkey" lines
//   tls-verify-peer=false   X.509 only: do not verify the server's certificate
// The export name and values are percent-decoded. TLS parameters need nbds.
//
// Plain value types; safe to copy between threads.
#pragma once

#include <cstdint>
#include <string>

#include "base/result.h"

namespace blkmirror {

enum class NbdTransport { kUnix, kTcp };
enum class NbdTls { kOff, kX509, kPsk };

struct NbdConnectOptions {
  NbdTransport transport = NbdTransport::kUnix;
  std::string path;         // UNIX socket path (kUnix)
  std::string host;         // host name or address, IPv6 without brackets (kTcp)
  uint16_t port = 10809;    // (kTcp)
  std::string export_name;  // "" = the server's default export
  NbdTls tls = NbdTls::kOff;
  std::string tls_cert_dir;      // kX509: directory of PEM files; "" = libnbd's default
                                 // locations, then the system trust store
  std::string tls_psk_file;      // kPsk: required
  std::string tls_username;      // kPsk: "" = libnbd's default (the login name)
  bool verify_peer = true;       // kX509: check the server's certificate against the CA
                                 // and `host` (TCP only with libnbd 1.14: tls_caveat())
  unsigned max_connections = 4;  // used only when the server advertises multi-conn

  // A URI naming the export, without secrets, for messages and describe().
  std::string display() const;
  // A caveat the user should see before connecting, or "": libnbd 1.14 checks
  // the server's X.509 certificate only against a host name, so over a UNIX
  // socket (no host name) the certificate is not verified at all.
  std::string tls_caveat() const;
  // Checks the combination (a socket path for UNIX, a host for TCP, a PSK file
  // for PSK); errors are one user-facing sentence.
  Result<void> validate() const;
};

// True when text looks like an NBD URI (nbd:, nbds:, nbd+unix:, nbds+unix:,
// nbd+tcp:, nbds+tcp:, nbd+vsock:...), so the CLI treats it as one and reports
// its errors instead of "no such file".
bool looks_like_nbd_uri(const std::string& text);

// Parses an NBD URI. Errors are one line naming the URI and what is wrong
// ("nbd://host:x/disk: bad port 'x'").
Result<NbdConnectOptions> parse_nbd_uri(const std::string& uri);

}  // namespace blkmirror
