// AlignedBuffer: heap memory aligned for O_DIRECT (4 KiB), and BufferPool, a
// free list of equally sized buffers so the copy loop does not hit malloc for
// every operation.
//
// Threading rule: a BufferPool is used from the loop thread only; a buffer may be
// handed to a worker thread while the loop does not touch it.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <span>
#include <vector>

namespace blkmirror {

inline constexpr size_t kBufferAlign = 4096;

class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(size_t size) : size_(size) {
    if (size == 0) return;
    void* p =
        std::aligned_alloc(kBufferAlign, (size + kBufferAlign - 1) / kBufferAlign * kBufferAlign);
    if (!p) throw std::bad_alloc();
    data_.reset(static_cast<std::byte*>(p));
  }
  std::byte* data() { return data_.get(); }
  const std::byte* data() const { return data_.get(); }
  size_t size() const { return size_; }
  std::span<std::byte> span(size_t n) { return {data_.get(), n}; }
  std::span<std::byte> span() { return {data_.get(), size_}; }

 private:
  struct Free {
    void operator()(std::byte* p) const { std::free(p); }
  };
  std::unique_ptr<std::byte, Free> data_;
  size_t size_ = 0;
};

class BufferPool {
 public:
  // Buffers of buffer_size bytes; keeps at most max_cached idle ones.
  BufferPool(size_t buffer_size, size_t max_cached)
      : buffer_size_(buffer_size), max_cached_(max_cached) {}

  size_t buffer_size() const { return buffer_size_; }
  // Keeps at most n idle buffers from now on (a budget that grew or shrank).
  void set_max_cached(size_t n) {
    max_cached_ = n;
    if (free_.size() > n) free_.resize(n);
  }

  AlignedBuffer take() {
    if (free_.empty()) return AlignedBuffer(buffer_size_);
    AlignedBuffer b = std::move(free_.back());
    free_.pop_back();
    return b;
  }

  void give(AlignedBuffer b) {
    if (b.size() == buffer_size_ && free_.size() < max_cached_) free_.push_back(std::move(b));
  }

 private:
  size_t buffer_size_;
  size_t max_cached_;
  std::vector<AlignedBuffer> free_;
};

}  // namespace blkmirror
