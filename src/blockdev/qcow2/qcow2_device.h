// Qcow2Device: a qcow2 image (versions 2 and 3) presented as a BlockDevice. The
// image's bytes live in another BlockDevice (`file`, usually a FileDevice); guest
// clusters this image does not hold read from `backing` (or as zeroes without one).
// Mechanisms live beside this file, one per header: header.h (on-disk header and
// extensions), l2_cache.h (L2 tables), refcount.h (refcounts and the allocator),
// compress.h (compressed clusters), range_lock.h (per-cluster request
// serialization). docs/design/qcow2.md describes the whole driver.
//
// Threading rule: loop thread only (the loop that owns `file`); not thread-safe.
//
// On-disk ORDERING RULE (kept by flush(), see refcount.h and l2_cache.h):
//   data and refcount increments  -> flush -> L2 tables -> flush -> L1 entries -> flush
//   -> refcount decrements of clusters the flushed L2 tables no longer map.
// A crash between any two steps leaves an image `qemu-img check` calls consistent,
// at worst with leaked clusters.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "bitmap/bitmap_store.h"
#include "blockdev/block_device.h"
#include "io/loop.h"

namespace blkmirror {

// What an image's header says (pure data).
struct Qcow2Info {
  uint32_t version = 3;
  uint64_t virtual_size = 0;
  uint32_t cluster_bits = 16;
  uint32_t refcount_bits = 16;
  bool extended_l2 = false;
  bool compression_zstd = false;
  bool dirty = false;
  bool corrupt = false;
  std::optional<std::string> backing_file;    // as written in the header
  std::optional<std::string> backing_format;  // backing format extension
  uint64_t cluster_size() const { return uint64_t{1} << cluster_bits; }
};

struct Qcow2OpenOptions {
  bool read_only = false;
  uint64_t l2_cache_bytes = 0;  // 0: enough L2 tables to map 32 GiB at 64 KiB clusters
};

struct Qcow2CreateOptions {
  uint64_t size = 0;
  uint32_t version = 3;
  uint64_t cluster_size = 65536;
  uint32_t refcount_bits = 16;
  bool extended_l2 = false;
  std::optional<std::string> backing_file{}, backing_format{};
  enum class Prealloc { kOff, kMetadata } prealloc = Prealloc::kOff;
};

class Qcow2Impl;
class Qcow2Device;

// The image's bitmaps extension as a node's BitmapStore.
BitmapStorePtr qcow2_bitmap_store(std::shared_ptr<Qcow2Device> dev);

class Qcow2Device final : public BlockDevice {
 public:
  // Reads and checks the header only. Errors are one line and name what is wrong
  // ("qcow2 header of IMG: cluster_bits 40 out of range").
  static Task<Result<Qcow2Info>> probe(BlockDevice& file);
  // file: the image's bytes; backing: the device unallocated clusters read from,
  // or nullptr (then they read as zeroes). Refuses (nothing written): encryption,
  // external data files, unknown incompatible features, a header that does not
  // parse, metadata tables outside the file.
  static Task<Result<std::shared_ptr<Qcow2Device>>> open(Loop& loop, BlockDevicePtr file,
                                                         BlockDevicePtr backing,
                                                         Qcow2OpenOptions opts);
  // Formats an empty, writable file as a new image (the file is resized to fit).
  static Task<Result<void>> create(BlockDevice& file, const Qcow2CreateOptions& opts);

  ~Qcow2Device() override;

  const Qcow2Info& info() const;
  // Graph changes (commit): unallocated clusters read from this device from now on.
  void set_backing(BlockDevicePtr backing);
  const BlockDevicePtr& backing() const;
  // Rewrites the header's backing file name and format (intermediate commit);
  // nullopt file removes the backing link.
  Task<Result<void>> set_backing_link(std::optional<std::string> file,
                                      std::optional<std::string> format);
  // Grows the virtual size (block_resize, active commit into a smaller base).
  Task<Result<void>> grow(uint64_t new_virtual_size);
  // Persistent dirty bitmaps (the bitmaps extension, bitmap_io.cc): what
  // BitmapStore says, for this image. A writable open already marked every
  // bitmap in use.
  Task<Result<std::vector<NamedBitmap>>> load_bitmaps();
  Result<void> can_store_bitmap(const BitmapSet& set, const std::string& name,
                                uint64_t granularity) const;
  Task<Result<void>> store_bitmaps(const BitmapSet& set);
  Task<Result<void>> remove_bitmap(const std::string& name);
  // Names and flags of the bitmaps in the image's directory (query info).
  struct StoredBitmapInfo {
    std::string name;
    uint64_t granularity;
    bool in_use, enabled;
  };
  std::vector<StoredBitmapInfo> stored_bitmaps() const;
  // Host bytes in use by the image (actual-size).
  uint64_t allocated_bytes() const;
  // Writes back all metadata, flushes, and leaves the image clean. Further I/O fails.
  Task<Result<void>> close();
  // A reopen. Read-only: all metadata written back and the image left clean, as
  // close() does, then the file device set read-only too; it stays open for
  // reads. Read-write: refused as open() refuses a writable open (marked
  // corrupt, dirty, internal snapshots), else the file device set read-write
  // (a view of a graph node reopened first by the caller; a FileDevice reopens
  // itself) and the autoclear bits cleared as on open.
  Task<Result<void>> set_read_only(bool ro) override;

  std::string describe() const override;
  uint64_t length() const override;
  const BlockCaps& caps() const override;
  Task<Result<void>> read(uint64_t offset, std::span<std::byte> buf, ReadFlags f = {}) override;
  Task<Result<void>> write(uint64_t offset, std::span<const std::byte> buf,
                           WriteFlags flags) override;
  Task<Result<void>> write_zeroes(uint64_t offset, uint64_t length, ZeroFlags flags) override;
  Task<Result<void>> discard(uint64_t offset, uint64_t length) override;
  Task<Result<void>> flush() override;
  Task<Result<Extent>> block_status(uint64_t offset, uint64_t length) override;
  // Grows the virtual size (grow()); shrinking is refused (ENOTSUP).
  Task<Result<void>> resize(uint64_t new_length) override;

 private:
  explicit Qcow2Device(std::unique_ptr<Qcow2Impl> impl);
  std::unique_ptr<Qcow2Impl> impl_;
};

}  // namespace blkmirror
