// The mirror job's options as QMP members, shared by blockdev-mirror and
// drive-mirror: the option table (mirror/option_table.h, which the CLI and
// `ctl` share too) as schema fields, and a checked request's members into
// MirrorParams.
//
// Threading rule: pure functions; any thread.
#pragma once

#include <vector>

#include "base/result.h"
#include "mirror/mirror_params.h"
#include "qmp/schema.h"

namespace blkmirror::qmp {

std::vector<Field> mirror_option_fields();
// The table's members of a request checked against those fields, into p.
Result<void> set_mirror_options(MirrorParams& p, const Json& a);

}  // namespace blkmirror::qmp
