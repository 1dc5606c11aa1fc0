// Result<T> and Error: how the I/O path reports failure.
//
// An Error is an errno-style std::error_code plus a short human context ("read
// src.img at 4096"). EIO, ENOSPC and dropped connections are routine for a mirror,
// so they travel as values; exceptions are kept for start-up and programming errors.
// Plain value types: safe to copy between threads.
#pragma once

#include <cerrno>
#include <string>
#include <system_error>
#include <utility>

#include <tl/expected.hpp>

namespace blkmirror {

struct Error {
  std::error_code code;
  std::string context;
  // A complete sentence for the user ("Invalid parameter 'buf-size'"): message()
  // is the context alone, with no errno text appended.
  bool plain = false;

  int errnum() const { return code.category() == std::generic_category() ? code.value() : EIO; }
  // The errno text alone, as QMP reports it ("Input/output error").
  std::string reason() const { return code.message(); }
  // "context: reason", for logs and one-line CLI errors.
  std::string message() const {
    if (plain) return context;
    return context.empty() ? reason() : context + ": " + reason();
  }
};

template <class T>
using Result = tl::expected<T, Error>;

// The one errno -> Error helper.
inline tl::unexpected<Error> make_error(int errnum, std::string context = {}) {
  return tl::unexpected<Error>(Error{std::error_code(errnum, std::generic_category()),
                                     std::move(context)});
}

// A user-facing error whose text is the whole message (QMP desc, CLI line).
inline tl::unexpected<Error> make_plain_error(int errnum, std::string text) {
  return tl::unexpected<Error>(Error{std::error_code(errnum, std::generic_category()),
                                     std::move(text), true});
}

inline tl::unexpected<Error> make_error(Error e) { return tl::unexpected<Error>(std::move(e)); }

// Adds context to an error while passing it on.
inline tl::unexpected<Error> with_context(Error e, const std::string& ctx) {
  e.context = e.context.empty() ? ctx : ctx + ": " + e.context;
  return tl::unexpected<Error>(std::move(e));
}

}  // namespace blkmirror
