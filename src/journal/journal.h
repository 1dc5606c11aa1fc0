// Journal: a mirror's crash-safe state (docs/design/journal.md): the job's
// identity and a persistent bitmap of extents where the target may differ from
// the source, kept a superset of the truth by one rule, metadata before data:
//   - mark(): an extent is dirty on stable storage before a client write into
//     it is issued (writers of one batch share one write and one flush: group
//     commit; an extent already marked costs nothing: the activity log);
//   - clear(): the caller clears an extent only after its copy reached the
//     target and both devices were flushed (MirrorJob's checkpoint).
// Stored in a small file (journal_format.h) reached as a BlockDevice, so tests
// can cut its power.
//
// Threading rule: loop thread only; one Journal per file, one job per Journal.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <set>
#include <vector>

#include "base/notifier.h"
#include "base/result.h"
#include "base/task.h"
#include "blockdev/block_device.h"
#include "journal/journal_format.h"

namespace blkmirror {

class Journal {
 public:
  // Extents: 1 MiB by default, more for disks over 64 TiB (the bitmap stays
  // within 8 MiB), never below the job's granularity.
  static uint64_t default_extent_size(uint64_t length, uint64_t granularity);

  // Writes a new state into file (which must hold at least h.file_size() bytes,
  // or grow): the header with every extent marked dirty, then a flush.
  static Task<Result<std::unique_ptr<Journal>>> create(BlockDevicePtr file, JournalHeader h);
  // Reads a state written before. Errors are one line naming what is wrong
  // (truncated, corrupted, another version).
  static Task<Result<std::unique_ptr<Journal>>> open(BlockDevicePtr file);

  const JournalHeader& header() const { return h_; }
  uint64_t extent_size() const { return h_.extent_size; }
  uint64_t extents() const { return h_.extents(); }
  bool dirty(uint64_t extent) const { return (words_[extent / 64] >> (extent % 64)) & 1; }
  uint64_t dirty_count() const;
  // The first dirty extent at or after `from`, skipping clean words; nullopt
  // when none (checkpoints walk a 64M-extent bitmap this way every 250 ms).
  std::optional<uint64_t> next_dirty(uint64_t from) const;
  // The extents covering [off, off+len), clipped to the length.
  std::pair<uint64_t, uint64_t> extents_of(uint64_t off, uint64_t len) const;

  // Returns once every extent of [off, off+len) is dirty on stable storage.
  Task<Result<void>> mark(uint64_t off, uint64_t len);
  // True when mark(off, len) has nothing to wait for (the write path skips it).
  bool durable(uint64_t off, uint64_t len) const;
  // Clears the extents (REQUIRES: the caller made them equal and durable on
  // both devices) and writes them down.
  Task<Result<void>> clear(const std::vector<uint64_t>& extents);
  // Writes the header with a new state (and the update time), then flushes.
  Task<Result<void>> set_state(JournalState s);
  // Header writes and flushes done (tests, benchmarks).
  uint64_t flushes() const { return flushes_; }

 private:
  Journal(BlockDevicePtr file, JournalHeader h);
  Task<Result<void>> write_header();
  // Writes the pages waiting, then flushes; one batch at a time.
  Task<void> flush_pages();
  Task<Result<void>> wait_durable(uint64_t batch);

  BlockDevicePtr file_;
  JournalHeader h_;
  std::vector<uint64_t> words_;  // the bitmap as on disk (little-endian words)
  std::set<uint64_t> pages_;     // bitmap pages changed since the last batch took them
  // Per page: the batch that writes its latest change (durable once done_batch_
  // reaches it).
  std::vector<uint64_t> page_batch_;
  uint64_t open_batch_ = 1;  // the batch pages changed now will be written in
  uint64_t done_batch_ = 0;  // the last batch on stable storage
  bool flushing_ = false;
  std::optional<Error> failed_;  // a write or flush failed: nothing is durable any more
  Notifier batch_done_;
  uint64_t flushes_ = 0;
};

}  // namespace blkmirror
