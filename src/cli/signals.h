// Stray signals: SIGHUP, SIGUSR1 and SIGUSR2 mean something to some commands in
// some states (docs/cli.md, "Signals") and nothing elsewhere; none of them may
// kill a process that serves clients. Asio puts a signal back to its default
// action (termination) when the last signal_set holding it goes away, so a
// command holds them in this set for its whole run; the commands that act on
// one add their own set on top. main() ignores them before any loop exists.
//
// Threading rule: construct and destroy on the loop's thread.
#pragma once

#include <csignal>

#include <asio.hpp>

#include "io/loop.h"

namespace blkmirror {

class StraySignalGuard {
 public:
  explicit StraySignalGuard(Loop& loop) : set_(loop.ctx(), SIGHUP, SIGUSR1, SIGUSR2) {}

 private:
  asio::signal_set set_;  // never waited on: a signal only sets its pending flag
};

// For main(): SIG_IGN for the same signals, until a loop takes them over.
inline void ignore_stray_signals() {
  for (int sig : {SIGHUP, SIGUSR1, SIGUSR2}) std::signal(sig, SIG_IGN);
}

}  // namespace blkmirror
