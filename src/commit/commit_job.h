// CommitJob: QEMU's intermediate commit (block-commit of a layer that has an
// overlay and no writer). One pass copies what the layers top..(above base)
// hold into the base (growing it first when it is shorter); then, in prepare,
// the overlay's header names the base as its backing file and every parent of
// top moves to the base, so the committed layers leave the chain. Nobody
// writes to those layers (they are read-only below the overlay), so no dirty
// tracking is needed and there is no ready/complete step. Clients of the
// active layer read the same data throughout: the base only receives data
// the layers above it already cover.
//
// The active commit (top is the layer clients use) is the mirror engine
// (MirrorParams::commit); both are resolved by plan_commit().
//
// Threading rule: loop thread only.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "blockdev/graph.h"
#include "commit/commit_plan.h"
#include "io/buffer.h"
#include "job/job.h"
#include "mirror/mirror_params.h"
#include "mirror/retry_backoff.h"

namespace blkmirror {

struct CommitParams {
  std::string job_id;
  std::string device;
  int64_t speed = 0;
  ErrorPolicy on_error = ErrorPolicy::kReport;
  bool auto_finalize = true, auto_dismiss = true;
  // What the overlay's header names as its new backing file, and its format.
  std::string backing_file;
  std::optional<std::string> backing_format;
};

class CommitJob : public Job {
 public:
  static constexpr uint64_t kStep = 2 << 20;  // bytes copied per request

  // Attaches to the plan's nodes (refusing permission conflicts, with QEMU's
  // texts); nothing is read or written until start().
  // REQUIRES: plan is an intermediate commit (overlay set).
  static Result<std::shared_ptr<CommitJob>> create(Graph& graph, const CommitPlan& plan,
                                                   CommitParams p);

  // The layers that left the chain (valid after a successful commit).
  const std::vector<Node*>& removed() const { return removed_; }

 protected:
  Task<Result<void>> run() override;
  Task<Result<void>> prepare() override;
  Task<void> commit() override;
  Task<void> abort() override;

 private:
  struct Edges {
    std::unique_ptr<Child> top, base;
    std::vector<std::unique_ptr<Child>> held;  // between top and base, and the overlay
  };
  CommitJob(Graph& graph, const CommitPlan& plan, CommitParams p, Edges edges);
  // The job's edges go when it ends, so the committed layers can be removed
  // (and blockdev-del'ed) before the job is dismissed.
  void release();
  // An error under the policy: fails the job (report) or waits (stop: paused
  // until resumed; ignore: a growing hold), after which the range is retried.
  Task<Result<void>> on_error(const Error& e, bool is_read);

  Graph& graph_;
  CommitParams p_;
  Node* top_;
  Node* base_;
  Node* overlay_;
  const uint32_t base_depth_;
  std::vector<Node*> removed_;
  Edges edges_;
  AlignedBuffer buf_{kStep};  // one request at a time: reads, then writes
  RetryBackoff backoff_;
};

}  // namespace blkmirror
