"""The training loop of ``longnet train``: data, model, AdamW, schedule, checkpoints, metrics.

One optimizer step = ``batch_size = batch_tokens // seq_len`` sequences drawn by
``TrainBatches.get(step)`` (a pure function of seed and step), run as micro-batches whose
gradients accumulate (each micro-batch loss is divided by their number, so the step minimizes
the mean loss of the whole batch). Then the gradient norm is clipped, the learning rate of the
step is set from the schedule, and AdamW steps (:mod:`longnet.train.step`). On CPU the run is
deterministic: a run resumed from a checkpoint ends with the same weights, bit for bit, as one
that never stopped. Under torchrun the same loop runs on a data x sequence parallel mesh
(:mod:`longnet.train.distributed`) and matches one process up to float32 summation order.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from longnet.data import EvalBatches, PreparedData, TrainBatches, prepare_data
from longnet.models import CheckpointError, LongNetConfig, LongNetLM
from longnet.train.checkpoint import (
    latest_checkpoint,
    load_trainer_checkpoint,
    publish_top_level,
    restore_rng_states,
    save_trainer_checkpoint,
)
from longnet.train.distributed import (
    Parallel,
    check_in_sync,
    check_pattern_split,
    check_sequence_parallel,
    local_device,
    local_micro_batch,
    parallel_mean_loss,
    setup_parallel,
    torchrun_world_size,
)
from longnet.train.evaluate import mean_loss
from longnet.train.metrics import MetricsLog, plot_losses
from longnet.train.optim import build_optimizer
from longnet.train.rundir import open_run_dir, write_run_file
from longnet.train.runtime import resolve_device, resolve_dtype
from longnet.train.schedule import learning_rate
from longnet.train.settings import MICRO_BATCH_TOKENS, TrainSettings
from longnet.train.step import train_step

RUNTIME_FIELDS = ("grad_checkpointing", "backend")
"""Config fields that may differ between a checkpoint and the resumed run (they change no math)."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped training after a checkpoint was saved."""

    def __init__(self, signum: int, step: int, run_dir: Path) -> None:
        self.signum, self.step, self.run_dir = signum, step, run_dir
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name} at step {step}: checkpoint saved in {run_dir}; "
                         f"continue with: longnet train --out {run_dir} --resume")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    run_dir: Path
    step: int
    tokens: int
    train_loss: float
    val_loss: float | None
    checkpoint: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)


