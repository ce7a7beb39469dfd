"""Benchmarks: timing and memory helpers, the attention benchmark, tables and plots.

Nothing here runs at import; :mod:`longnet.cli.bench` is the command-line front end.
"""

from longnet.bench.attention import AttentionBenchConfig, run_attention_bench, target_checks
from longnet.bench.measure import Measurement, measure

__all__ = ["AttentionBenchConfig", "run_attention_bench", "target_checks", "Measurement",
           "measure"]
