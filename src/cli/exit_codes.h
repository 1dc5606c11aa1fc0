// Exit codes of the blkmirror CLI (documented in docs/cli.md).
#pragma once

namespace blkmirror::exit_code {

inline constexpr int kOk = 0;           // job completed; target verified by the job
inline constexpr int kJobFailed = 1;    // an I/O error ended the job (policy "report")
inline constexpr int kBadInput = 2;     // bad arguments, missing/unreadable files; nothing written
inline constexpr int kCancelled = 3;    // interrupted (Ctrl-C / SIGTERM) before completion
inline constexpr int kVerifyFailed = 4; // verify (and the demo's check): the copies differ

}  // namespace blkmirror::exit_code
