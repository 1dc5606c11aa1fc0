// The on-disk layout of a mirror's crash-safe state file (docs/design/journal.md):
//
//   0      header slot A (4 KiB)
//   4096   header slot B (4 KiB)
//   8192   the extent bitmap: one bit per extent of the source (LSB first within
//          each little-endian 64-bit word), set = the target may differ there
//
// A header is written whole into the slot its sequence number picks (A for even,
// B for odd), so a torn header write leaves the other slot intact; the valid
// slot with the higher sequence wins. Every field is little-endian; the header
// ends with an XXH64 of everything before it.
//
// Threading rule: pure functions and plain data; any thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "base/result.h"

namespace blkmirror {

inline constexpr char kJournalMagic[8] = {'B', 'L', 'K', 'M', 'J', 'R', 'N', 'L'};
inline constexpr uint32_t kJournalVersion = 1;
inline constexpr uint64_t kJournalSlotSize = 4096;
inline constexpr uint64_t kJournalBitmapOffset = 2 * kJournalSlotSize;
inline constexpr size_t kJournalNameMax = 255;  // bytes of a device description kept

enum class JournalState : uint32_t {
  kRunning = 0,    // copying, or stopped by a crash or a cancel: resumable
  kCompleted = 1,  // the target took the source's place: never copy again from it
  kCancelled = 2,  // cancelled: resumable (nothing wrote untracked meanwhile)
};
const char* to_string(JournalState s);

// Who a device is: for files and block devices st_dev and st_ino (a block
// device's st_rdev), else 0 and 0; the length, and its description for messages.
struct JournalIdentity {
  uint64_t dev = 0, ino = 0, length = 0;
  std::string name;
  bool operator==(const JournalIdentity& o) const {
    return dev == o.dev && ino == o.ino && length == o.length;
  }
};

struct JournalHeader {
  uint32_t version = kJournalVersion;
  uint64_t seq = 0;  // bumped by every header write; picks the slot
  JournalState state = JournalState::kRunning;
  uint64_t length = 0;       // the source's (and target's) length
  uint64_t extent_size = 0;  // bytes per bitmap bit: a power of two, >= granularity
  uint64_t granularity = 0;  // the job's chunk size when the state was made
  uint32_t sync = 0;         // the job's sync mode (MirrorParams::sync as a number)
  JournalIdentity source, target;
  uint64_t created_unix = 0, updated_unix = 0;  // seconds

  uint64_t extents() const { return extent_size ? (length + extent_size - 1) / extent_size : 0; }
  // Bytes of the bitmap on disk: whole 4 KiB pages.
  uint64_t bitmap_bytes() const { return (extents() + 32767) / 32768 * 4096; }
  uint64_t file_size() const { return kJournalBitmapOffset + bitmap_bytes(); }
};

// One slot's bytes (kJournalSlotSize).
std::vector<std::byte> encode_journal_header(const JournalHeader& h);
// Parses one slot. Errors name what is wrong: "not a blkmirror state file",
// "version N (this blkmirror reads 1)", "header checksum mismatch", "bad extent
// size", ...
Result<JournalHeader> parse_journal_header(std::span<const std::byte> slot);
// The header of the two slots (kJournalBitmapOffset bytes): the valid one with
// the higher sequence; the error of slot A when neither is valid.
Result<JournalHeader> pick_journal_header(std::span<const std::byte> slots);

}  // namespace blkmirror
