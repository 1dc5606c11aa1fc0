// The NBD URI parser: every accepted form, and one clear line for each bad one.
#include "blockdev/nbd_uri.h"

#include <gtest/gtest.h>

namespace blkmirror {
namespace {

TEST(NbdUri, TcpWithDefaults) {
  auto o = parse_nbd_uri("nbd://example.com/disk");
  ASSERT_TRUE(o) << o.error().message();
  EXPECT_EQ(o->transport, NbdTransport::kTcp);
  EXPECT_EQ(o->host, "example.com");
  EXPECT_EQ(o->port, 10809);
  EXPECT_EQ(o->export_name, "disk");
  EXPECT_EQ(o->tls, NbdTls::kOff);
  EXPECT_EQ(o->display(), "nbd://example.com:10809/disk");
}

TEST(NbdUri, TcpPortIpv6AndEmptyExport) {
  auto o = parse_nbd_uri("nbd://[::1]:10810");
  ASSERT_TRUE(o) << o.error().message();
  EXPECT_EQ(o->host, "::1");
  EXPECT_EQ(o->port, 10810);
  EXPECT_EQ(o->export_name, "");
  EXPECT_EQ(o->display(), "nbd://[::1]:10810/");
  auto p = parse_nbd_uri("nbd+tcp://10.0.0.2:9/a%2Fb%20c");
  ASSERT_TRUE(p) << p.error().message();
  EXPECT_EQ(p->export_name, "a/b c");
}

TEST(NbdUri, UnixSocket) {
  auto o = parse_nbd_uri("nbd+unix:///exp?socket=/run/x%20y.sock");
  ASSERT_TRUE(o) << o.error().message();
  EXPECT_EQ(o->transport, NbdTransport::kUnix);
  EXPECT_EQ(o->path, "/run/x y.sock");
  EXPECT_EQ(o->export_name, "exp");
  EXPECT_EQ(o->display(), "nbd+unix:///exp?socket=/run/x%20y.sock");
}

TEST(NbdUri, TlsX509AndPsk) {
  auto x = parse_nbd_uri("nbds://h/d?tls-certificates=/etc/pki/c&tls-verify-peer=false");
  ASSERT_TRUE(x) << x.error().message();
  EXPECT_EQ(x->tls, NbdTls::kX509);
  EXPECT_EQ(x->tls_cert_dir, "/etc/pki/c");
  EXPECT_FALSE(x->verify_peer);
  auto d = parse_nbd_uri("nbds://h/d");
  ASSERT_TRUE(d);
  EXPECT_EQ(d->tls, NbdTls::kX509);
  EXPECT_TRUE(d->verify_peer);  // verification on by default
  auto p = parse_nbd_uri("nbds+unix://alice@/d?socket=/s&tls-psk-file=/k.psk");
  ASSERT_TRUE(p) << p.error().message();
  EXPECT_EQ(p->tls, NbdTls::kPsk);
  EXPECT_EQ(p->tls_username, "alice");
  EXPECT_EQ(p->tls_psk_file, "/k.psk");
  EXPECT_EQ(p->display(), "nbds+unix:///d?socket=/s");  // no secrets in messages
}

void expect_bad(const std::string& uri, const std::string& needle) {
  auto o = parse_nbd_uri(uri);
  ASSERT_FALSE(o) << uri << " was accepted";
  std::string m = o.error().message();
  EXPECT_NE(m.find(needle), std::string::npos) << uri << " -> " << m;
  EXPECT_EQ(m.find('\n'), std::string::npos) << "one line: " << m;
  EXPECT_EQ(m.rfind(uri, 0), 0u) << "names the URI: " << m;
}

TEST(NbdUri, BadUrisGetOneClearLine) {
  expect_bad("nbd://host:abc/x", "bad port 'abc'");
  expect_bad("nbd://host:0/x", "bad port '0'");
  expect_bad("nbd://host:70000/x", "bad port '70000'");
  expect_bad("nbd:///x", "no host name");
  expect_bad("nbd+unix:///x", "missing ?socket=PATH");
  expect_bad("nbd+unix://host/x?socket=/s", "has no host");
  expect_bad("nbd://h/x?socket=/s", "'socket' is only for");
  expect_bad("nbd+vsock://1:2/x", "unsupported scheme 'nbd+vsock'");
  expect_bad("http://h/x", "unsupported scheme 'http'");
  expect_bad("nbd:h/x", "expected '//'");
  expect_bad("nbd://h/x?tls-certificates=/c", "TLS parameters need a TLS scheme (nbds)");
  expect_bad("nbds://h/x?tls-certificates=/c&tls-psk-file=/k", "not both");
  expect_bad("nbds://h/x?tls-verify-peer=maybe", "expects true or false");
  expect_bad("nbd://h/x?frobnicate=1", "unknown parameter 'frobnicate'");
  expect_bad("nbd://h/x?socket=", "needs a value");
  expect_bad("nbd://h/x%zz", "bad percent-encoding");
  expect_bad("nbd://[::1/x", "unterminated '['");
}

TEST(NbdUri, LooksLikeUri) {
  EXPECT_TRUE(looks_like_nbd_uri("nbd://h/x"));
  EXPECT_TRUE(looks_like_nbd_uri("nbds+unix:///x?socket=/s"));
  EXPECT_TRUE(looks_like_nbd_uri("nbd+vsock://1"));
  EXPECT_FALSE(looks_like_nbd_uri("disk.img"));
  EXPECT_FALSE(looks_like_nbd_uri("/dev/sda"));
  EXPECT_FALSE(looks_like_nbd_uri("dir/nbd:x"));
}

TEST(NbdUri, ValidateStructBuiltByHand) {
  NbdConnectOptions o;  // as QMP would build it
  o.transport = NbdTransport::kTcp;
  EXPECT_FALSE(o.validate());
  o.host = "h";
  EXPECT_TRUE(o.validate());
  o.tls = NbdTls::kPsk;
  EXPECT_FALSE(o.validate());
  o.tls_psk_file = "/k";
  EXPECT_TRUE(o.validate());
}

}  // namespace
}  // namespace blkmirror
