"""The ``moerun`` command: ``moerun generate | serve | layout | plan ...``.

Each subcommand lives in its own module with a ``main(argv)``; this file only routes.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "generate": ("moerun.generate", "generate tokens (one process, or a layout under torchrun)"),
    "serve": ("moerun.serve.cli", "serve an OpenAI-compatible HTTP API (one process, or a layout under torchrun)"),
    "layout": ("moerun.layout_cli", "validate a TP x PP x EP x DP layout and print its rank table"),
    "plan": ("moerun.plan.cli", "project a layout on a hardware spec; check claims"),
    "profile-report": ("moerun.profile_report", "print a profile written by generate --profile-out DIR"),
}


def usage() -> str:
    lines = ["usage: moerun {" + ",".join(COMMANDS) + "} [options]", "",
             "commands (moerun COMMAND --help for each one's flags and defaults):"]
    lines += [f"  {name:14s} {helptext}" for name, (_, helptext) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):  # asked for: stdout, exit 0
        print(usage())
        return 0
    if not argv or argv[0] not in COMMANDS:
        what = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(f"moerun: error: {what}\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
