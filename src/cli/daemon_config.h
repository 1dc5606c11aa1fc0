// The daemon's startup options from a file (`blkmirror daemon --config FILE`):
// the same keys as its command-line options, one per line, so a service unit
// can keep them in /etc/blkmirror/NAME.conf:
//
//   # comments and blank lines are ignored
//   qmp = /run/blkmirror/vm1/qmp.sock
//   blockdev = driver=file,node-name=disk,filename=/var/lib/blkmirror/vm1/disk.img
//   nbd-server = addr.type=unix,addr.path=/run/blkmirror/vm1/nbd.sock
//   export = type=nbd,id=e0,node-name=disk,writable=on
//
// Keys: qmp, qmp-tcp, file-root (once each), blockdev, export (repeatable),
// nbd-server (once). Values are taken as written (keyval or JSON, as on the
// command line), after trimming the blanks around them. Every bad line is
// reported (FILE:LINE: what is wrong), not only the first.
//
// Threading rule: pure functions; any thread.
#pragma once

#include <string>
#include <vector>

#include "base/result.h"

namespace blkmirror {

struct DaemonConfig {
  std::string qmp, qmp_tcp, file_root, nbd_server;
  std::vector<std::string> blockdevs, exports;
};

// Parses `text` (from `name`, for messages). The error lists one line per
// problem, joined with "\n".
Result<DaemonConfig> parse_daemon_config(const std::string& text, const std::string& name);
// Reads and parses a file; a file that cannot be read is one error.
Result<DaemonConfig> load_daemon_config(const std::string& path);

}  // namespace blkmirror
