"""Sequence-parallel dilated attention equals the single-device operator (gloo, spawned ranks).

Every worker builds the full inputs from a shared seed, runs the single-device operator on them
and the sequence-parallel one on its chunk, and returns the largest differences of the output and
of the gradients of its chunk; the test process asserts on every rank's numbers.
"""

from __future__ import annotations

import pytest
import torch

import longnet
from longnet.cli.plan import plan_model
from longnet.ops.pattern import DilatedPattern
from longnet.parallel import (
    CommCounter,
    WorkerError,
    dilated_attention,
    plan_bytes,
    run_workers,
    sequence_parallel,
    shard_sequence,
)

# (B, H, Hkv, N_per_rank, D, segment_lengths, dilation_rates); N = world * n
CASES_4 = [
    # spans: w=4, 8 local; 16 two ranks; 32 all four
    (1, 4, 4, 8, 5, (4, 8, 16, 32), (1, 2, 4, 8)),
    # dilation not dividing the chunk (padded slots), w > N (clipped to N, all ranks)
    (2, 3, 3, 8, 4, (8, 16, 64), (3, 5, 6)),
    # tail group: n = 6, w = 18 spans ranks {0,1,2} and {3} (N % w != 0); GQA 4 heads on 2
    (1, 4, 2, 6, 3, (6, 12, 18), (2, 3, 4)),
]
CASES_2 = [
    (2, 4, 2, 12, 5, (4, 12, 24), (1, 2, 3)),
    (1, 5, 5, 9, 3, (3, 18, 40), (2, 4, 5)),  # odd n, r = 4 and 5 do not divide 9
]


def _case_errors(rank, world, case, is_causal, padded, seed, dtype=torch.float64):
    B, H, Hkv, n, D, w, r = case
    N = n * world
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, dtype=torch.float64, generator=g)
    k = torch.randn(B, Hkv, N, D, dtype=torch.float64, generator=g)
    v = torch.randn(B, Hkv, N, D, dtype=torch.float64, generator=g)
    dout = torch.randn(B, H, N, D, dtype=torch.float64, generator=g)
    mask = None
    if padded:
        mask = torch.rand(B, N, generator=g) > 0.3
        mask[0, :n] = False  # a whole chunk of padding: queries there may see no key at all
    kw = dict(segment_lengths=w, dilation_rates=r, is_causal=is_causal,
              enable_gqa=Hkv != H)
    q, k, v, dout = (t.to(dtype) for t in (q, k, v, dout))
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = longnet.dilated_attention(*full, key_padding_mask=mask, **kw)
    (ref * dout).sum().backward()
    part = [shard_sequence(t, 2, rank, world).clone().requires_grad_() for t in (q, k, v)]
    out = dilated_attention(*part, key_padding_mask=None if mask is None else
                            shard_sequence(mask, 1, rank, world), **kw)
    (out * shard_sequence(dout, 2, rank, world)).sum().backward()
    errs = {"out": (out - shard_sequence(ref, 2, rank, world)).abs().max().item()}
    for name, a, b in zip("qkv", part, full):
        errs["d" + name] = (a.grad - shard_sequence(b.grad, 2, rank, world)).abs().max().item()
    return errs


def _equivalence(rank, world, cases):
    results = []
    seed = 0
    for case in cases:
        for is_causal in (False, True):
            for padded in (False, True):
                seed += 1
                errs = _case_errors(rank, world, case, is_causal, padded, seed)
                results.append(((case, is_causal, padded), errs))
    return results


def _random_cases(world, count, seed):
    """Random shapes and patterns that split over ``world`` ranks (same on every rank)."""
    import random

    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        n = rng.randint(2, 9)
        Hkv = rng.randint(1, 3)
        H = Hkv * rng.randint(1, 2)
        branches = set()
        for _ in range(rng.randint(1, 4)):
            divisors = [d for d in range(1, n + 1) if n % d == 0]
            w = rng.choice(divisors) if rng.random() < 0.4 else n * rng.randint(2, world + 1)
            branches.add((w, rng.randint(1, 7)))
        w, r = zip(*sorted(branches))
        cases.append(((rng.randint(1, 2), H, Hkv, n, rng.randint(1, 4), w, r),
                      rng.random() < 0.5, rng.random() < 0.5))
    return cases


def _random(rank, world):
    return [(case, causal, padded, _case_errors(rank, world, case, causal, padded, 200 + i))
            for i, (case, causal, padded) in enumerate(_random_cases(world, 12, world))]


