"""2-D (data x sequence parallel) step: same loss and gradients as one process, with gradients
summed by one flat all-reduce after backward or by DDP over the data axis (buckets summed over both
axes during backward).

A tiny LM of our own (token embedding -> one causal MultiheadDilatedAttention with RoPE -> linear
-> cross-entropy), written for one device; sequence parallelism is applied from outside with
``sequence_parallel(model, group)``. float64 throughout.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from longnet.nn import MultiheadDilatedAttention
from longnet.parallel import run_workers, sequence_parallel, shard_sequence
from longnet.parallel.mesh import all_reduce_gradients, build_mesh, data_parallel, global_token_count, reduce_loss

V, D_MODEL, HEADS, B, N = 11, 12, 3, 4, 32
PATTERN = dict(segment_lengths=(4, 16, 32), dilation_rates=(1, 2, 4))  # local, 2 ranks, all


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(V, D_MODEL)
        self.attn = MultiheadDilatedAttention(D_MODEL, HEADS, is_causal=True, position="rope",
                                              sub_ln=False, **PATTERN)
        self.head = nn.Linear(D_MODEL, V)

    def forward(self, tokens):  # (b, n) -> (b, n, V)
        x = self.tok(tokens)
        return self.head(x + self.attn(x))


def _data():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, V, (B, N + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _model():
    torch.manual_seed(5)
    return TinyLM().double()


def _reference():
    model = _model()
    inputs, targets = _data()
    loss = F.cross_entropy(model(inputs).reshape(-1, V), targets.reshape(-1))
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _mesh_worker(rank, world, shapes):
    ref_loss, ref_grads = _reference()
    out = []
    for dp, sp in shapes:
        pm = build_mesh(dp, sp)
        for mode in ("all_reduce", "ddp"):
            model = _model()
            forward = model
            if mode == "ddp":
                with torch.no_grad():  # replicas differ until DDP's broadcasts
                    for p in model.parameters():
                        p.add_(rank)
                # ~100-byte buckets: several hook calls per backward, launched while backward runs
                forward = data_parallel(model, pm, bucket_cap_mb=1e-4)
            inputs, targets = _data()
            b = B // dp  # sequences of this data-parallel rank, then this rank's chunk of them
            rows = slice(pm.dp_rank * b, (pm.dp_rank + 1) * b)
            inp = shard_sequence(inputs[rows], 1, pm.sp_rank, sp)
            tgt = shard_sequence(targets[rows], 1, pm.sp_rank, sp)
            with sequence_parallel(model, pm.sp_group):
                logits = forward(inp)
            local_sum = F.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1), reduction="sum")
            loss = local_sum / global_token_count(tgt.numel(), pm)
            loss.backward()
            if mode == "all_reduce":
                all_reduce_gradients(model.parameters(), pm)
            grad_err = max((p.grad - ref_grads[n]).abs().max().item()
                           for n, p in model.named_parameters())
            out.append(((dp, sp), mode, (pm.dp_rank, pm.sp_rank),
                        abs(reduce_loss(loss, pm).item() - ref_loss), grad_err))
    return out


def test_data_x_sequence_parallel_step_matches_one_process():
    shapes = [(2, 2), (1, 4), (4, 1)]
    results = run_workers(_mesh_worker, 4, shapes, timeout_s=180, start_method="fork")
    for rank, per_mesh in enumerate(results):
        assert [r[:2] for r in per_mesh] == [(s, m) for s in shapes for m in ("all_reduce", "ddp")]
        for (dp, sp), mode, coords, loss_err, grad_err in per_mesh:
            assert coords == (rank // sp, rank % sp)
            assert loss_err < 1e-12 and grad_err < 1e-12, (rank, dp, sp, mode, loss_err, grad_err)


def test_data_parallel_rejects_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        data_parallel(object(), None)
    with pytest.raises(TypeError, match="pm"):
        data_parallel(TinyLM(), "dp")
