// parse_rbd_filename: QEMU's legacy rbd: syntax, escapes and errors.
#include "blockdev/rbd/rbd_spec.h"

#include <gtest/gtest.h>

namespace blkmirror {
namespace {

TEST(RbdSpec, PoolAndImage) {
  auto s = parse_rbd_filename("rbd:pool/disk");
  ASSERT_TRUE(s) << s.error().message();
  EXPECT_EQ(s->pool, "pool");
  EXPECT_EQ(s->ns, "");
  EXPECT_EQ(s->image, "disk");
  EXPECT_FALSE(s->snapshot);
  EXPECT_FALSE(s->conf);
  EXPECT_EQ(s->describe(), "rbd:pool/disk");
}

TEST(RbdSpec, NamespaceSnapshotAndOptions) {
  auto s = parse_rbd_filename(
      "rbd:pool/ns/disk@snap1:conf=/tmp/c/ceph.conf:id=mirror:keyring=/k:rbd_cache=false");
  ASSERT_TRUE(s) << s.error().message();
  EXPECT_EQ(s->pool, "pool");
  EXPECT_EQ(s->ns, "ns");
  EXPECT_EQ(s->image, "disk");
  EXPECT_EQ(s->snapshot.value_or(""), "snap1");
  EXPECT_EQ(s->conf.value_or(""), "/tmp/c/ceph.conf");
  EXPECT_EQ(s->user.value_or(""), "mirror");
  EXPECT_EQ(s->keyring.value_or(""), "/k");
  ASSERT_EQ(s->options.size(), 1u);
  EXPECT_EQ(s->options[0].first, "rbd_cache");
  EXPECT_EQ(s->options[0].second, "false");
  EXPECT_EQ(s->describe(), "rbd:pool/ns/disk@snap1");
}

TEST(RbdSpec, EscapedSeparators) {
  auto s = parse_rbd_filename(R"(rbd:po\:ol/im\/g\@x:conf=/a\:b:mon_host=1.2.3.4\:6789)");
  ASSERT_TRUE(s) << s.error().message();
  EXPECT_EQ(s->pool, "po:ol");
  EXPECT_EQ(s->image, "im/g@x");
  EXPECT_FALSE(s->snapshot);
  EXPECT_EQ(s->conf.value_or(""), "/a:b");
  ASSERT_EQ(s->options.size(), 1u);
  EXPECT_EQ(s->options[0].second, "1.2.3.4:6789");
}

TEST(RbdSpec, AuthSupportedListIsSplit) {
  auto s = parse_rbd_filename("rbd:p/i:auth_supported=cephx;none");
  ASSERT_TRUE(s);
  ASSERT_EQ(s->auth_client_required.size(), 2u);
  EXPECT_EQ(s->auth_client_required[0], "cephx");
  EXPECT_EQ(s->auth_client_required[1], "none");
}

TEST(RbdSpec, Errors) {
  for (const char* bad : {"rbd:", "rbd:pool", "rbd:/img", "rbd:pool/", "rbd:p/i@", "rbd:a/b/c/d",
                          "rbd:p/i:conf", "rbd:p/i:=x", "nbd://x"}) {
    auto s = parse_rbd_filename(bad);
    EXPECT_FALSE(s) << bad;
    if (!s) {
      EXPECT_NE(s.error().message().find(bad), std::string::npos) << s.error().message();
    }
  }
}

}  // namespace
}  // namespace blkmirror
