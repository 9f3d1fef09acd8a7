"""``python -m moerun.serve`` (and ``torchrun -m moerun.serve``): see moerun.serve.cli."""
import sys

from .cli import main

if __name__ == "__main__":  # the HTTP process is spawned: it imports this module, and must not serve again
    sys.exit(main())
