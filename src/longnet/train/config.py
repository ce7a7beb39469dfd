"""The training configuration: one tree of typed sections, declared once.

Every setting of ``longnet train`` is declared here, once, with :func:`~longnet.utils.config_tree.setting`:
its type, default, whether it fixes the run's *identity* (``[run]`` in ``--help``), and its help
(the docstring below it). The command line, ``--config FILE.toml``, the type checks, the help
and the resume rule are generated from these declarations
(:mod:`longnet.utils.config_tree`).

A run's identity settings (model, data, batch, optimizer, schedule, seed) are fixed when it
starts; the resolved tree is written to ``RUN/run.json`` (and, for reading and reuse with
``--config``, ``RUN/train.toml``). ``--resume`` reads it back: identity settings keep their stored
values and a different given one is refused, naming the setting, the stored and the given value.
Settings left at ``None`` are *derived* when the run starts (from the preset or the Hugging Face
model, :mod:`longnet.train.families`) and stored resolved.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longnet.paper import PAPER_BATCH_TOKENS, PAPER_BETAS, PAPER_LR, PAPER_WARMUP_STEPS, PAPER_WEIGHT_DECAY
from longnet.train.defaults import HF_LR, PRESET_DEFAULTS
from longnet.utils import config_tree
from longnet.utils.config_tree import setting

__all__ = ["TrainConfig", "ModelSection", "DataSection", "OptimSection", "ScheduleSection", "ParallelSection",
           "CheckpointSection", "EvalSection", "RunSection", "MICRO_BATCH_TOKENS", "default_cache_dir",
           "resolve_config", "stored_settings", "RUN_FORMAT"]

MICRO_BATCH_TOKENS = 16_384
"""Default micro-batch: the most sequences whose tokens stay within this (at least one)."""
RUN_FORMAT = 2
"""``run.json`` format: 1 = flat ``settings``; 2 = the ``config`` tree."""
def _per_preset(name: str) -> str:
    return ", ".join(f"{preset} {values[name]:g}" for preset, values in PRESET_DEFAULTS.items())


def default_cache_dir() -> str:
    """``$LONGNET_CACHE`` or ``~/.cache/longnet`` (token files and tokenizers)."""
    return os.environ.get("LONGNET_CACHE") or str(Path.home() / ".cache" / "longnet")


@dataclass
class ModelSection:
    """what to train"""

    preset: str = setting("tiny", identity=True, metavar="NAME")
    """LongNet model preset: tiny (CPU minutes), small, base (125M), 350m, 760m, 2.7b."""
    attention: str | None = setting(None, identity=True, choices=("dilated", "dense", "sparse"),
                                    default_text="the preset's, dilated")
    """Attention of a LongNet preset: dilated (LongNet), dense (the Transformer baseline) or sparse."""
    model_overrides: dict[str, Any] = setting(factory=dict, identity=True)
    """Model config fields overriding the preset (or, with --hf-model, the transformers config), e.g.
    '{"num_layers": 2}'."""
    hf_model: str | None = setting(None, identity=True, metavar="DIR")
    """Fine-tune this local transformers causal LM folder (config.json, weights, tokenizer.json) with
    dilated attention instead of a LongNet preset; it keeps its tokenizer, and the run folder is a
    transformers folder."""
    segment_lengths: list[int] | None = setting(None, identity=True, minimum=1, metavar="W,...",
                                                default_text="the model's original context L, 2L, 4L, ... "
                                                             "up to --seq-len")
    """With --hf-model: the dilated pattern's segment lengths, e.g. 2048,4096,8192."""
    dilation_rates: list[int] | None = setting(None, identity=True, minimum=1, metavar="R,...",
                                               default_text="1, 2, 4, ...")
    """With --hf-model: the dilation rate of each segment length, e.g. 1,2,4."""


@dataclass
class DataSection:
    """the corpus and its windows"""

    data: str = setting("stdlib", identity=True, metavar="SPEC")
    """Corpus: 'stdlib' (the Python standard library), files, folders, globs or .jsonl, comma-separated."""
    vocab_size: int | None = setting(None, identity=True, minimum=1, metavar="N",
                                     default_text="the preset's")
    """BPE vocabulary to train (a Hugging Face model keeps its own tokenizer)."""
    seq_len: int | None = setting(None, identity=True, minimum=1, metavar="N",
                                  default_text="the preset's max_train_length, or the model's context")
    """Training sequence length."""
    cache_dir: str = setting(factory=default_cache_dir, metavar="DIR",
                             default_text="$LONGNET_CACHE or ~/.cache/longnet")
    """Token-file and tokenizer cache."""


