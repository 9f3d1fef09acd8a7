"""The analytic planner and claims checker: pure Python, no torch, no GPU.

Is a TP x PP x EP x DP layout valid for a model and GPU count, what does each rank hold,
does it fit in memory, how fast could it be on a hardware spec (a roofline projection,
labelled as such), and do a source's performance claims stand up.

    from moerun.plan import ClaimsFile, HardwareSpec, Strategy, check, make_plan, search
    s = Strategy.load("baseline")
    rep = make_plan(ModelConfig.load("seed-30b"), s.layout, HardwareSpec.load("seed"), 16, s.workload)
    check(ClaimsFile.load("seed"))                  # one ClaimResult per claim

Modules, one owner per fact: ``presets`` (finding and strictly loading the TOML presets),
``hardware`` (HardwareSpec), ``strategy`` (Strategy, Workload), ``cost`` (the formulas),
``roofline`` (project: per-stage cost, TPOT, TTFT, throughput), ``planner`` (make_plan,
search), ``claims`` (claims data and verdicts), ``format`` (every printed table),
``cli`` (``moerun plan``), ``metrics`` (the six metrics' one definition), and for
``scripts/bench.py --strategy``: ``substitute`` (the closest valid layout, a measurable
subset, a narrowed or one-rank model), ``measure`` (a ``moerun generate --profile`` run and
its summary), ``calibrate`` (the roofline with measured compute) and ``compare`` (the
claimed / measured / projected table). Layout rules and shard ranges belong to ``moerun.parallel``,
parameter counts to ``moerun.config.ModelConfig``, dtype sizes to ``moerun.dtypes``.
"""
from .claims import METRICS, ClaimsFile, check
from .hardware import HardwareSpec
from .planner import PlanReport, RankReport, make_plan, search
from .roofline import project
from .strategy import Strategy, Workload

__all__ = ["make_plan", "search", "PlanReport", "RankReport", "HardwareSpec", "Workload", "Strategy",
           "ClaimsFile", "check", "METRICS", "project"]
