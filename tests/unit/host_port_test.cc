// The one HOST:PORT parser (base/host_port.h): every form it accepts, and a
// one-line error naming the bad part for everything else.
#include "base/host_port.h"

#include <gtest/gtest.h>

namespace blkmirror {
namespace {

TEST(HostPort, Forms) {
  auto a = parse_host_port("127.0.0.1:10809");
  ASSERT_TRUE(a) << a.error().message();
  EXPECT_EQ(a->host, "127.0.0.1");
  EXPECT_EQ(a->port, 10809);
  auto b = parse_host_port("[::1]:0");
  ASSERT_TRUE(b) << b.error().message();
  EXPECT_EQ(b->host, "::1");
  EXPECT_EQ(b->port, 0);
  auto c = parse_host_port(":65535");
  ASSERT_TRUE(c);
  EXPECT_EQ(c->host, "");
  EXPECT_EQ(c->port, 65535);
  auto d = parse_host_port("[fe80::1%lo]", {.port_required = false});
  ASSERT_TRUE(d);
  EXPECT_EQ(d->host, "fe80::1%lo");
  EXPECT_FALSE(d->port);
  auto e = parse_host_port("example.org", {.port_required = false});
  ASSERT_TRUE(e);
  EXPECT_EQ(e->host, "example.org");
}

void expect_bad(std::string_view text, HostPortRules rules, std::string_view needle) {
  auto r = parse_host_port(text, rules);
  ASSERT_FALSE(r) << text << " was accepted";
  std::string m = r.error().message();
  EXPECT_NE(m.find(needle), std::string::npos) << text << " -> " << m;
  EXPECT_EQ(m.find('\n'), std::string::npos) << m;
}

// Regression: --listen 127.0.0.1:1K was accepted as port 1024 (the port went
// through the size parser).
TEST(HostPort, SizeSuffixIsNotAPort) {
  expect_bad("127.0.0.1:1K", {}, "bad port '1K'");
  expect_bad("127.0.0.1:1k", {}, "bad port '1k'");
  EXPECT_FALSE(parse_port("1K"));
  EXPECT_FALSE(parse_port("2M"));
}

TEST(HostPort, Rejects) {
  expect_bad("127.0.0.1", {}, "expected HOST:PORT, got '127.0.0.1'");
  expect_bad("host:", {}, "bad port ''");
  expect_bad("host:65536", {}, "bad port '65536'");
  expect_bad("host:-1", {}, "bad port '-1'");
  expect_bad("host:+1", {}, "bad port '+1'");
  expect_bad("host: 1", {}, "bad port ' 1'");
  expect_bad("host:0", {.port_zero_ok = false}, "bad port '0' (expected a number from 1 to 65535)");
  expect_bad("::1:80", {}, "needs brackets");
  expect_bad("[::1:80", {}, "unterminated '['");
  expect_bad("[::1]80", {}, "unexpected '80' after ']'");
  expect_bad("[]:80", {}, "empty IPv6 address");
  expect_bad("a]:80", {}, "bad host 'a]'");
}

TEST(HostPort, HostAndPortAlone) {
  EXPECT_EQ(*parse_host("[::1]"), "::1");
  EXPECT_EQ(*parse_host("::1"), "::1");
  EXPECT_EQ(*parse_host("localhost"), "localhost");
  EXPECT_FALSE(parse_host(""));
  EXPECT_FALSE(parse_host("[::1"));
  EXPECT_FALSE(parse_host("[::1]x"));
  EXPECT_EQ(*parse_port("0"), 0);
  EXPECT_FALSE(parse_port("0", false));
  EXPECT_EQ(*parse_port("65535"), 65535);
  EXPECT_FALSE(parse_port(""));
}

TEST(HostPort, FormatRoundTrips) {
  EXPECT_EQ(format_host_port("::1", 80), "[::1]:80");
  EXPECT_EQ(format_host_port("10.0.0.1", 80), "10.0.0.1:80");
  for (const char* s : {"[::1]:80", "10.0.0.1:80", "h:1"}) {
    auto hp = parse_host_port(s);
    ASSERT_TRUE(hp);
    EXPECT_EQ(format_host_port(hp->host, *hp->port), s);
  }
}

}  // namespace
}  // namespace blkmirror
