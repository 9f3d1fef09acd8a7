"""The one dtype table: every dtype name moerun accepts, its size, and which of them can run.

No torch here, so the planner (``moerun.plan``) and the command lines share it; the
torch dtypes are resolved in ``moerun.build`` from the same names.

    DTYPE_BYTES["bfloat16"]        # 2
    check_dtype("bf16", runnable=True)   # ValueError naming the accepted spellings
"""
from __future__ import annotations

# name -> bytes per element. One spelling each: torch's names.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1}
# the dtypes the runtime computes in (float8 is a planner-only storage assumption)
RUN_DTYPES = ("float32", "bfloat16", "float16")


def check_dtype(name: str, runnable: bool = False) -> str:
    """``name`` if it is a known dtype (and one the runtime runs, when ``runnable``)."""
    allowed = RUN_DTYPES if runnable else tuple(DTYPE_BYTES)
    if name not in allowed:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(allowed)}")
    return name
