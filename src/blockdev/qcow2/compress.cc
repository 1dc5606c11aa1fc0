#include "blockdev/qcow2/compress.h"

#include <zlib.h>
#include <zstd.h>

namespace blkmirror::qcow2 {

namespace {

Result<void> inflate_raw(std::span<const std::byte> in, std::span<std::byte> out) {
  z_stream z{};
  if (inflateInit2(&z, -12) != Z_OK) return make_error(ENOMEM, "zlib init");
  z.next_in = reinterpret_cast<Bytef*>(const_cast<std::byte*>(in.data()));
  z.avail_in = static_cast<uInt>(in.size());
  z.next_out = reinterpret_cast<Bytef*>(out.data());
  z.avail_out = static_cast<uInt>(out.size());
  int rc = inflate(&z, Z_FINISH);
  size_t produced = out.size() - z.avail_out;
  inflateEnd(&z);
  // Z_BUF_ERROR with a full output is fine: the stream goes on past one cluster.
  if ((rc == Z_STREAM_END || rc == Z_BUF_ERROR || rc == Z_OK) && produced == out.size()) return {};
  return make_error(EIO, "compressed cluster (deflate) is malformed");
}

Result<void> zstd_decompress(std::span<const std::byte> in, std::span<std::byte> out) {
  ZSTD_DCtx* ctx = ZSTD_createDCtx();
  if (!ctx) return make_error(ENOMEM, "zstd init");
  ZSTD_inBuffer src{in.data(), in.size(), 0};
  ZSTD_outBuffer dst{out.data(), out.size(), 0};
  // Streaming: the input may carry trailing bytes past the frame.
  size_t rc = 1;
  while (dst.pos < dst.size && src.pos < src.size) {
    rc = ZSTD_decompressStream(ctx, &dst, &src);
    if (ZSTD_isError(rc) || rc == 0) break;
  }
  ZSTD_freeDCtx(ctx);
  if (ZSTD_isError(rc) || dst.pos != dst.size)
    return make_error(EIO, "compressed cluster (zstd) is malformed");
  return {};
}

}  // namespace

Result<void> decompress_cluster(bool zstd, std::span<const std::byte> in,
                                std::span<std::byte> out) {
  return zstd ? zstd_decompress(in, out) : inflate_raw(in, out);
}

}  // namespace blkmirror::qcow2
