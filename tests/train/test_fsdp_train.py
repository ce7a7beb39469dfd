"""FSDP2 training (``longnet train --fsdp``) on gloo: parity across layouts, resharded resume, faults.

Layouts compared with one process, as torchtitan tests them: DDP 2, SP 2, FSDP 2, FSDP 2 x SP 2 give
the same losses step by step and the same final weights, up to float32 summation order. Sharded
checkpoints (``torch.distributed.checkpoint``) saved on 4 ranks resume on 2 ranks and on one
process like an uninterrupted run. ``kill -9`` of a rank ends the other rank non-zero within the
configured collective timeout; SIGTERM to the whole job saves and exits 0.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MICRO_MODEL
from safetensors.torch import load_file

from longnet.models import LongNetLM
from longnet.parallel import run_workers
from longnet.parallel.launch import free_port
from longnet.train import read_metrics, train
from longnet.train.checkpoint import latest_checkpoint, verify_checkpoint

SP_MODEL = MICRO_MODEL | {"segment_lengths": [8, 32], "dilation_rates": [1, 2]}
SRC = Path(__file__).resolve().parents[2] / "src"
LOSS_TOL, WEIGHT_TOL = 1e-5, 1e-4  # float32 sums in another order (see test_distributed_train.py)


def _settings(corpus, cache, **kw):
    return dict(data=str(corpus), cache_dir=str(cache), vocab_size=300, seq_len=32, batch_tokens=128,
                micro_batch=1, eval_every=100, eval_tokens=256, save_every=2, progress=False,
                model_overrides=dict(SP_MODEL), decay_steps=6) | kw


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"}


def _max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def _train_worker(rank, world, settings, out, resume):
    result = train(settings, out, resume=resume, log=lambda m: None)
    return result.step


def _layout(settings: dict, out: Path, world: int, resume: bool = False) -> None:
    steps = run_workers(_train_worker, world, settings, str(out), resume, timeout_s=240, start_method="fork")
    assert len(set(steps)) == 1


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, corpus, cache) -> Path:
    """The reference: 4 steps on one process (checkpoints at 2 and 4)."""
    out = tmp_path_factory.mktemp("fsdp") / "one"
    train(_settings(corpus, cache, max_steps=4), out, log=lambda m: None)
    return out


@pytest.mark.parametrize("world,sp,fsdp,ac,shard", [
    (2, 1, False, False, "mesh"), (2, 2, False, False, "mesh"), (2, 1, True, False, "mesh"),
    (4, 2, True, False, "mesh"), (4, 2, True, True, "mesh"), (4, 2, True, False, "data")],
    ids=["ddp2", "sp2", "fsdp2", "fsdp2xsp2", "fsdp2xsp2-checkpointing", "fsdp2xsp2-data-axis"])
def test_layouts_give_the_losses_and_weights_of_one_process(tmp_path, corpus, cache, one_process, world, sp, fsdp,
                                                            ac, shard):
    out = tmp_path / "run"
    # ac: per-block activation checkpointing (each block recomputed in backward, inside FSDP's gathers);
    # shard "data": sharded over the data axis only, replicated over the sequence axis (HSDP)
    _layout(_settings(corpus, cache, max_steps=4, sequence_parallel=sp, fsdp=fsdp, grad_checkpointing=ac,
                      fsdp_shard=shard), out, world)
    ref, got = _losses(one_process), _losses(out)
    assert sorted(got) == [1, 2, 3, 4]
    loss_diff = max(abs(got[s] - ref[s]) for s in ref)
    weight_diff = _max_weight_diff(out, one_process)
    print(f"parity world={world} sp={sp} fsdp={fsdp and shard} checkpointing={ac}: loss max diff {loss_diff:.2e}, "
          f"weight max diff {weight_diff:.2e}")
    assert loss_diff < LOSS_TOL and weight_diff < WEIGHT_TOL
    run = json.loads((out / "run.json").read_text())
    assert run["parallel"]["sequence_parallel"] == sp and run["parallel"].get("fsdp") == (shard if fsdp else None)
    if fsdp:  # sharded checkpoint: one shard file per rank, full weights for from_pretrained
        shards = sorted(p.name for p in (latest_checkpoint(out) / "dcp").iterdir())
        assert shards == [".metadata"] + [f"__{r}_0.distcp" for r in range(world)]
        assert not (latest_checkpoint(out) / "optimizer.safetensors").exists()
        LongNetLM.from_pretrained(out)


def test_fsdp_checkpoint_resumes_on_2_ranks_and_on_1_process(tmp_path, corpus, cache, one_process):
    saved = tmp_path / "saved"  # FSDP 2 x SP 2 on 4 ranks, 2 steps; then FSDP 2, DDP 2 and one process
    _layout(_settings(corpus, cache, max_steps=2, sequence_parallel=2, fsdp=True), saved, 4)
    assert (latest_checkpoint(saved) / "dcp").is_dir()
    ref = _losses(one_process)
    for name, world, layout in (("on2", 2, {"fsdp": True}), ("ddp2", 2, {}), ("on1", 1, {})):
        run = tmp_path / name
        shutil.copytree(saved, run)
        if world == 1:
            result = train({"max_steps": 4, "progress": False}, run, resume=True, log=lambda m: None)
            assert result.step == 4
        else:
            _layout({"max_steps": 4, "progress": False, **layout}, run, world, resume=True)
        got = _losses(run)
        assert sorted(got) == [1, 2, 3, 4]
        assert max(abs(got[s] - ref[s]) for s in ref) < LOSS_TOL
        diff = _max_weight_diff(run, one_process)
        print(f"reshard 4 -> {name}: weight max diff {diff:.2e}")
        assert diff < WEIGHT_TOL
        LongNetLM.from_pretrained(run)  # the run folder loads on one process
    # a torn shard in the latest checkpoint: the previous one (step 2) is used, steps 3-4 again
    torn = tmp_path / "torn"
    shutil.copytree(tmp_path / "on2", torn)
    shard = latest_checkpoint(torn) / "dcp" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-7])
    notes = []
    assert train({"max_steps": 4, "progress": False}, torn, resume=True, log=notes.append).step == 4
    assert any("__0_0.distcp: torn or changed on disk" in n and "previous good checkpoint" in n for n in notes)
    assert _max_weight_diff(torn, one_process) < WEIGHT_TOL


def test_a_one_process_checkpoint_resumes_with_fsdp(tmp_path, corpus, cache, one_process):
    run = tmp_path / "run"  # steps 1-2 on one process (full optimizer file), 3-4 sharded over 2 ranks
    train(_settings(corpus, cache, max_steps=2), run, log=lambda m: None)
    assert (latest_checkpoint(run) / "optimizer.safetensors").is_file()
    _layout({"max_steps": 4, "progress": False, "fsdp": True}, run, 2, resume=True)
    got, ref = _losses(run), _losses(one_process)
    assert max(abs(got[s] - ref[s]) for s in ref) < LOSS_TOL
    assert _max_weight_diff(run, one_process) < WEIGHT_TOL
    assert (latest_checkpoint(run) / "dcp").is_dir()


def _dying_save_worker(rank, world, settings, out):
    from longnet.train import trainer as trainer_mod

    real = trainer_mod.save_trainer_checkpoint

    def dying(run_dir, *, step, **kw):  # rank 0 dies after every rank wrote its shards of step 4
        if step == 4:
            raise OSError("killed while completing the checkpoint (simulated)")
        return real(run_dir, step=step, **kw)

    trainer_mod.save_trainer_checkpoint = dying
    train(settings, out, log=lambda m: None)


def test_an_interrupted_sharded_save_keeps_the_previous_checkpoint(tmp_path, corpus, cache, one_process):
    from longnet.parallel import WorkerError

    run = tmp_path / "run"
    with pytest.raises(WorkerError, match="simulated"):
        run_workers(_dying_save_worker, 2, _settings(corpus, cache, max_steps=4, fsdp=True), str(run),
                    timeout_s=240, start_method="fork")
    assert json.loads((run / "latest.json").read_text())["step"] == 2  # the pointer never moved
    assert (run / "checkpoints" / ".tmp-step-00000004" / "dcp").is_dir()  # the shards of the torn save
    verify_checkpoint(latest_checkpoint(run))
    assert train({"max_steps": 4, "progress": False}, run, resume=True, log=lambda m: None).step == 4
    assert _max_weight_diff(run, one_process) < WEIGHT_TOL
    assert not (run / "checkpoints" / ".tmp-step-00000004").exists()  # cleaned by the next save


# ------------------------------------------------------------------------------------ faults
def _launch(world: int, args: list[str]) -> list[subprocess.Popen]:
    """``world`` ranks of ``python -m longnet`` with torchrun's environment, without torchrun (so that
    nothing but our own code stops a rank)."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(PYTHONPATH=str(SRC), OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
        procs.append(subprocess.Popen([sys.executable, "-m", "longnet", *args], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def _cli_args(corpus, cache, out, *extra):
    return ["train", "--data", str(corpus), "--cache-dir", str(cache), "--out", str(out), "--vocab-size", "300",
            "--seq-len", "32", "--batch-tokens", "128", "--micro-batch", "1", "--max-steps", "100000",
            "--decay-steps", "40", "--eval-every", "100000", "--save-every", "2", "--no-progress",
            "--model-overrides", json.dumps(SP_MODEL), "--fsdp", *extra]


def _wait_for_step(run: Path, step: int, procs, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        try:
            if json.loads((run / "latest.json").read_text())["step"] >= step:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"no checkpoint of step {step} within {timeout} s")


def test_kill_9_of_a_rank_ends_the_others_then_resume_is_exact(tmp_path, corpus, cache):
    run, timeout = tmp_path / "run", 30
    procs = _launch(2, _cli_args(corpus, cache, run, "--dist-timeout", str(timeout)))
    try:
        _wait_for_step(run, 4, procs)
        procs[1].kill()  # SIGKILL, mid-step: the loop is stepping continuously
        killed = time.monotonic()
        procs[0].wait(timeout=timeout + 30)
        elapsed = time.monotonic() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    err = procs[0].communicate()[1]
    print(f"kill -9 of rank 1: rank 0 exited with {procs[0].returncode} after {elapsed:.1f} s")
    assert procs[0].returncode not in (0, None) and elapsed < timeout + 15, err[-3000:]
    assert f"gloo, collective timeout {timeout} s" in err  # printed at start
    ckpt = latest_checkpoint(run)
    verify_checkpoint(ckpt)  # the last complete checkpoint is intact
    step = json.loads((run / "latest.json").read_text())["step"]
    # resume it on one process for 2 more steps; an uninterrupted run of as many steps agrees
    resumed = train({"max_steps": step + 2, "progress": False}, run, resume=True, log=lambda m: None)
    straight = train(_settings(corpus, cache, max_steps=step + 2, decay_steps=40, save_every=100000),
                     tmp_path / "straight", log=lambda m: None)
    assert resumed.step == straight.step == step + 2
    assert abs(resumed.train_loss - straight.train_loss) < LOSS_TOL
    assert _max_weight_diff(run, tmp_path / "straight") < WEIGHT_TOL


def test_a_hung_rank_ends_the_others_within_the_timeout(tmp_path, corpus, cache):
    # SIGSTOP: the peer is alive but silent, so only the collective timeout can end rank 0
    run, timeout = tmp_path / "run", 8
    procs = _launch(2, _cli_args(corpus, cache, run, "--dist-timeout", str(timeout)))
    try:
        _wait_for_step(run, 2, procs)
        procs[1].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        procs[0].wait(timeout=timeout + 60)
        elapsed = time.monotonic() - stopped
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    err = procs[0].communicate()[1]
    print(f"SIGSTOP of rank 1: rank 0 exited with {procs[0].returncode} after {elapsed:.1f} s (timeout {timeout} s)")
    assert procs[0].returncode not in (0, None) and elapsed < timeout + 20, err[-3000:]
    verify_checkpoint(latest_checkpoint(run))


def test_fsdp_without_torchrun_is_a_one_line_error(tmp_path, corpus, cache, micro, monkeypatch, capsys):
    from longnet.cli.main import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(micro(corpus, cache, tmp_path / "run", "--fsdp")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --fsdp") and "torchrun" in err[0]
    assert not (tmp_path / "run").exists()


def test_sigterm_to_the_job_saves_and_exits_0(tmp_path, corpus, cache):
    run = tmp_path / "run"
    procs = _launch(2, _cli_args(corpus, cache, run, "--save-every", "100000"))
    try:
        deadline = time.monotonic() + 180
        while not (run / "metrics.jsonl").is_file() or (run / "metrics.jsonl").read_text().count('"train"') < 3:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.1)
        for p in procs:  # the whole job, as a scheduler stops it
            p.send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert "stopped: interrupted by SIGTERM" in outs[0][1]
    step = json.loads((run / "latest.json").read_text())["step"]
    assert step >= 3
    verify_checkpoint(latest_checkpoint(run))
    LongNetLM.from_pretrained(run)