@dataclass
class OptimSection:
    """AdamW and the batch"""

    batch_tokens: int | None = setting(
        None, identity=True, minimum=1, metavar="N",
        default_text=f"the paper's {PAPER_BATCH_TOKENS:,}; {_per_preset('batch_tokens')}")
    """Tokens per optimizer step (batch_tokens / seq_len sequences)."""
    micro_batch: int | None = setting(None, minimum=1, metavar="SEQS",
                                      default_text=f"as many as fit in {MICRO_BATCH_TOKENS} tokens")
    """Sequences per forward/backward, dividing the step's (per data-parallel rank under torchrun)."""
    lr: float | None = setting(None, identity=True, minimum=0.0, metavar="LR",
                               default_text=f"the paper's {PAPER_LR:g}; {_per_preset('lr')}; {HF_LR:g} with "
                                            "--hf-model")
    """Peak learning rate."""
    weight_decay: float = setting(PAPER_WEIGHT_DECAY, identity=True, minimum=0.0, metavar="WD")
    """AdamW weight decay, on weight matrices only (not biases, norms or embeddings)."""
    beta1: float = setting(PAPER_BETAS[0], identity=True, minimum=0.0, metavar="B")
    """AdamW beta1."""
    beta2: float = setting(PAPER_BETAS[1], identity=True, minimum=0.0, metavar="B")
    """AdamW beta2."""
    grad_clip: float = setting(2.0, identity=True, minimum=0.0, metavar="NORM")
    """Gradient-norm clipping."""


@dataclass
class ScheduleSection:
    """learning-rate schedule and length"""

    max_steps: int = setting(1000, minimum=1, metavar="N")
    """Stop after this many optimizer steps."""
    warmup_steps: int | None = setting(None, identity=True, minimum=0, metavar="N",
                                       default_text=f"{PAPER_WARMUP_STEPS} as the paper, at most 10% of --decay-steps")
    """Linear warmup steps."""
    decay: str = setting("cosine", identity=True, choices=("cosine", "linear", "constant"))
    """Decay after warmup."""
    decay_steps: int | None = setting(None, identity=True, minimum=1, metavar="N",
                                      default_text="--max-steps of the first invocation")
    """Step where the decay reaches --min-lr-ratio of the peak; set it to the final length when
    training in several pieces."""
    min_lr_ratio: float = setting(0.1, identity=True, minimum=0.0, metavar="R")
    """Final rate / peak rate."""


@dataclass
class ParallelSection:
    """how the model runs: longnet.parallel.parallelize applies these, in this order"""

    sequence_parallel: int = setting(1, inherit=False, minimum=1, metavar="P")
    """Under torchrun: P processes share each sequence (each holds seq-len / P tokens), the others
    split the batch (data parallel = processes / P); e.g. torchrun --nproc-per-node 4 -m longnet
    train --sequence-parallel 2 ..."""
    grad_checkpointing: bool = setting(False)
    """Recompute each block in backward to save memory."""
    compile: bool = setting(False)
    """torch.compile the model."""
    fsdp: bool = setting(False, inherit=False)
    """Under torchrun: shard parameters, gradients and AdamW states over the processes with FSDP2
    instead of DDP replicas (bf16 compute on GPU); checkpoints are sharded and resume in any layout."""
    fsdp_shard: str = setting("mesh", inherit=False, choices=("mesh", "data"))
    """With --fsdp: shard over every process (mesh) or over the data-parallel axis only, replicated
    over the sequence-parallel one (data: HSDP)."""
    dist_timeout: float = setting(120.0, minimum=1e-9, metavar="S")
    """Under torchrun: seconds a collective waits for its peers; a rank whose peer died exits
    non-zero within it."""


@dataclass
class CheckpointSection:
    """checkpoints"""

    save_every: int = setting(500, minimum=1, metavar="N")
    """Checkpoint every N steps and at the end."""


@dataclass
class EvalSection:
    """validation during training"""

    eval_every: int = setting(100, minimum=1, metavar="N")
    """Validate every N steps and at the end."""
    eval_tokens: int = setting(65_536, minimum=1, metavar="N")
    """Validation tokens per evaluation: the first N of the validation split in windows of --seq-len;
    longnet eval --seq-len SEQ_LEN --max-tokens N scores the same ones."""


