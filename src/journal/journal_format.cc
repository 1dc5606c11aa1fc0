#include "journal/journal_format.h"

#include <fmt/format.h>
#include <xxhash.h>

#include <bit>
#include <cstring>

namespace blkmirror {

namespace {

// Field offsets within a slot.
constexpr size_t kMagic = 0, kVersion = 8, kSeq = 16, kState = 24, kLength = 32, kExtent = 40,
                 kGran = 48, kSync = 56, kCreated = 64, kUpdated = 72, kSource = 128, kTarget = 512;
// An identity: dev, ino, length (3 x 8 bytes), name length (2), name.
constexpr size_t kIdentityName = 26;
constexpr size_t kChecksum = kJournalSlotSize - 8;

void put64(std::byte* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<std::byte>(v >> (8 * i));
}
void put32(std::byte* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<std::byte>(v >> (8 * i));
}
uint64_t get64(const std::byte* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}
uint32_t get32(const std::byte* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}

void put_identity(std::byte* p, const JournalIdentity& id) {
  put64(p, id.dev);
  put64(p + 8, id.ino);
  put64(p + 16, id.length);
  size_t n = std::min(id.name.size(), kJournalNameMax);
  p[24] = static_cast<std::byte>(n & 0xff);
  p[25] = static_cast<std::byte>(n >> 8);
  std::memcpy(p + kIdentityName, id.name.data(), n);
}

Result<JournalIdentity> get_identity(const std::byte* p, const char* which) {
  JournalIdentity id;
  id.dev = get64(p);
  id.ino = get64(p + 8);
  id.length = get64(p + 16);
  size_t n = static_cast<uint8_t>(p[24]) | (static_cast<size_t>(static_cast<uint8_t>(p[25])) << 8);
  if (n > kJournalNameMax)
    return make_plain_error(
        EINVAL, fmt::format("{} name of {} bytes (at most {})", which, n, kJournalNameMax));
  id.name.assign(reinterpret_cast<const char*>(p + kIdentityName), n);
  return id;
}

uint64_t checksum(std::span<const std::byte> slot) { return XXH64(slot.data(), kChecksum, 0); }

}  // namespace

const char* to_string(JournalState s) {
  switch (s) {
    case JournalState::kRunning:
      return "running";
    case JournalState::kCompleted:
      return "completed";
    case JournalState::kCancelled:
      return "cancelled";
  }
  return "unknown";
}

std::vector<std::byte> encode_journal_header(const JournalHeader& h) {
  std::vector<std::byte> s(kJournalSlotSize);
  std::memcpy(s.data() + kMagic, kJournalMagic, sizeof kJournalMagic);
  put32(s.data() + kVersion, h.version);
  put64(s.data() + kSeq, h.seq);
  put32(s.data() + kState, static_cast<uint32_t>(h.state));
  put64(s.data() + kLength, h.length);
  put64(s.data() + kExtent, h.extent_size);
  put64(s.data() + kGran, h.granularity);
  put32(s.data() + kSync, h.sync);
  put64(s.data() + kCreated, h.created_unix);
  put64(s.data() + kUpdated, h.updated_unix);
  put_identity(s.data() + kSource, h.source);
  put_identity(s.data() + kTarget, h.target);
  put64(s.data() + kChecksum, checksum(s));
  return s;
}

Result<JournalHeader> parse_journal_header(std::span<const std::byte> s) {
  if (s.size() < kJournalSlotSize)
    return make_plain_error(EINVAL, fmt::format("truncated: {} bytes of header", s.size()));
  if (std::memcmp(s.data() + kMagic, kJournalMagic, sizeof kJournalMagic) != 0)
    return make_plain_error(EINVAL, "not a blkmirror state file (bad magic)");
  JournalHeader h;
  h.version = get32(s.data() + kVersion);
  if (h.version != kJournalVersion)
    return make_plain_error(EINVAL, fmt::format("state file version {} (this blkmirror reads {})",
                                                h.version, kJournalVersion));
  if (get64(s.data() + kChecksum) != checksum(s))
    return make_plain_error(EINVAL, "header checksum mismatch (corrupted)");
  h.seq = get64(s.data() + kSeq);
  uint32_t state = get32(s.data() + kState);
  if (state > static_cast<uint32_t>(JournalState::kCancelled))
    return make_plain_error(EINVAL, fmt::format("unknown state {}", state));
  h.state = static_cast<JournalState>(state);
  h.length = get64(s.data() + kLength);
  h.extent_size = get64(s.data() + kExtent);
  h.granularity = get64(s.data() + kGran);
  h.sync = get32(s.data() + kSync);
  h.created_unix = get64(s.data() + kCreated);
  h.updated_unix = get64(s.data() + kUpdated);
  if (h.extent_size < 512 || !std::has_single_bit(h.extent_size) || h.extent_size > (1ull << 40))
    return make_plain_error(EINVAL, fmt::format("bad extent size {}", h.extent_size));
  if (h.granularity == 0 || h.granularity > h.extent_size || !std::has_single_bit(h.granularity))
    return make_plain_error(EINVAL, fmt::format("bad granularity {}", h.granularity));
  if (h.length > (1ull << 60)) return make_plain_error(EINVAL, "bad length");
  auto src = get_identity(s.data() + kSource, "source");
  if (!src) return make_error(src.error());
  auto tgt = get_identity(s.data() + kTarget, "target");
  if (!tgt) return make_error(tgt.error());
  h.source = std::move(*src);
  h.target = std::move(*tgt);
  return h;
}

Result<JournalHeader> pick_journal_header(std::span<const std::byte> slots) {
  if (slots.size() < kJournalBitmapOffset)
    return make_plain_error(EINVAL, fmt::format("truncated: {} bytes", slots.size()));
  auto a = parse_journal_header(slots.first(kJournalSlotSize));
  auto b = parse_journal_header(slots.subspan(kJournalSlotSize, kJournalSlotSize));
  if (a && b) return a->seq >= b->seq ? a : b;
  if (a) return a;
  if (b) return b;
  return a;
}

}  // namespace blkmirror
