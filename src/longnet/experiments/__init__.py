"""The paper's experiments in miniature (``longnet experiment``).

- :mod:`longnet.experiments.table2`: the design of the paper's Table 2 (dense Transformer,
  Sparse Transformer and LongNet trained at several lengths on one budget, perplexity at 2K, 8K
  and 32K), with bootstrap intervals, loss against position and a copy probe.
"""

from longnet.experiments.table2 import ROWS, Table2Plan, run_table2

__all__ = ["ROWS", "Table2Plan", "run_table2"]
