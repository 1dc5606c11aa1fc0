// Size limits shared by every layer. Compile-time constants; thread-safe.
#pragma once

#include <cstdint>

namespace blkmirror {

// The largest single read or write anything in blkmirror issues or accepts: the
// NBD payload limit we advertise and assume when a server states none (NBD's
// customary 32 MiB, half of libnbd's own 64 MiB ceiling), a device's default
// max_transfer, and the largest background copy operation of a mirror job (an
// io_uring request's result is an int, so it must stay far below 2 GiB anyway).
inline constexpr uint32_t kMaxRequestBytes = 32u << 20;

}  // namespace blkmirror
