#include "nbd/server/tls.h"

#include <fnmatch.h>
#include <sys/stat.h>
#include <unistd.h>

#include <asio/experimental/as_tuple.hpp>
#include <fmt/format.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

namespace blkmirror::nbd {

namespace {

constexpr auto use_tuple = asio::experimental::as_tuple(asio::use_awaitable);

// QEMU's priorities: GnuTLS's defaults, plus the PSK key exchanges for PSK.
constexpr const char* kX509Priority = "NORMAL";
constexpr const char* kPskPriority = "NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK";

gnutls_session_t session_of(void* s) { return static_cast<gnutls_session_t>(s); }

Result<void> readable_file(const std::string& path, const char* what) {
  if (::access(path.c_str(), R_OK) != 0)
    return make_plain_error(errno,
                            fmt::format("TLS {} '{}': {}", what, path, std::strerror(errno)));
  return {};
}

std::string gnutls_text(int rc) { return gnutls_strerror(rc); }

}  // namespace

bool TlsAuthz::allows(const std::string& identity) const {
  for (const TlsAuthzRule& r : rules) {
    bool hit = r.glob ? ::fnmatch(r.match.c_str(), identity.c_str(), 0) == 0 : r.match == identity;
    if (hit) return r.allow;
  }
  return allow_by_default;
}

Result<std::shared_ptr<const TlsServerCreds>> TlsServerCreds::load(const TlsServerConfig& cfg) {
  std::shared_ptr<TlsServerCreds> c(new TlsServerCreds(cfg));
  if (cfg.kind == TlsServerConfig::Kind::kPsk) {
    if (auto r = readable_file(cfg.psk_file, "PSK file"); !r) return tl::unexpected(r.error());
    gnutls_psk_server_credentials_t psk;
    if (int rc = gnutls_psk_allocate_server_credentials(&psk); rc < 0)
      return make_plain_error(ENOMEM, "TLS: " + gnutls_text(rc));
    c->psk_ = psk;
    if (int rc = gnutls_psk_set_server_credentials_file(psk, cfg.psk_file.c_str()); rc < 0)
      return make_plain_error(EINVAL, fmt::format("TLS PSK file '{}': {}", cfg.psk_file,
                                                  gnutls_text(rc)));
    // DHE-PSK needs group parameters; GnuTLS's well-known ones will do.
    gnutls_psk_set_server_known_dh_params(psk, GNUTLS_SEC_PARAM_MEDIUM);
    return std::shared_ptr<const TlsServerCreds>(std::move(c));
  }
  const std::string cert = cfg.dir + "/server-cert.pem", key = cfg.dir + "/server-key.pem",
                    ca = cfg.dir + "/ca-cert.pem";
  for (auto [path, what] : {std::pair{&cert, "certificate"}, std::pair{&key, "key"}})
    if (auto r = readable_file(*path, what); !r) return tl::unexpected(r.error());
  if (cfg.verify_peer)
    if (auto r = readable_file(ca, "CA certificate"); !r) return tl::unexpected(r.error());
  gnutls_certificate_credentials_t x509;
  if (int rc = gnutls_certificate_allocate_credentials(&x509); rc < 0)
    return make_plain_error(ENOMEM, "TLS: " + gnutls_text(rc));
  c->x509_ = x509;
  if (int rc = gnutls_certificate_set_x509_key_file(x509, cert.c_str(), key.c_str(),
                                                    GNUTLS_X509_FMT_PEM);
      rc < 0)
    return make_plain_error(EINVAL, fmt::format("TLS certificate '{}' with key '{}': {}", cert,
                                                key, gnutls_text(rc)));
  if (cfg.verify_peer) {
    int n = gnutls_certificate_set_x509_trust_file(x509, ca.c_str(), GNUTLS_X509_FMT_PEM);
    if (n < 0)
      return make_plain_error(EINVAL, fmt::format("TLS CA certificate '{}': {}", ca,
                                                  gnutls_text(n)));
    if (n == 0)
      return make_plain_error(EINVAL, fmt::format("TLS CA certificate '{}': no certificate", ca));
  }
  gnutls_certificate_set_known_dh_params(x509, GNUTLS_SEC_PARAM_MEDIUM);
  return std::shared_ptr<const TlsServerCreds>(std::move(c));
}

TlsServerCreds::~TlsServerCreds() {
  if (x509_)
    gnutls_certificate_free_credentials(static_cast<gnutls_certificate_credentials_t>(x509_));
  if (psk_) gnutls_psk_free_server_credentials(static_cast<gnutls_psk_server_credentials_t>(psk_));
}

Result<std::unique_ptr<TlsStream>> TlsStream::create(std::shared_ptr<const TlsServerCreds> creds,
                                                     Socket& sock) {
  std::error_code ec;
  sock.native_non_blocking(true, ec);
  if (ec) return make_plain_error(ec.value(), "TLS: socket: " + ec.message());
  std::unique_ptr<TlsStream> t(new TlsStream(std::move(creds), sock));
  gnutls_session_t s;
  if (int rc = gnutls_init(&s, GNUTLS_SERVER | GNUTLS_NONBLOCK); rc < 0)
    return make_plain_error(ENOMEM, "TLS: " + gnutls_text(rc));
  t->session_ = s;
  const TlsServerConfig& cfg = t->creds_->config();
  const bool psk = cfg.kind == TlsServerConfig::Kind::kPsk;
  int rc = gnutls_priority_set_direct(s, psk ? kPskPriority : kX509Priority, nullptr);
  if (rc >= 0)
    rc = psk ? gnutls_credentials_set(s, GNUTLS_CRD_PSK, t->creds_->psk_)
             : gnutls_credentials_set(s, GNUTLS_CRD_CERTIFICATE, t->creds_->x509_);
  if (rc < 0) return make_plain_error(EINVAL, "TLS: " + gnutls_text(rc));
  if (!psk && cfg.verify_peer) gnutls_certificate_server_set_request(s, GNUTLS_CERT_REQUIRE);
  gnutls_transport_set_int(s, sock.native_handle());
  // A handshake that stalls is bounded by the connection's handshake limit.
  gnutls_handshake_set_timeout(s, 0);
  return t;
}

TlsStream::~TlsStream() {
  if (session_) gnutls_deinit(session_of(session_));
}

Task<bool> TlsStream::wait(bool for_write) {
  auto [ec] = co_await sock_.async_wait(
      for_write ? Socket::wait_write : Socket::wait_read, use_tuple);
  co_return !ec;
}

Task<Result<void>> TlsStream::handshake() {
  gnutls_session_t s = session_of(session_);
  for (;;) {
    int rc = gnutls_handshake(s);
    if (rc == GNUTLS_E_SUCCESS) break;
    if (rc == GNUTLS_E_AGAIN || rc == GNUTLS_E_INTERRUPTED) {
      if (!co_await wait(gnutls_record_get_direction(s) == 1))
        co_return make_plain_error(ECONNRESET, "TLS handshake: connection closed");
      continue;
    }
    if (!gnutls_error_is_fatal(rc)) continue;
    co_return make_plain_error(EPROTO, "TLS handshake: " + gnutls_text(rc));
  }
  co_return check_peer();
}

Result<void> TlsStream::check_peer() {
  gnutls_session_t s = session_of(session_);
  const TlsServerConfig& cfg = creds_->config();
  if (cfg.kind == TlsServerConfig::Kind::kPsk) {
    const char* user = gnutls_psk_server_get_username(s);
    peer_ = user ? user : "";
  } else if (cfg.verify_peer) {
    unsigned status = 0;
    if (int rc = gnutls_certificate_verify_peers2(s, &status); rc < 0)
      return make_plain_error(EACCES, "TLS client certificate: " + gnutls_text(rc));
    if (status != 0) {
      gnutls_datum_t text{};
      gnutls_certificate_verification_status_print(status, GNUTLS_CRT_X509, &text, 0);
      std::string why(reinterpret_cast<const char*>(text.data), text.size);
      gnutls_free(text.data);
      return make_plain_error(EACCES, "TLS client certificate refused: " + why);
    }
  }
  if (cfg.kind == TlsServerConfig::Kind::kX509) {
    unsigned n = 0;
    const gnutls_datum_t* certs = gnutls_certificate_get_peers(s, &n);
    if (certs && n > 0) {
      gnutls_x509_crt_t crt;
      if (gnutls_x509_crt_init(&crt) == 0) {
        if (gnutls_x509_crt_import(crt, &certs[0], GNUTLS_X509_FMT_DER) == 0) {
          gnutls_datum_t dn{};
          if (gnutls_x509_crt_get_dn2(crt, &dn) == 0) {
            peer_.assign(reinterpret_cast<const char*>(dn.data), dn.size);
            gnutls_free(dn.data);
          }
        }
        gnutls_x509_crt_deinit(crt);
      }
    }
  }
  if (cfg.authz && !cfg.authz->allows(peer_))
    return make_plain_error(EACCES, fmt::format("TLS client '{}' is not authorized", peer_));
  return {};
}

Task<size_t> TlsStream::read_some(std::span<std::byte> buf) {
  gnutls_session_t s = session_of(session_);
  for (;;) {
    ssize_t n = gnutls_record_recv(s, buf.data(), buf.size());
    if (n > 0) co_return static_cast<size_t>(n);
    if (n == GNUTLS_E_AGAIN || n == GNUTLS_E_INTERRUPTED) {
      if (!co_await wait(false)) co_return 0;
      continue;
    }
    co_return 0;  // end of stream (0), or an error: the connection ends either way
  }
}

Task<bool> TlsStream::write_all(std::span<const std::byte> data) {
  gnutls_session_t s = session_of(session_);
  while (!data.empty()) {
    ssize_t n = gnutls_record_send(s, data.data(), data.size());
    if (n > 0) {
      data = data.subspan(static_cast<size_t>(n));
      continue;
    }
    // After GNUTLS_E_AGAIN the same data is sent again: GnuTLS has it buffered.
    if (n == GNUTLS_E_AGAIN || n == GNUTLS_E_INTERRUPTED) {
      if (!co_await wait(true)) co_return false;
      continue;
    }
    co_return false;
  }
  co_return true;
}

}  // namespace blkmirror::nbd