@dataclass
class RunSection:
    """where and how this process runs"""

    seed: int = setting(0, identity=True, minimum=0, metavar="N")
    """Seed of initialization and data order."""
    device: str = setting("auto", inherit=False, metavar="DEVICE")
    """auto (CUDA if available), cpu, cuda, cuda:1 ..."""
    dtype: str = setting("auto", choices=("auto", "float32", "bfloat16"))
    """Compute precision: auto = bfloat16 autocast on GPU, float32 on CPU."""
    progress: bool | None = setting(None, inherit=False, default_text="when stderr is a terminal")
    """Show progress bars."""


@dataclass
class TrainConfig:
    """Everything ``longnet train`` needs, in sections; see :func:`resolve_config`."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    run: RunSection = field(default_factory=RunSection)

    @property
    def seq_len(self) -> int:
        assert self.data.seq_len is not None, "resolve the config first"
        return self.data.seq_len

    @property
    def batch_size(self) -> int:
        """Sequences per optimizer step."""
        assert self.optim.batch_tokens is not None, "resolve the config first"
        return self.optim.batch_tokens // self.seq_len

    def flat(self) -> dict[str, Any]:
        """``{setting: value}`` over every section."""
        return config_tree.flat(self)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """``{section: {setting: value}}``."""
        return config_tree.nested(self)

    def to_toml(self) -> str:
        return config_tree.to_toml(self, header="longnet train settings; reuse with: longnet train --config FILE")


def resolve_config(given: dict[str, Any] | TrainConfig, stored: dict[str, Any] | None = None) -> TrainConfig:
    """The run's configuration from the settings ``given`` (a flat dict; ``None`` = not given) and,
    when resuming, the ``stored`` ``run.json``; derived settings filled, everything checked.

    Raises ``ValueError`` naming the first bad or changed setting.
    """
    from longnet.train.families import family_for  # the families import models: not at --help

    if isinstance(given, TrainConfig):
        given = given.flat()
    given = {k: v for k, v in given.items() if v is not None}
    known = {leaf.name for leaf in config_tree.leaves(TrainConfig)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"unknown training settings {unknown}")
    values = given if stored is None else config_tree.merge_stored(
        TrainConfig, given, stored_settings(stored), "run.json")
    config = config_tree.from_flat(TrainConfig, values)
    config_tree.check_types(config)
    family_for(config).resolve(config)
    _check(config)
    return config


def _check(config: TrainConfig) -> None:
    """Rules between settings; ``ValueError`` naming the options."""
    m, o, d = config.model, config.optim, config.data
    assert d.seq_len is not None and o.batch_tokens is not None
    if o.batch_tokens < d.seq_len:
        raise ValueError(f"--batch-tokens {o.batch_tokens} is smaller than --seq-len {d.seq_len}: "
                         "a step needs at least one sequence")
    if o.micro_batch is not None and config.batch_size % o.micro_batch:
        raise ValueError(f"--micro-batch {o.micro_batch} does not divide the {config.batch_size} sequences of a "
                         f"step (--batch-tokens {o.batch_tokens} / --seq-len {d.seq_len})")
    if not (o.lr or 0) > 0:
        raise ValueError(f"--lr must be positive, got {o.lr}")
    if (m.segment_lengths is None) != (m.dilation_rates is None):
        raise ValueError("give both --segment-lengths and --dilation-rates, or neither")
    overridden = m.model_overrides.get("attention")
    if m.attention is not None and overridden is not None and overridden != m.attention:
        raise ValueError(f"--attention {m.attention} and --model-overrides attention={overridden!r} disagree; "
                         "give one of them")


# ------------------------------------------------------------------------------ stored runs
_ADDED_LATER = {"hf_model": None, "segment_lengths": None, "dilation_rates": None, "attention": None}
"""Identity settings that runs stored before them lack; they take these values."""


def stored_settings(run_doc: dict[str, Any]) -> dict[str, Any]:
    """The flat settings of a ``run.json`` of any format (1: flat ``settings``; 2: ``config``)."""
    if "config" in run_doc:
        values = {name: value for section in run_doc["config"].values() for name, value in section.items()}
    else:  # format 1: --attention was stored inside model_overrides
        values = dict(run_doc.get("settings", {}))
        overrides = dict(values.get("model_overrides") or {})
        if "attention" in overrides and values.get("hf_model") is None:
            values["attention"] = overrides.pop("attention")
            values["model_overrides"] = overrides
    return {**_ADDED_LATER, **values}
