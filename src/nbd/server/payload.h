// Payload: the buffer a WRITE request's data is received into. Nothing is
// zero-filled up front, and a large payload is an anonymous mapping whose pages
// the kernel commits only as received bytes land in them: a client that
// announces 32 MiB and sends 100 bytes costs about a page, not 32 MiB.
//
// Threading rule: a plain owning value; any thread, one owner at a time.
#pragma once

#include <sys/mman.h>

#include <cstddef>
#include <memory>
#include <new>
#include <span>

namespace blkmirror::nbd {

class Payload {
 public:
  // At and above this size the buffer is mapped (pages on first touch) rather
  // than taken from the heap, whose recycled memory may already be resident.
  static constexpr size_t kMapThreshold = 256u << 10;

  Payload() = default;
  // An empty Payload (!ok()) when the memory cannot be had.
  explicit Payload(size_t size) : size_(size) {
    if (size == 0) return;
    if (size < kMapThreshold) {
      heap_.reset(new (std::nothrow) std::byte[size]);  // default-initialized: not zeroed
      data_ = heap_.get();
    } else {
      void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      data_ = p == MAP_FAILED ? nullptr : static_cast<std::byte*>(p);
      mapped_ = data_ != nullptr;
    }
    if (!data_) size_ = 0;
  }
  Payload(Payload&& o) noexcept { *this = std::move(o); }
  Payload& operator=(Payload&& o) noexcept {
    if (this != &o) {
      release();
      heap_ = std::move(o.heap_);
      data_ = o.data_;
      size_ = o.size_;
      mapped_ = o.mapped_;
      o.data_ = nullptr;
      o.size_ = 0;
      o.mapped_ = false;
    }
    return *this;
  }
  ~Payload() { release(); }

  bool ok() const { return data_ != nullptr; }
  std::byte* data() { return data_; }
  size_t size() const { return size_; }
  std::span<const std::byte> span() const { return {data_, size_}; }

 private:
  void release() {
    if (mapped_) ::munmap(data_, size_);
    heap_.reset();
    data_ = nullptr;
    size_ = 0;
    mapped_ = false;
  }

  std::unique_ptr<std::byte[]> heap_;
  std::byte* data_ = nullptr;
  size_t size_ = 0;
  bool mapped_ = false;
};

}  // namespace blkmirror::nbd
