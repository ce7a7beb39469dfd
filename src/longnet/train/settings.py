"""Training settings: one dataclass, the paper's recipe as defaults, and resume rules.

A run's *identity* settings (model, data, batch, schedule, seed) are fixed when it starts and
written to ``RUN/run.json``; ``--resume`` takes them from there, and an identity option given
again must equal the stored value. The other settings (how long, how often, where, how fast) may
change between invocations.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longnet.paper import PAPER_BATCH_TOKENS, PAPER_BETAS, PAPER_LR, PAPER_WARMUP_STEPS, PAPER_WEIGHT_DECAY

MICRO_BATCH_TOKENS = 16_384
"""Default micro-batch: the most sequences whose tokens stay within this (at least one)."""

PRESET_DEFAULTS: dict[str, dict[str, Any]] = {
    # CPU-sized: a small token batch and a higher peak rate so a few hundred steps learn something
    "tiny": {"lr": 2e-3, "batch_tokens": 4096},
    "small": {"lr": 1e-3, "batch_tokens": 65_536},
}
"""Per-preset defaults that differ from the paper's recipe (lr 6e-4, 0.5M-token batches)."""

IDENTITY = (
    "preset", "model_overrides", "data", "vocab_size", "seq_len", "batch_tokens", "seed", "lr",
    "min_lr_ratio", "warmup_steps", "decay", "decay_steps", "weight_decay", "beta1", "beta2",
    "grad_clip", "hf_model", "segment_lengths", "dilation_rates",
)
HF_IDENTITY = ("hf_model", "segment_lengths", "dilation_rates")
"""Identity settings added with ``--hf-model``: runs stored before them had them unset (None)."""
LAYOUT_FREE = ("device", "progress", "sequence_parallel", "fsdp", "fsdp_shard")
"""Free settings a resumed run does not inherit: they describe this launch, not the run."""
HF_LR = 2e-5
"""Default peak rate when fine-tuning a Hugging Face model (``--hf-model``)."""


def default_cache_dir() -> str:
    """``$LONGNET_CACHE`` or ``~/.cache/longnet`` (token files and tokenizers)."""
    return os.environ.get("LONGNET_CACHE") or str(Path.home() / ".cache" / "longnet")