class _StopFlag:
    """Records SIGINT/SIGTERM during training; a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def build_config(settings: TrainSettings, vocab_size: int) -> LongNetConfig:
    """The model configuration of a run: preset + overrides, the tokenizer's vocabulary size,
    ``max_train_length = seq_len`` and the runtime flags (``--hf-model``: that model's config
    switched to dilated attention, :class:`~longnet.integrations.hf_train.HFRunConfig`)."""
    if settings.hf_model is not None:
        from longnet.integrations.hf_train import HFRunConfig

        return HFRunConfig.from_settings(settings)
    overrides = dict(settings.model_overrides)
    overrides.update(vocab_size=vocab_size, max_train_length=settings.seq_len,
                     grad_checkpointing=settings.grad_checkpointing)
    return LongNetConfig.from_preset(settings.preset, **overrides)


def _check_same_config(saved: LongNetConfig, expected: LongNetConfig, where: Path) -> None:
    a, b = saved.to_dict(), expected.to_dict()
    diff = [k for k in a if k not in RUNTIME_FIELDS and a[k] != b.get(k)]
    if diff:
        k = diff[0]
        raise CheckpointError(f"{where}: checkpoint is of another model config ({k}={a[k]!r}, this run "
                              f"needs {b.get(k)!r}); use the run's own settings or a new --out")


def _prepare(settings: TrainSettings) -> PreparedData:
    tokenizer = None
    if settings.hf_model is not None:  # the model's own tokenizer
        from longnet.integrations.hf_train import load_hf_tokenizer, prepare_hf_config

        tokenizer = load_hf_tokenizer(settings.hf_model, prepare_hf_config(settings.hf_model, seq_len=settings.seq_len))
    prepared = prepare_data(settings.data, settings.cache_dir, settings.vocab_size, tokenizer=tokenizer,
                            progress=settings.progress)
    if prepared.num_tokens["train"] < settings.seq_len + 1:
        raise ValueError(
            f"the training split of --data {settings.data!r} has {prepared.num_tokens['train']:,} tokens, fewer "
            f"than --seq-len {settings.seq_len} + 1; use a shorter --seq-len or more data")
    return prepared


def train(settings_given: dict[str, Any], out: str | Path, resume: bool = False,
          log=print) -> TrainResult:
    """Train (or resume) the run in ``out``; see ``longnet train --help`` for the settings.

    Under torchrun (``WORLD_SIZE`` set) every process calls this: the processes form a data x
    sequence parallel mesh (``sequence_parallel`` ranks per sequence, see
    :mod:`longnet.train.distributed`) and rank 0 alone logs, writes metrics and checkpoints.

    Args:
        settings_given: :class:`TrainSettings` fields given explicitly (None = not given).
        out: the run folder.
        resume: continue the run in ``out`` from its latest checkpoint.
        log: where one-line notes go (``print`` by default; rank 0 only under torchrun).

    Raises:
        ValueError (and :class:`CheckpointError`): bad settings, data, folder or checkpoint.
        TrainingInterrupted: SIGINT/SIGTERM; a checkpoint was saved first.
        TrainingDiverged: the loss became NaN/inf (the last checkpoint is kept).
    """
    sp = settings_given.get("sequence_parallel") or 1
    check_sequence_parallel(sp, torchrun_world_size())  # before any process group: one clear error
    device_name = settings_given.get("device") or "auto"
    parallel = setup_parallel(sp, resolve_device(device_name)) if torchrun_world_size() is not None else None
    result = _train(settings_given, out, resume, log, parallel)
    if parallel is not None:  # on errors the process exits and torchrun ends the others
        parallel.close()
    return result


def _train(settings_given: dict[str, Any], out: str | Path, resume: bool, log, parallel: Parallel | None
           ) -> TrainResult:
    main = parallel is None or parallel.is_main
    if not main:
        log = _quiet
    run_dir, stored = open_run_dir(out, resume)
    settings = TrainSettings.resolve(settings_given, stored["settings"] if stored else None)
    device = resolve_device(settings.device)
    if parallel is not None:
        device = local_device(device)
        parallel.barrier()  # every rank has read the run folder before rank 0 writes to it
    dtype = resolve_dtype(settings.dtype, device)
    sp, dp = (parallel.sp, parallel.dp) if parallel is not None else (1, 1)
    if settings.hf_model is not None and parallel is not None:
        raise ValueError("--hf-model trains on one process (not under torchrun) in this version")
    if settings.hf_model is None:  # the pattern does not depend on the vocabulary: check it before any data work
        check_pattern_split(build_config(settings, settings.vocab_size), settings.seq_len, sp, compile=settings.compile)
    if parallel is None:
        micro = settings.micro_batch_size
    else:
        micro = local_micro_batch(settings.batch_size, dp, settings.seq_len // sp, settings.micro_batch,
                                  MICRO_BATCH_TOKENS)
    if main:
        prepared = _prepare(settings)  # rank 0 first: it may train the tokenizer and fill the cache
    if parallel is not None:
        parallel.barrier()
        if not main:
            prepared = _prepare(dataclasses.replace(settings, progress=False))  # reads rank 0's cache
    tokenizer = prepared.tokenizer
    config = build_config(settings, tokenizer.vocab_size)

    ckpt_dir = latest_checkpoint(run_dir) if stored else None
    torch.manual_seed(settings.seed)
    model_class = LongNetLM
    if settings.hf_model is not None:
        from longnet.integrations.hf_train import HFCausalLM as model_class
    if ckpt_dir is not None:
        model = model_class.from_pretrained(ckpt_dir)
        _check_same_config(model.config, config, ckpt_dir)
        model.config.grad_checkpointing = settings.grad_checkpointing
        trainer_ckpt = load_trainer_checkpoint(ckpt_dir, device)
        if trainer_ckpt.state.get("tokenizer_sha256") != tokenizer.sha256():
            raise CheckpointError(f"{ckpt_dir}: checkpoint was trained with another tokenizer than the one "
                                  f"--data {settings.data!r} gives now; the data or its cache changed")
    else:
        model = LongNetLM(config) if settings.hf_model is None else model_class.from_run_config(config)
        trainer_ckpt = None
    model.to(device)
    model.train()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 runs (--dtype float32) use TF32 matmuls
        torch.backends.cudnn.allow_tf32 = True
    optimizer = build_optimizer(model, lr=settings.lr, betas=(settings.beta1, settings.beta2),
                                weight_decay=settings.weight_decay, fused=device.type == "cuda")
    start_step, tokens_seen, elapsed = 0, 0, 0.0
    if trainer_ckpt is not None:
        try:
            optimizer.load_state_dict(trainer_ckpt.optimizer)
        except (ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"{ckpt_dir}: optimizer state does not fit the model ({err})") from err
        restore_rng_states(trainer_ckpt.rng)
        start_step = trainer_ckpt.step
        tokens_seen = int(trainer_ckpt.state.get("tokens", 0))
        elapsed = float(trainer_ckpt.state.get("elapsed_s", 0.0))
        if main:
            publish_top_level(run_dir, ckpt_dir)

    batches = TrainBatches(prepared.tokens("train"), settings.seq_len, settings.batch_size, settings.seed)
    if trainer_ckpt is not None and "data" in trainer_ckpt.state:
        try:  # same windows as before the interruption: same sizes and the same token stream
            batches.load_state_dict(trainer_ckpt.state["data"])
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{ckpt_dir}: cannot continue on this data ({err}); "
                                  "resume with the data the run started with, or start a new --out") from err
    if main:
        write_run_file(run_dir, settings.to_dict(), model_config=config.to_dict(),
                       num_parameters=model.num_parameters(), data={
                           "cache_entry": str(prepared.directory), "num_tokens": prepared.num_tokens,
                           "tokenizer_sha256": tokenizer.sha256()},
                       **({"parallel": {"world": parallel.world, "data_parallel": dp, "sequence_parallel": sp}}
                          if parallel is not None else {}))
    val_tokens = prepared.tokens("validation")
    val_batches = None
    if len(val_tokens) >= settings.seq_len + 1:
        val_batches = EvalBatches(val_tokens, settings.seq_len,
                                  max_sequences=max(1, settings.eval_tokens // settings.seq_len))
    else:
        log(f"note: the validation split has {len(val_tokens):,} tokens, fewer than --seq-len "
            f"{settings.seq_len} + 1: no validation loss")
    trained = parallel.data_parallel(model) if parallel is not None else model  # DDP over the data axis
    forward = torch.compile(trained) if settings.compile else trained

    cols = parallel.columns(settings.seq_len) if parallel is not None else (0, settings.seq_len)
    step_tokens = settings.batch_size * settings.seq_len
    n_micro = settings.batch_size // dp // micro
    what = (config.describe() if settings.hf_model is not None
            else f"{settings.preset} LongNet ({model.config.attention})")
    log(f"run {run_dir}: {what}, "
        f"{model.num_parameters():,} parameters, vocab {tokenizer.vocab_size}, on {device} ({str(dtype)[6:]})")
    if parallel is not None:
        log(f"torchrun: {parallel.world} processes = {dp} data parallel x {sp} sequence parallel; each rank "
            f"runs {settings.batch_size // dp} sequence(s) x {settings.seq_len // sp} tokens per step")
    log(f"data {settings.data!r}: " + ", ".join(f"{k} {v:,}" for k, v in prepared.num_tokens.items())
        + f" tokens; step = {settings.batch_size} x {settings.seq_len} tokens ({n_micro} micro-batch(es) of "
        f"{micro}{' per rank' if parallel is not None else ''}); lr {settings.lr:g}, warmup "
        f"{settings.warmup_steps}, {settings.decay} decay to step {settings.decay_steps}")
    if start_step:
        log(f"resuming from {ckpt_dir} at step {start_step}")
    if start_step >= settings.max_steps:
        log(f"nothing to do: the run is at step {start_step} >= --max-steps {settings.max_steps}")

    metrics = MetricsLog(run_dir, resume_step=start_step if stored else None) if main else None
    history: list[dict[str, Any]] = []
    params = [p for g in optimizer.param_groups for p in g["params"]]
    schedule = dict(peak_lr=settings.lr, warmup_steps=settings.warmup_steps,
                    decay_steps=settings.decay_steps, decay=settings.decay,
                    min_lr_ratio=settings.min_lr_ratio)
    step, last_loss, val_loss, saved_step = start_step, math.nan, None, start_step
    if trainer_ckpt is not None:  # figures of the checkpoint, until new steps replace them
        last_loss = float(trainer_ckpt.state.get("train_loss") or math.nan)
        val_loss = trainer_ckpt.state.get("val_loss")
    last_path: Path | None = ckpt_dir

    def save() -> Path | None:
        nonlocal saved_step, last_path
        if parallel is not None:
            check_in_sync(params, parallel)  # every replica took the same steps
        saved_step = step
        if main:
            state = {"tokens": tokens_seen, "elapsed_s": elapsed, "data": batches.state_dict() | {"step": step},
                     "tokenizer_sha256": tokenizer.sha256(), "schedule": schedule, "train_loss": last_loss,
                     "val_loss": val_loss}
            last_path = save_trainer_checkpoint(
                run_dir, step=step, write_model=model.save_pretrained, write_tokenizer=tokenizer.save,
                optimizer_state=optimizer.state_dict(), trainer_state=state)
        if parallel is not None:
            parallel.barrier()  # the checkpoint is complete before any rank moves on (or exits)
            if not main:
                last_path = latest_checkpoint(run_dir)
        return last_path

    def stopping(stop: _StopFlag) -> bool:
        if parallel is None:
            return stop.signum is not None
        return parallel.any(stop.signum is not None, device)  # every rank stops at the same step

    bar = tqdm(total=settings.max_steps, initial=start_step, unit="step", desc="train", dynamic_ncols=True,
               disable=(not main) or (None if settings.progress is None else not settings.progress),
               file=sys.stderr)
    try:
        with _StopFlag() as stop:
            while step < settings.max_steps and not stopping(stop):
                t0 = time.perf_counter()
                lr = learning_rate(step, **schedule)
                if parallel is None:
                    input_ids, labels = batches.get(step)  # (batch_size, seq_len) each
                else:  # this rank's rows and sequence chunk: (batch_size / dp, seq_len / sp)
                    input_ids, labels = batches.get(step, *cols, rank=parallel.dp_rank, world=dp)
                last_loss, grad_norm = train_step(forward, params, optimizer, input_ids, labels,
                                                  lr=lr, grad_clip=settings.grad_clip, micro=micro,
                                                  device=device, dtype=dtype, parallel=parallel)
                step += 1
                tokens_seen += step_tokens
                dt = time.perf_counter() - t0
                elapsed += dt
                if not math.isfinite(last_loss):
                    raise TrainingDiverged(
                        f"the training loss is {last_loss} at step {step}; lower --lr (now {settings.lr:g}) "
                        f"and resume from the last checkpoint ({last_path or 'none yet'}) with a new --out")
                record = {"kind": "train", "step": step, "loss": last_loss, "lr": lr,
                          "grad_norm": grad_norm, "tokens": tokens_seen,
                          "tokens_per_s": step_tokens / dt, "time": elapsed}
                if metrics is not None:
                    metrics.log(record)
                history.append(record)
                bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{step_tokens / dt:,.0f}",
                                refresh=False)
                bar.update(1)
                if val_batches is not None and (step % settings.eval_every == 0 or step == settings.max_steps):
                    if parallel is None:
                        val_loss, _ = mean_loss(model, val_batches, device, dtype)
                    else:
                        val_loss, _ = parallel_mean_loss(model, val_batches, device, dtype, parallel)
                    record = {"kind": "eval", "step": step, "val_loss": val_loss,
                              "val_perplexity": math.exp(min(val_loss, 700.0)), "tokens": tokens_seen}
                    history.append(record)
                    if main:
                        metrics.log(record)
                        tqdm.write(f"step {step}: train loss {last_loss:.4f}, validation loss {val_loss:.4f} "
                                   f"(perplexity {record['val_perplexity']:.2f})", file=sys.stderr)
                        plot_losses(run_dir)
                if step % settings.save_every == 0 or step == settings.max_steps:
                    save()
            if stop.signum is not None or (parallel is not None and step < settings.max_steps):
                bar.close()
                if step > saved_step or last_path is None:
                    save()
                if main:
                    plot_losses(run_dir)
                raise TrainingInterrupted(stop.signum or signal.SIGTERM, step, run_dir)
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    if step > saved_step or last_path is None:
        save()
    elif parallel is not None:
        check_in_sync(params, parallel)
    png = plot_losses(run_dir) if main else None
    if main and png is None:
        log("note: matplotlib is not installed, so no loss plot; pip install matplotlib")
    log(f"done: step {step}, {tokens_seen:,} tokens, train loss {last_loss:.4f}"
        + (f", validation loss {val_loss:.4f}" if val_loss is not None else "")
        + f"; checkpoint {last_path}" + (f"; plot {png}" if png else ""))
    return TrainResult(run_dir=run_dir, step=step, tokens=tokens_seen, train_loss=last_loss, val_loss=val_loss,
                       checkpoint=last_path, history=history)


def _quiet(message: str) -> None:
    """The log of ranks other than 0 under torchrun."""
