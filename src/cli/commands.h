// The CLI's subcommands. Each registers its options on the app and returns the
// function that runs it (an exit code). Threading: main thread, which becomes
// the loop thread.
#pragma once

#include <functional>

#include <CLI/CLI.hpp>

namespace blkmirror {

using CommandRunner = std::function<int()>;

CommandRunner add_mirror_command(CLI::App& app);
CommandRunner add_demo_command(CLI::App& app);
CommandRunner add_serve_command(CLI::App& app);
CommandRunner add_daemon_command(CLI::App& app);
CommandRunner add_ctl_command(CLI::App& app);
CommandRunner add_commit_command(CLI::App& app);
CommandRunner add_verify_command(CLI::App& app);

}  // namespace blkmirror