@dataclass
class TrainSettings:
    """Everything ``longnet train`` needs; ``None`` fields are filled by :meth:`resolve`."""

    # identity: fixed for the life of a run
    preset: str = "tiny"
    """Model preset (``LongNetConfig.from_preset``)."""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """LongNetConfig fields overriding the preset (e.g. ``{"attention": "dense"}``)."""
    data: str = "stdlib"
    """Corpus spec: ``stdlib``, files, folders, globs or JSONL (``longnet.data.load_corpus``)."""
    vocab_size: int | None = None
    """Tokenizer size to train; None = the preset's."""
    seq_len: int | None = None
    """Training sequence length; None = the preset's ``max_train_length``."""
    batch_tokens: int | None = None
    """Tokens per optimizer step (``batch_tokens // seq_len`` sequences)."""
    seed: int = 0
    lr: float | None = None
    """Peak learning rate; None = 6e-4 (the paper) or the preset's (tiny: 2e-3)."""
    min_lr_ratio: float = 0.1
    """The rate decays to ``min_lr_ratio * lr``."""
    warmup_steps: int | None = None
    """None = 750 (the paper), at most 10% of ``decay_steps``."""
    decay: str = "cosine"
    """``cosine``, ``linear`` or ``constant`` after warmup."""
    decay_steps: int | None = None
    """Step at which the decay ends; None = ``max_steps`` of the first invocation."""
    weight_decay: float = PAPER_WEIGHT_DECAY
    beta1: float = PAPER_BETAS[0]
    beta2: float = PAPER_BETAS[1]
    grad_clip: float = 2.0
    hf_model: str | None = None
    """A local transformers model folder to fine-tune with dilated attention instead of a preset."""
    segment_lengths: list[int] | None = None
    """Dilated pattern of ``hf_model``; None = derived from its original context."""
    dilation_rates: list[int] | None = None
    # free: may change when resuming
    max_steps: int = 1000
    micro_batch: int | None = None
    """Sequences per forward/backward; None = as many as fit in 16,384 tokens."""
    eval_every: int = 100
    eval_tokens: int = 65_536
    """Validation tokens per evaluation during training."""
    save_every: int = 500
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    grad_checkpointing: bool = False
    cache_dir: str = field(default_factory=default_cache_dir)
    progress: bool | None = None
    """tqdm progress bar: None = only when stderr is a terminal."""
    sequence_parallel: int = 1
    """Ranks sharing one sequence under torchrun (``longnet.train.distributed``); not inherited on resume."""
    fsdp: bool = False
    """Under torchrun: shard parameters, gradients and AdamW states with FSDP2 instead of DDP replicas
    (``longnet.parallel.fsdp``); not inherited on resume (a run may resume in another layout)."""
    fsdp_shard: str = "mesh"
    """With ``fsdp``: shard over every rank (``mesh``) or over the data axis only, replicated over the
    sequence axis (``data``); not inherited on resume."""
    dist_timeout: float = 120.0
    """Under torchrun: seconds a collective waits for its peers before the rank exits non-zero."""

    @property
    def batch_size(self) -> int:
        """Sequences per optimizer step."""
        return self.batch_tokens // self.seq_len

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def resolve(cls, given: dict[str, Any], stored: dict[str, Any] | None = None) -> "TrainSettings":
        """Settings from explicitly ``given`` values (None values count as not given).

        ``stored``: the settings of the run being resumed (``run.json``); its identity values are
        kept and a different given one raises ``ValueError``; free values given now win.
        """
        given = {k: v for k, v in given.items() if v is not None}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(given) - names)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}")
        values: dict[str, Any] = {}
        if stored is not None:
            for name in IDENTITY:
                if name not in stored and name in HF_IDENTITY:
                    stored = {**stored, name: None}
                if name not in stored:
                    raise ValueError(f"run.json lacks the setting {name!r}: not a run of this longnet version")
                if name in given and _normal(given[name]) != _normal(stored[name]):
                    flag = "--" + name.replace("_", "-")
                    raise ValueError(
                        f"{flag} {given[name]!r} differs from the resumed run's {stored[name]!r}; "
                        f"drop {flag} to keep the run's value, or start a new run with another --out"
                    )
                values[name] = stored[name]
            for name in names - set(IDENTITY):
                if name in stored and name not in given and name not in LAYOUT_FREE:
                    values[name] = stored[name]
        values.update({k: v for k, v in given.items() if stored is None or k not in IDENTITY})
        settings = cls(**values)
        settings._fill_defaults()
        settings.validate()
        return settings

    def _fill_defaults(self) -> None:
        from longnet.models import PRESETS  # deferred: keeps ``longnet --help`` fast

        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of: {', '.join(sorted(PRESETS))}")
        preset = PRESETS[self.preset]
        extra = PRESET_DEFAULTS.get(self.preset, {})
        if self.hf_model is not None:  # the model folder's config, not a preset, gives the sizes
            from longnet.integrations.hf_train import read_hf_config

            config = read_hf_config(self.hf_model)
            preset = {"vocab_size": config.get("vocab_size"),
                      "max_train_length": config.get("max_position_embeddings") or 2048}
            extra = {"lr": HF_LR}
        if self.hf_model is not None and self.vocab_size not in (None, preset["vocab_size"]):
            raise ValueError(f"--vocab-size {self.vocab_size} does not apply to --hf-model, which keeps its "
                             f"tokenizer and {preset['vocab_size']} embeddings; drop --vocab-size")
        if self.vocab_size is None:
            self.vocab_size = int(self.model_overrides.get("vocab_size") or preset.get("vocab_size") or 8192)
        if self.seq_len is None:
            self.seq_len = int(preset.get("max_train_length", 2048))
        if self.batch_tokens is None:
            self.batch_tokens = max(self.seq_len, int(extra.get("batch_tokens", PAPER_BATCH_TOKENS)))
        if self.lr is None:
            self.lr = float(extra.get("lr", PAPER_LR))
        if self.decay_steps is None:
            self.decay_steps = self.max_steps
        if self.warmup_steps is None:
            self.warmup_steps = min(PAPER_WARMUP_STEPS, max(1, self.decay_steps // 10))

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad option."""
        def positive(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")

        for name in ("vocab_size", "seq_len", "batch_tokens", "max_steps", "decay_steps", "eval_every",
                     "save_every", "eval_tokens"):
            positive(name)
        if self.micro_batch is not None:
            positive("micro_batch")
        positive("sequence_parallel")
        if not isinstance(self.fsdp, bool):
            raise ValueError(f"--fsdp must be true or false, got {self.fsdp!r}")
        if self.fsdp_shard not in ("mesh", "data"):
            raise ValueError(f"--fsdp-shard must be mesh or data, got {self.fsdp_shard!r}")
        if isinstance(self.dist_timeout, bool) or not isinstance(self.dist_timeout, (int, float)) \
                or not 0 < self.dist_timeout < float("inf"):
            raise ValueError(f"--dist-timeout must be a positive number of seconds, got {self.dist_timeout!r}")
        if self.batch_tokens < self.seq_len:
            raise ValueError(f"--batch-tokens {self.batch_tokens} is smaller than --seq-len {self.seq_len}: "
                             "a step needs at least one sequence")
        micro = self.micro_batch_size
        if self.batch_size % micro:
            raise ValueError(f"--micro-batch {micro} does not divide the {self.batch_size} sequences of a "
                             f"step (--batch-tokens {self.batch_tokens} / --seq-len {self.seq_len})")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if self.decay not in ("cosine", "linear", "constant"):
            raise ValueError(f"--decay must be cosine, linear or constant, got {self.decay!r}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"--dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if not isinstance(self.model_overrides, dict):
            raise ValueError(f"--model-overrides must be a JSON object, got {self.model_overrides!r}")
        if (self.segment_lengths is None) != (self.dilation_rates is None):
            raise ValueError("give both --segment-lengths and --dilation-rates, or neither")
        if self.hf_model is not None and "attention" in self.model_overrides:
            raise ValueError("--attention does not apply to --hf-model: its attention becomes dilated (choose the "
                             "pattern with --segment-lengths / --dilation-rates)")
        if self.segment_lengths is not None and self.hf_model is None:
            raise ValueError("--segment-lengths / --dilation-rates choose the pattern of --hf-model; for a "
                             "LongNet preset use --model-overrides '{\"segment_lengths\": [...], ...}'")

    @property
    def micro_batch_size(self) -> int:
        """Sequences per forward/backward (a divisor of :attr:`batch_size`)."""
        if self.micro_batch is not None:
            return self.micro_batch
        fit = max(1, MICRO_BATCH_TOKENS // self.seq_len)
        return max(d for d in range(1, min(fit, self.batch_size) + 1) if self.batch_size % d == 0)


def _normal(value: Any) -> Any:
    """Compare JSON round-tripped values (tuples become lists)."""
    return json.loads(json.dumps(value))
