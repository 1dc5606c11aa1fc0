#include "nbd/proto/nbd_proto.h"

#include <gtest/gtest.h>

namespace blkmirror::nbd {
namespace {

std::vector<std::byte> bytes(std::initializer_list<int> v) {
  std::vector<std::byte> out;
  for (int b : v) out.push_back(static_cast<std::byte>(b));
  return out;
}

TEST(NbdProto, RequestRoundTripIsBigEndian) {
  Request r{kCmdFlagFua, kCmdWrite, 0x0102030405060708ull, 0x1122334455667788ull, 0xaabbccdd};
  std::vector<std::byte> buf;
  encode_request(r, buf);
  ASSERT_EQ(buf.size(), kRequestSize);
  EXPECT_EQ(buf[0], std::byte{0x25});  // magic, most significant byte first
  EXPECT_EQ(buf[27], std::byte{0xdd});
  auto d = decode_request(std::span<const std::byte, kRequestSize>(buf.data(), kRequestSize));
  ASSERT_TRUE(d);
  EXPECT_EQ(d->flags, r.flags);
  EXPECT_EQ(d->type, r.type);
  EXPECT_EQ(d->cookie, r.cookie);
  EXPECT_EQ(d->offset, r.offset);
  EXPECT_EQ(d->length, r.length);
  buf[0] = std::byte{0};
  EXPECT_FALSE(decode_request(std::span<const std::byte, kRequestSize>(buf.data(), kRequestSize)));
}

TEST(NbdProto, GoDecoding) {
  auto ok = bytes({0, 0, 0, 3, 'a', 'b', 'c', 0, 2, 0, 1, 0, 3});
  auto g = decode_go(ok);
  ASSERT_TRUE(g);
  EXPECT_EQ(g->name, "abc");
  EXPECT_EQ(g->infos, (std::vector<uint16_t>{1, 3}));
  EXPECT_FALSE(decode_go(bytes({0, 0, 0, 9, 'a'})));                    // name past the end
  EXPECT_FALSE(decode_go(bytes({0, 0, 0, 1, 'a', 0, 2, 0, 1})));         // infos short
  EXPECT_FALSE(decode_go(bytes({0, 0, 0, 1, 'a', 0, 0, 7})));            // trailing junk
  EXPECT_FALSE(decode_go(bytes({0, 0, 0, 2, 'a', 0, 0, 0})));            // NUL in name
}

// Regression (issue 17 item 3): 30,000 NBD_INFO_DESCRIPTION requests in one
// option got 30,000 replies; each known type is answered once.
TEST(NbdProto, InfoRepliesAreOnePerType) {
  GoRequest g;
  g.infos.assign(30000, kInfoDescription);
  g.infos.push_back(kInfoBlockSize);
  g.infos.push_back(kInfoName);
  g.infos.push_back(0x7777);
  g.infos.push_back(kInfoName);
  EXPECT_EQ(info_replies(g), (std::vector<uint16_t>{kInfoDescription, kInfoName}));
  EXPECT_TRUE(info_replies(GoRequest{}).empty());
}

TEST(NbdProto, MetaDecoding) {
  std::vector<std::byte> d;
  Writer(d).u32(0).u32(1).u32(15).str("base:allocation");
  auto m = decode_meta(d);
  ASSERT_TRUE(m);
  EXPECT_EQ(m->queries, (std::vector<std::string>{"base:allocation"}));
  std::vector<std::byte> huge;
  Writer(huge).u32(0).u32(0xffffffff);
  EXPECT_FALSE(decode_meta(huge));
}

TEST(NbdProto, ValidateRequest) {
  ExportLimits lim{.size = 1 << 20, .read_only = false, .structured = true,
                   .meta_base_allocation = true};
  auto req = [](uint16_t type, uint64_t off, uint32_t len, uint16_t flags = 0) {
    return Request{flags, type, 1, off, len};
  };
  EXPECT_EQ(validate_request(req(kCmdRead, 0, 4096), lim), 0u);
  EXPECT_EQ(validate_request(req(kCmdRead, (1 << 20) - 1, 2), lim), kEinval);
  EXPECT_EQ(validate_request(req(kCmdRead, UINT64_MAX - 10, 100), lim), kEinval);  // overflow
  EXPECT_EQ(validate_request(req(kCmdWrite, (1 << 20) - 1, 2), lim), kEnospc);
  EXPECT_EQ(validate_request(req(kCmdRead, 0, 0), lim), kEinval);
  EXPECT_EQ(validate_request(req(99, 0, 1), lim), kEinval);
  EXPECT_EQ(validate_request(req(kCmdFlush, 0, 0), lim), 0u);
  EXPECT_EQ(validate_request(req(kCmdFlush, 0, 1), lim), kEinval);
  EXPECT_EQ(validate_request(req(kCmdRead, 0, 1, kCmdFlagFua), lim), kEinval);
  EXPECT_EQ(validate_request(req(kCmdWriteZeroes, 0, 1, kCmdFlagFastZero | kCmdFlagNoHole), lim),
            0u);
  EXPECT_EQ(validate_request(req(kCmdBlockStatus, 0, 1 << 20, kCmdFlagReqOne), lim), 0u);
  EXPECT_EQ(validate_request(req(kCmdRead, 0, 1, 1 << 9), lim), kEinval);  // unknown flag
  ExportLimits big = lim;
  big.size = uint64_t{1} << 40;
  EXPECT_EQ(validate_request(req(kCmdRead, 0, 33u << 20), big), kEoverflow);
  big.structured = false;
  EXPECT_EQ(validate_request(req(kCmdRead, 0, 33u << 20), big), kEinval);
  ExportLimits ro = lim;
  ro.read_only = true;
  EXPECT_EQ(validate_request(req(kCmdWrite, 0, 1), ro), kEperm);
  EXPECT_EQ(validate_request(req(kCmdTrim, 0, 1), ro), kEperm);
  EXPECT_EQ(validate_request(req(kCmdRead, 0, 1), ro), 0u);
  ExportLimits nometa = lim;
  nometa.meta_base_allocation = false;
  EXPECT_EQ(validate_request(req(kCmdBlockStatus, 0, 1), nometa), kEinval);
}

TEST(NbdProto, ErrnoMapping) {
  EXPECT_EQ(errno_to_wire(EROFS), kEperm);
  EXPECT_EQ(errno_to_wire(ENOSPC), kEnospc);
  EXPECT_EQ(errno_to_wire(EBADF), kEio);
}

}  // namespace
}  // namespace blkmirror::nbd
