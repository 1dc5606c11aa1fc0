// The mirror job's options as one table, read by every front end: the CLI's
// `mirror` and `demo`, QMP's blockdev-mirror and `ctl mirror`. An entry holds the
// option's name (QMP's member, and the command line's --flag), its type, default,
// help, accepted range or words, and the error text for a value outside them,
// so a bad value gets one text whichever front end it came through. Front ends
// only turn what they received (command-line text, a JSON scalar) into an
// OptionValue and hand it to set_option().
//
// Options of one front end only (QMP's job-id, device, replaces; the CLI's
// --direct, --json) are not here: they are not the job's to check.
//
// Threading rule: constant data and pure functions; any thread.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <variant>

#include "base/result.h"
#include "mirror/mirror_params.h"

namespace blkmirror {

enum class OptionType {
  kSize,     // bytes; on a command line with suffixes (64K, 16M)
  kInteger,  // a plain number (milliseconds)
  kEnum,     // one of a few words
  kBool,
};

// A value as a front end received it: sizes and integers as int64_t (negative
// values too: the table's check refuses them with its own text), words as
// strings.
using OptionValue = std::variant<int64_t, std::string, bool>;

struct MirrorOption {
  std::string_view name{};  // QMP's member name
  std::string_view flag{};  // the command line's --flag (no dashes); empty: QMP only
  OptionType type = OptionType::kSize;
  bool qmp_required = false;
  std::string_view default_text{};  // QMP's default, for help; empty: none to show
  std::string_view help{};
  std::span<const std::string_view> words{};  // kEnum: QMP's accepted values
  // Numbers: the accepted range and the text for a value outside it ("{}" is the
  // option's name as the front end spells it).
  int64_t min = 0, max = INT64_MAX;
  bool pow2 = false;            // also a power of 2 ("expects a power of 2")
  bool zero_is_default = false; // QMP's 0 asks for the default (QEMU's rule); a
                                // command line leaves the option out instead
  std::string_view range_error{};
  // Stores a checked value in p; enums parse their word here (errors: QEMU's).
  Result<void> (*store)(MirrorParams& p, const OptionValue& v) = nullptr;
  // Numbers: the value p holds, for validate_params().
  int64_t (*number)(const MirrorParams& p) = nullptr;
};

std::span<const MirrorOption> mirror_options();
// By QMP name or command-line flag; nullptr when unknown.
const MirrorOption* find_mirror_option(std::string_view name);

// Checks v against opt (range, power of 2) and stores it in p. Errors name the
// option as `shown` (the front end's spelling: opt.flag on a command line).
Result<void> set_option(MirrorParams& p, const MirrorOption& opt, const OptionValue& v,
                        std::string_view shown);
// The range checks of one number already in MirrorParams (validate_params).
Result<void> check_number(const MirrorOption& opt, int64_t v, std::string_view shown);

// A command line's text for opt as the value QMP would carry: sizes with
// suffixes, integers in decimal, words as they are, on/off for bools. A leading
// '-' is the negative number it says (refused by set_option() with the
// option's text). For a zero_is_default option 0 is out of range here.
// Errors: "--FLAG: ...".
Result<OptionValue> parse_option_text(const MirrorOption& opt, std::string_view text);

}  // namespace blkmirror
