#include "qmp/job_events.h"

namespace blkmirror::qmp {

namespace {

Json block_event_data(const JobEvent& e) {
  return {{"type", e.type},
          {"device", e.device},
          {"len", e.len},
          {"offset", e.offset},
          {"speed", e.speed}};
}

}  // namespace

std::optional<EventJson> job_event_json(const JobEvent& e) {
  using K = JobEvent::Kind;
  switch (e.kind) {
    case K::kStatusChange:
      return EventJson{"JOB_STATUS_CHANGE", {{"id", e.id}, {"status", to_string(e.status)}}};
    case K::kReady:
      return EventJson{"BLOCK_JOB_READY", block_event_data(e)};
    case K::kCompleted: {
      Json d = block_event_data(e);
      if (e.error) d["error"] = *e.error;
      return EventJson{"BLOCK_JOB_COMPLETED", d};
    }
    case K::kCancelled:
      return EventJson{"BLOCK_JOB_CANCELLED", block_event_data(e)};
    case K::kError: {
      Json d = {{"device", e.device}, {"operation", e.operation}, {"action", e.action},
                {"message", e.message}};
      // Only after a rate-limited stretch (blkmirror's own member).
      if (e.suppressed) d["suppressed"] = e.suppressed;
      return EventJson{"BLOCK_JOB_ERROR", d};
    }
    case K::kPending:
      return EventJson{"BLOCK_JOB_PENDING", {{"type", e.type}, {"id", e.id}}};
    case K::kCopyModeChange:
      // blkmirror's own event; QMP clients ignore events they do not know.
      return EventJson{"BLOCK_JOB_COPY_MODE_CHANGED",
                       {{"device", e.device}, {"copy-mode", e.copy_mode}, {"reason", e.message}}};
    case K::kMismatch: {
      // blkmirror's own event (verify, docs/qmp.md): x- as QMP names what is
      // not QEMU's.
      Json d = {{"id", e.id}, {"offset", e.offset}, {"length", e.len}, {"action", e.action}};
      if (e.suppressed) d["suppressed"] = e.suppressed;
      return EventJson{"X_VERIFY_MISMATCH", d};
    }
    case K::kNote:
      break;
  }
  return std::nullopt;
}

}  // namespace blkmirror::qmp