def _float32(rank, world, case):
    """float32 (the fused CPU kernel): parallel vs single device, both in float32."""
    return [_case_errors(rank, world, case, c, False, 100 + c, torch.float32) for c in (False, True)]


BYTES_CASE = dict(n=8, w=(4, 16, 8), r=(1, 2, 4), H=3, D=4)  # w=16 spans 2 ranks at any world


def _bytes(rank, world, n, w, r, H, D):
    torch.manual_seed(rank)
    q, k, v = (torch.randn(1, H, n, D, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    with CommCounter() as c:
        out = dilated_attention(q, k, v, segment_lengths=w, dilation_rates=r, is_causal=True,
                                check_chunks=False)
        out.sum().backward()
    plan = plan_bytes(DilatedPattern(w, r), n * world, world, H, D, 8, rank=rank)
    predicted = {b.branch: {"forward": b.forward_sent, "backward": b.backward_sent}
                 for b in plan.branches if not b.local}
    return c.by_branch(), predicted, c.sent, c.received


def _bad_inputs(rank, world):
    msgs = []
    q = torch.randn(1, 2, 6 if rank == 0 else 4, 3)
    try:  # unequal chunks: every rank gets the same error
        dilated_attention(q, q, q, segment_lengths=(12,), dilation_rates=(1,))
    except ValueError as e:
        msgs.append(str(e))
    q = torch.randn(1, 2, 6, 3)
    try:  # w = 4 and n = 6: neither divides the other
        dilated_attention(q, q, q, segment_lengths=(4,), dilation_rates=(1,))
    except ValueError as e:
        msgs.append(str(e))
    return msgs


def _dispatch(rank, world):
    """Parallelism applied from outside: a single-device attention module becomes sequence parallel
    under ``sequence_parallel(module)`` and single-device again after it."""
    from longnet.nn import MultiheadDilatedAttention

    torch.manual_seed(7)
    attn = MultiheadDilatedAttention(8, 2, segment_lengths=(4, 16), dilation_rates=(1, 2),
                                     is_causal=True, position="rope").double()
    x = torch.randn(1, 8 * world, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    full = attn(x)
    with sequence_parallel(attn) as m:
        state = (m.sequence_rank, m.attention_fn is not None)
        out = attn(shard_sequence(x, 1))
        try:
            m.attention_fn(x[:, None], x[:, None], x[:, None], segment_lengths=(4,), dropout_p=0.1)
            dropout_error = None
        except ValueError as e:
            dropout_error = str(e)
    dense = MultiheadDilatedAttention(8, 2, dense=True)
    try:
        sequence_parallel(dense).__enter__()
        dense_error = None
    except ValueError as e:
        dense_error = str(e)
    return {"state": state, "err": (out - shard_sequence(full, 1)).abs().max().item(),
            "after": (attn.attention_fn is None, attn.sequence_rank == 0),
            "dropout_error": dropout_error, "dense_error": dense_error}


def _worker(rank, world, cases):
    """Everything one process group checks: one spawn per world size keeps the tests fast."""
    return {"equivalence": _equivalence(rank, world, cases),
            "bytes": _bytes(rank, world, **BYTES_CASE),
            "bad_inputs": _bad_inputs(rank, world),
            "float32": _float32(rank, world, cases[0]),
            "random": _random(rank, world),
            "dispatch": _dispatch(rank, world)}


@pytest.fixture(scope="module", params=[(4, CASES_4), (2, CASES_2)], ids=["world4", "world2"])
def group_results(request):
    world, cases = request.param
    return world, cases, run_workers(_worker, world, cases, timeout_s=180, start_method="fork")


def test_matches_single_device_outputs_and_gradients_on_every_rank(group_results):
    world, cases, per_rank = group_results
    assert len(per_rank) == world
    for rank, res in enumerate(per_rank):
        results = res["equivalence"]
        assert len(results) == 4 * len(cases)
        for what, errs in results:
            assert max(errs.values()) < 1e-10, (rank, what, errs)
        for errs in res["float32"]:
            assert max(errs.values()) < 1e-5, (rank, errs)
        assert len(res["random"]) == 12
        for case, causal, padded, errs in res["random"]:
            assert max(errs.values()) < 1e-10, (rank, case, causal, padded, errs)


def test_bytes_per_rank_constant_as_sequence_grows_with_ranks_and_match_plan(group_results):
    world, _, per_rank = group_results
    H, D = BYTES_CASE["H"], BYTES_CASE["D"]
    # only branch 1 (w = 16) communicates: 2 ranks share a segment whatever the world size;
    # one all-gather of [k | v] residues forward, one reduce-scatter of [dk | dv] backward,
    # (2 - 1) * H * ceil(n / r) * 2D * 8 bytes each, the same for N = 16 and N = 32
    expect = (2 - 1) * H * 4 * 2 * D * 8
    for rank, res in enumerate(per_rank):
        by_branch, predicted, sent, received = res["bytes"]
        assert by_branch == predicted, (world, rank)
        assert by_branch == {1: {"forward": expect, "backward": expect}}, (world, rank)
        assert sent == received == 2 * expect
    # `longnet plan` reports the same numbers (busiest rank) from the same code
    planned = plan_model(seq_len=BYTES_CASE["n"] * world, gpus=world, layers=1, embed_dim=H * D,
                         heads=H, ffn_dim=4, segment_lengths=BYTES_CASE["w"],
                         dilation_rates=BYTES_CASE["r"], dtype_bytes=8, vocab_size=1)
    assert planned["comm_bytes_per_layer_fwd"] == max(res["bytes"][0][1]["forward"]
                                                      for res in per_rank)
    assert planned["comm_bytes_per_layer_bwd"] == max(res["bytes"][0][1]["backward"]
                                                      for res in per_rank)


def test_sequence_parallel_is_applied_to_a_module_from_outside(group_results):
    world, _, per_rank = group_results
    for rank, res in enumerate(per_rank):
        d = res["dispatch"]
        assert d["state"] == (rank, True) and d["after"] == (True, True)
        assert d["err"] < 1e-12  # outputs (positions included) equal this chunk of one device's
        assert "dropout" in d["dropout_error"]
        assert "dense attention cannot run sequence-parallel" in d["dense_error"]


def test_bad_inputs_raise_value_error_on_every_rank(group_results):
    world, _, per_rank = group_results
    for res in per_rank:
        msgs = res["bad_inputs"]
        assert len(msgs) == 2
        assert "equal chunks" in msgs[0]
        assert f"chunk length: {[6] + [4] * (world - 1)}" in msgs[0]
        assert "branch 0" in msgs[1] and "divide" in msgs[1]


def _failing_worker(rank, world):
    if rank == 1:
        raise RuntimeError("rank 1 breaks on purpose")
    torch.distributed.all_reduce(torch.ones(1))  # would wait for rank 1 forever
    return rank


def _killed_worker(rank, world):
    if rank == 1:
        import os
        import signal
        os.kill(os.getpid(), signal.SIGKILL)  # dies without a word
    torch.distributed.all_reduce(torch.ones(1))
    return rank


def _stalled_worker(rank, world):
    if rank == 1:
        import time
        time.sleep(600)  # alive but never joins the collective
    torch.distributed.all_reduce(torch.ones(1))
    return rank


def test_a_raising_rank_stops_the_others():
    with pytest.raises(WorkerError, match="rank 1 breaks on purpose") as info:
        run_workers(_failing_worker, 3, timeout_s=120, start_method="fork")
    assert info.value.rank == 1


def test_a_killed_rank_stops_the_others():
    with pytest.raises(WorkerError, match="without a traceback") as info:
        run_workers(_killed_worker, 2, timeout_s=120, start_method="fork")
    assert info.value.rank == 1


def test_a_stalled_rank_makes_the_collective_time_out():
    with pytest.raises(WorkerError) as info:
        run_workers(_stalled_worker, 2, timeout_s=120, pg_timeout_s=2,
                    start_method="fork")
    assert info.value.rank == 0  # rank 0's collective timed out; rank 1 was then stopped
    assert "timed out" in str(info.value).lower() or "timeout" in str(info.value).lower()


def test_shard_sequence_and_placement_errors_without_processes():
    x = torch.zeros(1, 2, 10, 3)
    with pytest.raises(ValueError, match="not divisible"):
        shard_sequence(x, 2, 0, 4)
    assert shard_sequence(x, 2, 1, 2).shape == (1, 2, 5, 3)
    with pytest.raises(ValueError, match="neither|divide"):
        plan_bytes(DilatedPattern((3,), (1,)), 16, 4, 2, 4, 2)
    with pytest.raises(RuntimeError, match="torch.distributed"):
        dilated_attention(x, x, x, segment_lengths=(5,), dilation_rates=(1,))
