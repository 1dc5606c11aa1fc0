// blkmirror: live block-device mirroring. Entry point; subcommands live in
// commands.h.
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "cli/commands.h"
#include "cli/exit_codes.h"
#include "cli/signals.h"

int main(int argc, char** argv) {
  spdlog::set_pattern("%^%l%$: %v");
  blkmirror::ignore_stray_signals();
  CLI::App app{"blkmirror: copy a disk while it is in use, then switch its users to the copy"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "blkmirror 0.1.0");
  std::vector<blkmirror::CommandRunner> runners = {
      blkmirror::add_mirror_command(app),
      blkmirror::add_demo_command(app),
      blkmirror::add_serve_command(app),
      blkmirror::add_daemon_command(app),
      blkmirror::add_ctl_command(app),
      blkmirror::add_commit_command(app),
      blkmirror::add_verify_command(app),
  };
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    fmt::print(stderr, "blkmirror: {} (see --help)\n", e.what());
    return blkmirror::exit_code::kBadInput;
  }
  for (auto& run : runners) {
    int rc = run();
    if (rc >= 0) return rc;
  }
  return blkmirror::exit_code::kBadInput;
}
