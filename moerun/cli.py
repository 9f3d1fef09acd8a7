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
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: moerun {" + ",".join(COMMANDS) + "} [options]\n", file=sys.stderr)
        for name, (_, helptext) in COMMANDS.items():
            print(f"  {name:10s} {helptext}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
