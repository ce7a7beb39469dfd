"""Teardown: ``destroy_process_group`` ends every gloo worker thread, even after sequence-parallel backward.

Before the fix, ``longnet.parallel``'s caches held the process groups strongly; their gloo worker
threads then lived until interpreter shutdown and, in about 1 run in 3, released a finished
collective while Python was finalizing: SIGABRT ("terminate called without an active exception").
The fast test checks the cause directly (no worker thread survives ``destroy_process_group``);
the slow one repeats the original repro 20 times under torchrun (``benchmarks/teardown_repeat.py``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from longnet.parallel import dilated_attention, parallelize_sequence, run_workers

ROOT = Path(__file__).resolve().parents[2]


def _gloo_threads() -> int:
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            names.append(Path(f"/proc/self/task/{tid}/comm").read_text().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return sum(name.startswith("pt_gloo") for name in names)


def _worker(rank, world):
    from longnet.models import LongNetConfig, LongNetLM

    g = torch.Generator().manual_seed(rank)
    for segments in ([16, 64], [16, 32]):  # the whole world, then sub-groups of 2 ranks
        q, k, v = (torch.randn(1, 2, 64, 8, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3))
        out = dilated_attention(q, k, v, segment_lengths=segments, dilation_rates=[1, 2], is_causal=True)
        out.sum().backward()
    # a model made sequence parallel keeps no group alive either
    model = LongNetLM(LongNetConfig(vocab_size=17, embed_dim=16, num_layers=1, num_heads=2, ffn_dim=16,
                                    segment_lengths=[4, 16], dilation_rates=[1, 2], max_train_length=64))
    parallelize_sequence(model)
    model(torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long)).loss.backward()
    kept = (out, model)  # the autograd graph and the model outlive the process group, as in a script
    before = _gloo_threads()
    dist.destroy_process_group()
    after = _gloo_threads()
    with pytest.raises(RuntimeError, match="destroyed|needs torch.distributed"):
        kept[1](torch.zeros(1, 4, dtype=torch.long))
    return before, after


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc")
def test_destroy_process_group_ends_every_gloo_thread():
    for before, after in run_workers(_worker, 4, timeout_s=120, start_method="fork"):
        assert before > 0 and after == 0, (before, after)


@pytest.mark.slow
def test_teardown_repro_20_times_under_torchrun():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import teardown_repeat
    finally:
        sys.path.pop(0)
    assert teardown_repeat.main(["--repeats", "20", "--no-write"]) == 0
