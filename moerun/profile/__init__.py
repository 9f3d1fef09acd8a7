"""Built-in, opt-in profiling (``--profile``): every rank times its phases per step, counts
the experts its router picks and notes its memory; at the end rank 0 gathers the ranks'
reports and writes ``summary.json`` and a Perfetto ``trace.json`` (``moerun.profile.summary``),
which ``moerun profile-report DIR`` prints.

    from moerun.profile import NULL_PROFILER, Profiler   # the model's default, and the real one
    from moerun.profile.summary import build_summary, trace_events, write_profile

``profiler`` is torch only (the model imports it); ``summary`` turns the reports into the
summary and the trace with the definitions of ``moerun.plan.metrics``.
"""
from .profiler import NO_PHASE, NULL_PROFILER, NullProfiler, Profiler, measure_overhead

__all__ = ["NO_PHASE", "NULL_PROFILER", "NullProfiler", "Profiler", "measure_overhead"]
