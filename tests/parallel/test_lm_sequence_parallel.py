"""LongNetLM itself (single-device code) under sequence parallelism equals one process.

The model never mentions ranks: ``sequence_parallel(model, group)`` (parallelism applied from
outside) makes its attention distributed and shifts its positions (XPos blocks stay anchored at the sequence start). Loss and every parameter's
gradient match the single-process run in float64.
"""

from __future__ import annotations

import torch

from longnet import LongNetConfig, LongNetLM
from longnet.parallel import run_workers, sequence_parallel, shard_sequence
from longnet.parallel.mesh import all_reduce_gradients, build_mesh, global_token_count

V, B, N = 37, 2, 64


def _config(position):
    # branches local to a rank (8), spanning 2 ranks (32) and all 4 (64)
    return LongNetConfig(vocab_size=V, embed_dim=24, num_layers=2, num_heads=4, num_kv_heads=2,
                         ffn_dim=48, segment_lengths=[8, 32, 64], dilation_rates=[1, 2, 4],
                         position=position)


def _setup(position):
    torch.manual_seed(11)
    model = LongNetLM(_config(position)).double()
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, V, (B, N + 1), generator=g)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 50:] = False  # padding at the end of the second sequence
    return model, tokens[:, :-1], tokens[:, 1:], mask


def _worker(rank, world, positions):
    results = []
    for position in positions:
        model, inputs, labels, mask = _setup(position)
        ref = model(inputs, labels=labels, key_padding_mask=mask)
        ref.loss.backward()
        ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        pm = build_mesh(1, world)
        inp, lab, msk = (shard_sequence(t, 1, pm.sp_rank, world) for t in (inputs, labels, mask))
        with sequence_parallel(model, pm.sp_group):
            out = model(inp, labels=lab, key_padding_mask=msk)
        n_local = out.num_tokens
        loss = out.loss * n_local / global_token_count(n_local, pm)  # global token mean
        loss.backward()
        all_reduce_gradients(model.parameters(), pm)
        chunk = ref.logits.shape[1] // world
        logit_err = (out.logits - ref.logits[:, rank * chunk:(rank + 1) * chunk]).abs().max()
        grad_err = max((p.grad - ref_grads[n]).abs().max().item()
                       for n, p in model.named_parameters())
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)
        results.append((position, logit_err.item(), abs(total.item() - ref.loss.item()), grad_err))
    return results


def test_longnet_lm_sequence_parallel_matches_one_process():
    per_rank = run_workers(_worker, 4, ["xpos", "rope"], timeout_s=180, start_method="fork")
    for rank, rows in enumerate(per_rank):
        for position, logit_err, loss_err, grad_err in rows:
            assert logit_err < 1e-10, (rank, position, logit_err)
            assert loss_err < 2e-6, (rank, position, loss_err)  # the LM reduces its loss in float32
            assert grad_err < 1e-10, (rank, position, grad_err)
