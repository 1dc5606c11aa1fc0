// RbdSpec: which Ceph RBD image to open and how to reach its cluster, and the
// two ways a user names one: QEMU's legacy filename
//   rbd:POOL/[NAMESPACE/]IMAGE[@SNAP][:conf=PATH][:id=USER][:keyring=PATH][:KEY=VALUE...]
// (a backslash escapes ':', '/', '@' and '\' inside a field; other KEY=VALUE pairs
// are Ceph config options, as QEMU passes them on) and blockdev-add's driver rbd
// fields (qmp/cmd_block.cc fills the struct).
//
// Threading rule: plain values; parsing is pure.
#pragma once

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "base/result.h"

namespace blkmirror {

struct RbdSpec {
  std::string pool;
  std::string ns;  // RADOS namespace; empty: the default one
  std::string image;
  std::optional<std::string> snapshot;  // opens read-only
  std::optional<std::string> conf;      // ceph.conf; none: Ceph's default search
  std::optional<std::string> user;      // client id without "client."; none: admin
  std::optional<std::string> keyring;
  std::optional<std::string> key;                 // the secret itself (blockdev-add key-secret)
  std::vector<std::string> auth_client_required;  // "cephx", "none"
  std::vector<std::pair<std::string, std::string>> options;  // other Ceph options

  // "rbd:pool/image" (with @snap and /namespace as given), for messages.
  std::string describe() const;
};

bool looks_like_rbd_spec(const std::string& text);

// Parses the legacy filename; one-line errors naming what is wrong.
Result<RbdSpec> parse_rbd_filename(const std::string& text);

}  // namespace blkmirror
