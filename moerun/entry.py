"""What every command's process does around its body: logging to stderr, and one exit
policy on every rank.

    sys.exit(run_command("moerun generate", lambda: body(args)))

- a ``ValueError`` (a bad layout, flag, prompt or checkpoint) prints one line
  ``<prog>: error: <message>`` (rank 0 only under torchrun, so the user reads it once;
  every rank raises the same error because every rank checks the same inputs) and exits 2;
- any other exception (a peer died, a collective timed out) prints the rank and the
  error and exits 1 at once through ``os._exit``, so no rank waits in teardown;
- Ctrl-C exits 130 with one line.
Under torchrun the exit skips interpreter teardown (``os._exit``): a process group whose
peer is gone can block in its destructor.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Callable

from .runtime import launched_world


def setup_logging() -> None:
    rank, _ = launched_world()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="[moerun] %(message)s", stream=sys.stderr)


def run_command(prog: str, body: Callable[[], int]) -> int:
    rank, world = launched_world()
    setup_logging()
    try:
        code = body()
    except ValueError as e:
        if rank == 0:
            print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        elif world > 1:  # let rank 0 print before torchrun tears the group down on the first exit
            time.sleep(2)
        code = 2
    except KeyboardInterrupt:
        if rank == 0:
            print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        code = 130
    except Exception as e:  # a peer died or a collective timed out: exit, never hang
        if world == 1:
            raise
        print(f"{prog}: rank {rank} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        code = 1
    if world > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
