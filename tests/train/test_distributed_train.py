"""Data x sequence parallel training equals one process: the step, the trainer, and torchrun.

The micro model's pattern has a branch local to a rank (segment 8) and one spanning both
sequence-parallel ranks (segment 32 = the whole sequence), so attention really communicates.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import MICRO_MODEL
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel

from longnet.cli.main import main
from longnet.models import LongNetConfig, LongNetLM
from longnet.parallel import init_mesh, parallelize, run_workers
from longnet.parallel.launch import free_port
from longnet.parallel.parallelize import check_replicas
from longnet.parallel.runtime import check_pattern_split, check_sequence_parallel, local_micro_batch
from longnet.train import build_optimizer, read_metrics, train
from longnet.train.config import ParallelSection
from longnet.train.step import compute_gradients, train_step

SP_MODEL = MICRO_MODEL | {"segment_lengths": [8, 32], "dilation_rates": [1, 2]}
SRC = Path(__file__).resolve().parents[2] / "src"
V, B, N = 41, 4, 32


def _model() -> LongNetLM:
    torch.manual_seed(5)
    config = LongNetConfig(vocab_size=V, max_train_length=N, **{k: v for k, v in SP_MODEL.items()})
    return LongNetLM(config).double()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, V, (B, N + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]  # (B, N) inputs and next-token labels


def _step_worker(rank, world, sp):
    cpu = torch.device("cpu")
    inputs, labels = _batch()
    ref = _model()
    ref_params = list(ref.parameters())
    ref_loss = compute_gradients(ref, inputs, labels, micro=1, device=cpu, dtype=torch.float32)
    par = init_mesh(sp, cpu)
    assert (par.dp, par.sp) == (world // sp, sp) and not par.owns_group
    model = _model()
    if rank > 0:  # DDP starts every replica from the first rank's parameters
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * rank)
    params = list(model.parameters())
    rows = slice(par.dp_rank * B // par.dp, (par.dp_rank + 1) * B // par.dp)
    start, stop = par.columns(N)
    x, y = inputs[rows, start:stop], labels[rows, start:stop]  # this rank's rows and chunk
    trained = parallelize(model, par, ParallelSection())
    ddp = trained.forward
    assert isinstance(ddp, DistributedDataParallel) and ddp.module is model
    if par.sp > 1:  # ranks sharing a sequence are in different data-parallel groups
        check_replicas(params, par)
    # rows / micro micro-batches per rank: all but the last run under no_sync
    loss = compute_gradients(trained, x, y, micro=1, dtype=torch.float32)
    grad_err = max((p.grad - q.grad).abs().max().item() for p, q in zip(params, ref_params))
    # one full optimizer step on each side (AdamW, clipping): the updated parameters agree
    opt, ref_opt = build_optimizer(model, lr=1e-3), build_optimizer(ref, lr=1e-3)
    for p in params + ref_params:
        p.grad = None
    train_step(ref, ref_opt, inputs, labels, lr=1e-3, grad_clip=0.5, micro=2, device=cpu, dtype=torch.float32)
    train_step(trained, opt, x, y, lr=1e-3, grad_clip=0.5, micro=1, dtype=torch.float32)
    check_replicas(params, par)
    param_err = max((p - q).abs().max().item() for p, q in zip(params, ref_params))
    return abs(loss - ref_loss), grad_err, param_err


@pytest.mark.parametrize("world,sp", [(2, 1), (2, 2), (4, 2)])
def test_step_matches_one_process(world, sp):
    for loss_err, grad_err, param_err in run_workers(_step_worker, world, sp, timeout_s=120,
                                                     start_method="fork"):
        # the model is float64 but the LM reduces its cross-entropy in float32
        assert loss_err < 1e-6, loss_err
        assert grad_err < 1e-7, grad_err
        assert param_err < 1e-8, param_err


def test_in_sync_check_detects_drift():
    def worker(rank, world):
        par = init_mesh(1, torch.device("cpu"))
        p = torch.nn.Parameter(torch.ones(5))
        check_replicas([p], par)
        if rank == 1:
            with torch.no_grad():
                p[3] += 1e-7
        with pytest.raises(RuntimeError, match="diverged"):
            check_replicas([p], par)
        return True

    assert run_workers(_call, 2, worker, timeout_s=60, start_method="fork") == [True, True]


def _call(rank, world, fn):
    return fn(rank, world)


def _settings(corpus, cache, **kw):
    return dict(data=str(corpus), cache_dir=str(cache), vocab_size=300, seq_len=32, batch_tokens=128,
                micro_batch=1, eval_every=2, eval_tokens=256, save_every=100, progress=False,
                model_overrides=dict(SP_MODEL), decay_steps=4) | kw


def _trainer_worker(rank, world, corpus, cache, out):
    # 2 steps, then resume to 4: the trainer itself under a 2 (dp) x 2 (sp) mesh
    first = train(_settings(corpus, cache, max_steps=2, sequence_parallel=2), out, log=lambda m: None)
    resumed = train({"max_steps": 4, "progress": False, "sequence_parallel": 2}, out, resume=True,
                    log=lambda m: None)
    return first.step, resumed.step, [r for r in resumed.history if r["kind"] == "train"]


def test_trainer_dp_sp_with_resume_matches_one_process(tmp_path, corpus, cache):
    straight = train(_settings(corpus, cache, max_steps=4), tmp_path / "one", log=lambda m: None)
    per_rank = run_workers(_trainer_worker, 4, str(corpus), str(cache), str(tmp_path / "mesh"), timeout_s=120,
                           start_method="fork")
    ref = [r["loss"] for r in straight.history if r["kind"] == "train"]
    for first_step, last_step, history in per_rank:
        assert (first_step, last_step) == (2, 4)
        assert [r["step"] for r in history] == [3, 4]
        for r in history:  # every rank reports the global loss
            assert abs(r["loss"] - ref[r["step"] - 1]) < 1e-5
    logged = [r["loss"] for r in read_metrics(tmp_path / "mesh" / "metrics.jsonl") if r["kind"] == "train"]
    assert len(logged) == 4 and max(abs(a - b) for a, b in zip(logged, ref)) < 1e-5
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "mesh" / "model.safetensors"))
    # float32 gradients summed in another order, amplified by AdamW's normalization where a
    # gradient is near its epsilon: 4 steps of lr 2e-3 move weights by up to 8e-3, these by < 1e-4
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    run = json.loads((tmp_path / "mesh" / "run.json").read_text())
    assert run["parallel"] == {"world": 4, "data_parallel": 2, "sequence_parallel": 2}


@pytest.mark.parametrize("layout", [["--sequence-parallel", "2"], ["--fsdp", "--sequence-parallel", "2"]],
                         ids=["sp2", "fsdp-sp2"])
def test_torchrun_cli_matches_one_process(tmp_path, corpus, cache, micro, layout):
    overrides = ["--model-overrides", json.dumps(SP_MODEL)]
    assert main(micro(corpus, cache, tmp_path / "one", *overrides, steps=3)) == 0
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "-m", "longnet",
           *micro(corpus, cache, tmp_path / "sp", *overrides, *layout, steps=3)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("done: step 3") == 1  # rank 0 alone reports
    one = [r for r in read_metrics(tmp_path / "one" / "metrics.jsonl")]
    two = [r for r in read_metrics(tmp_path / "sp" / "metrics.jsonl")]
    assert [(r["kind"], r["step"]) for r in one] == [(r["kind"], r["step"]) for r in two]
    for r, s in zip(one, two):  # float32 sums in another order: equal to ~1e-6
        key = "loss" if r["kind"] == "train" else "val_loss"
        assert abs(r[key] - s[key]) < 1e-4, (r, s)
    model = LongNetLM.from_pretrained(tmp_path / "sp")
    ref = LongNetLM.from_pretrained(tmp_path / "one")
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):  # see the test above
        torch.testing.assert_close(p, q, rtol=0, atol=1e-4, msg=name)


def test_sequence_parallel_without_torchrun_is_a_one_line_error(tmp_path, corpus, cache, micro, monkeypatch,
                                                                capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(micro(corpus, cache, tmp_path / "run", "--sequence-parallel", "2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --sequence-parallel 2") and "torchrun" in err[0]
    assert not (tmp_path / "run").exists()


def test_parallel_settings_are_validated():
    check_sequence_parallel(1, None)
    check_sequence_parallel(2, 4)
    with pytest.raises(ValueError, match="does not divide the 4 processes"):
        check_sequence_parallel(3, 4)
    with pytest.raises(ValueError, match="positive integer"):
        check_sequence_parallel(0, 2)
    config = LongNetConfig(vocab_size=V, max_train_length=48, **SP_MODEL)
    check_pattern_split(config, 32, 2)
    with pytest.raises(ValueError, match="--seq-len 33 is not divisible by --sequence-parallel 2"):
        check_pattern_split(config, 33, 2)
    with pytest.raises(ValueError, match="segment length 8 .* chunk length 12"):
        check_pattern_split(config, 36, 3)  # chunks of 12 and segments of 8 do not nest
    dense = LongNetConfig(vocab_size=V, max_train_length=32, **(SP_MODEL | {"attention": "dense"}))
    with pytest.raises(ValueError, match="needs dilated attention"):
        check_pattern_split(dense, 32, 2)
    assert local_micro_batch(8, 2, 16, None, 64) == 4
    assert local_micro_batch(8, 2, 16, 2, 64) == 2
    with pytest.raises(ValueError, match="--micro-batch 3 does not divide"):
        local_micro_batch(8, 2, 16, 3, 64)
    with pytest.raises(ValueError, match="cannot be split over 3 data-parallel ranks"):
        local_micro_batch(8, 3, 16, None, 64)


def test_bad_parallel_settings_are_reported_by_rank_0_only(tmp_path, corpus, cache, micro, monkeypatch, capsys):
    # every rank raises the same error before any process group starts: rank 0 alone prints it
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, lines in (("0", 1), ("1", 0)):
        monkeypatch.setenv("RANK", rank)
        assert main(micro(corpus, cache, tmp_path / "run", "--sequence-parallel", "3")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == lines
        assert all(e.startswith("error: --sequence-parallel 3 does not divide the 2 processes") for e in err)
