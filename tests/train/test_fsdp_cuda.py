"""The GPU path of ``longnet train --fsdp``: NCCL, bf16 mixed precision, per-block activation checkpointing.

Skipped without CUDA (the CPU path is tested on gloo in test_fsdp_train.py).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import MICRO_MODEL

from longnet.parallel import run_workers
from longnet.parallel.launch import free_port
from longnet.train import read_metrics

pytestmark = pytest.mark.cuda
SRC = Path(__file__).resolve().parents[2] / "src"


def _mixed_precision_worker(rank, world):
    from longnet.models import LongNetConfig, LongNetLM
    from longnet.parallel import init_mesh, parallelize
    from longnet.train.config import ParallelSection

    par = init_mesh(1, torch.device("cuda", 0))
    assert par.backend == "nccl"
    model = LongNetLM(LongNetConfig(vocab_size=64, max_train_length=32, **MICRO_MODEL)).cuda()
    parallelize(model, par, ParallelSection(fsdp=True), param_dtype=torch.bfloat16)
    seen = []
    # inside the block's forward its weights are the gathered bf16 copies
    model.blocks[0].ffn_norm.register_forward_pre_hook(lambda m, args: seen.append((m.weight.dtype, args[0].dtype)))
    x = torch.randint(0, 64, (2, 32), device="cuda")
    out = model(x, labels=x)
    out.loss.backward()
    param = next(model.parameters())
    return [str(d) for d in seen[0]], str(param.dtype), str(param.grad.dtype), math.isfinite(out.loss.item())


def test_fsdp_gathers_bf16_weights_and_keeps_float32_shards():
    (compute, stored, grad, finite), = run_workers(_mixed_precision_worker, 1, backend="nccl", timeout_s=300)
    assert compute == ["torch.bfloat16", "torch.bfloat16"]  # the block computed in bf16
    assert stored == grad == "torch.float32" and finite  # sharded weights and reduced gradients: float32


def test_torchrun_nccl_fsdp_bf16_with_checkpointing(tmp_path, corpus, cache):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(SRC))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "-m", "longnet", "train",
           "--data", str(corpus), "--cache-dir", str(cache), "--out", str(out), "--vocab-size", "300",
           "--seq-len", "32", "--batch-tokens", "128", "--max-steps", "4", "--save-every", "2", "--no-progress",
           "--model-overrides", json.dumps(MICRO_MODEL), "--device", "cuda", "--dtype", "bfloat16", "--fsdp",
           "--grad-checkpointing"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nccl, collective timeout" in proc.stderr and "FSDP2" in proc.stderr
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    from longnet.models import LongNetLM

    model = LongNetLM.from_pretrained(out)
    assert all(p.dtype == torch.float32 for p in model.parameters())
