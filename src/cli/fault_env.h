// Test hook: BLKMIRROR_INJECT_FAULTS wraps the CLI's devices in FaultDevice, the
// way QEMU's blkdebug is used, so integration tests can fail a sector of a real
// file. Format: comma-separated rules "ROLE:OPS:OFFSET:LENGTH[:ERRNO]" with ROLE
// src|dst, OPS read|write|flush|any, ERRNO a number or EIO/ENOSPC (default EIO).
// Example: BLKMIRROR_INJECT_FAULTS=src:read:1048576:4096
#pragma once

#include <string>

#include "blockdev/block_device.h"

namespace blkmirror {

// Returns dev, wrapped when the variable names rules for role. Bad rules are an
// error naming the rule. With dev null and role "", only checks every rule.
Result<BlockDevicePtr> apply_fault_env(BlockDevicePtr dev, const std::string& role);

}  // namespace blkmirror
