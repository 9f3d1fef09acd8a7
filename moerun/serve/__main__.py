"""``python -m moerun.serve`` (and ``torchrun -m moerun.serve``): see moerun.serve.cli."""
import sys

from .cli import main

sys.exit(main())
