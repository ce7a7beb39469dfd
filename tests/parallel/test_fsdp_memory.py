"""``longnet plan --fsdp``: the per-rank weight, gradient and AdamW bytes it predicts are the ones measured
on a model sharded with FSDP2 (gloo, 2 data parallel x 2 sequence parallel) after an optimizer step."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from longnet.cli import plan
from longnet.models import LongNetConfig, LongNetLM
from longnet.parallel import run_workers
from longnet.parallel.fsdp import shard_rows, sharded_state_bytes

CONFIG = dict(vocab_size=41, max_train_length=32, embed_dim=32, num_layers=2, num_heads=2, ffn_dim=64,
              segment_lengths=(8, 32), dilation_rates=(1, 2))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _measure(rank, world, shard):
    from longnet.parallel import init_mesh, parallelize
    from longnet.train import build_optimizer
    from longnet.train.config import ParallelSection

    par = init_mesh(2, torch.device("cpu"))
    torch.manual_seed(0)
    model = LongNetLM(LongNetConfig(**CONFIG))
    parallelize(model, par, ParallelSection(fsdp=True, fsdp_shard=shard))
    opt = build_optimizer(model, lr=1e-3)
    x = torch.randint(0, 41, (1, 16))
    model(x, labels=x).loss.backward()
    params = list(model.parameters())
    measured = {"params": sum(_local(p).numel() * p.element_size() for p in params),
                "grads": sum(_local(p.grad).numel() * p.grad.element_size() for p in params)}
    opt.step()
    measured["optimizer"] = sum(_local(v).numel() * v.element_size() for s in opt.state.values() for v in s.values())
    return measured


@pytest.mark.parametrize("shard", ["mesh", "data"])
def test_planned_bytes_per_rank_match_the_measured_ones(shard):
    shapes = [tuple(p.shape) for p in LongNetLM(LongNetConfig(**CONFIG)).parameters()]
    measured = run_workers(_measure, 4, shard, timeout_s=120, start_method="fork")
    for rank, got in enumerate(measured):  # mesh: 4 distinct shards; data: 2 (rank // 2), each on 2 ranks
        assert got == (sharded_state_bytes(shapes, 4, rank) if shard == "mesh"
                       else sharded_state_bytes(shapes, 2, rank // 2)), rank
    assert measured[3]["params"] < measured[0]["params"]  # uneven shards: device 0 is the busiest
    r = plan.plan_config(LongNetConfig(**CONFIG), seq_len=32, gpus=2, data_parallel=2, fsdp=True, fsdp_shard=shard)
    assert (r["world"], r["fsdp"], r["fsdp_shard"]) == (4, True, shard)
    assert {k: r[f"memory_bytes_{k}"] for k in ("params", "grads", "optimizer")} == measured[0]
    assert r["memory_bytes_states"] == sum(measured[0].values())
    print(f"plan vs measured ({shard}), rank 0: {measured[0]}")


def test_shard_rows_is_torch_chunk():
    for dim0 in (1, 2, 5, 8, 41):
        for world in (1, 2, 3, 4, 8):
            chunks = torch.arange(dim0).chunk(world)
            assert [shard_rows(dim0, world, r) for r in range(world)] == \
                [len(c) for c in chunks] + [0] * (world - len(chunks))
    with pytest.raises(ValueError, match="rank"):
        shard_rows(4, 2, 2)


def test_plan_cli_prints_fsdp_memory(capsys):
    parser = argparse.ArgumentParser()
    plan.add_arguments(parser)
    assert plan.run(parser.parse_args(["--seq-len", "32768", "--gpus", "2", "--data-parallel", "4", "--fsdp",
                                       "--preset", "base"])) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    r = json.loads(lines[-1])
    text = "\n".join(lines[:-1])
    assert "8 devices = 4 data parallel x 2 sequence parallel; FSDP" in text
    assert "AdamW state (fp32, sharded)" in text
    whole = plan.plan_config(LongNetConfig.from_preset("base"), seq_len=32768, gpus=2)
    assert whole["memory_bytes_states"] / 8 < r["memory_bytes_states"] < whole["memory_bytes_states"] / 7
    with pytest.raises(ValueError, match="data_parallel must be a positive integer"):
        plan.plan_config(LongNetConfig.from_preset("base"), seq_len=32768, gpus=2, data_parallel=0)
