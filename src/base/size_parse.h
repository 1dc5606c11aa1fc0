// Parsing of human sizes ("64K", "16M", "1G", "4096"). Pure; thread-safe.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "base/result.h"

namespace blkmirror {

// Accepts a non-negative integer with an optional binary suffix K, M, G, T, P
// (optionally followed by "iB" or "B"), case-insensitive. Errors name the text.
Result<uint64_t> parse_size(std::string_view text);

// "1.5 GiB", "512 KiB", "12 B": for humans.
std::string format_size(uint64_t bytes);

}  // namespace blkmirror
