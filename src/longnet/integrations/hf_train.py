"""Long-context fine-tuning of an existing Hugging Face causal LM in longnet's trainer.

``longnet train --hf-model DIR`` loads a local transformers model folder (``config.json``, the
weights, ``tokenizer.json``), switches it to dilated attention with a pattern (given, or derived
from the model's original context by :func:`default_pattern`) and trains it with the same loop as
a :class:`~longnet.LongNetLM`. :class:`HFCausalLM` is the adapter: it wraps the transformers model
behind the interface the trainer uses (``forward(input_ids, labels=) -> .loss``, ``config`` with
``to_dict()`` / ``grad_checkpointing``, ``num_parameters()``, ``save_pretrained``,
``from_pretrained``). Checkpoints are transformers folders: ``from_pretrained(RUN,
attn_implementation="dilated")`` loads the run (after ``longnet.hf.register()``).

Labels follow longnet's convention (``labels[t]`` is the target at position ``t``, already
shifted; ``-100`` is ignored), so the loss is the mean next-token cross-entropy, as for LongNetLM.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from longnet.models.lm import IGNORE_INDEX

__all__ = ["HFCausalLM", "HFModelConfig", "HFRunConfig", "config_dict", "decoder_layers", "default_pattern",
           "is_hf_checkpoint", "load_hf_tokenizer", "prepare_hf_config", "read_hf_config"]

# config fields that describe where and how a folder was written, not the model
_METADATA = frozenset({"transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype",
                       "_attn_implementation_autoset", "attn_implementation", "_commit_hash",
                       "use_cache", "output_attentions", "output_hidden_states", "return_dict"})


def default_pattern(original_context: int, seq_len: int) -> tuple[list[int], list[int]]:
    """LongNet's geometric pattern from a model's original context ``L`` up to ``seq_len``.

    Segments ``L, 2L, 4L, ...`` (the last is the first one ``>= seq_len``) with dilation rates
    ``1, 2, 4, ...``: branch 0 is the model's own dense attention over windows of its original
    context, and every branch reads ``L`` keys per query, so each query attends to about
    ``L * branches`` keys. ``seq_len <= L`` gives the single branch ``(L, 1)`` (dense).
    """
    for name, v in (("original_context", original_context), ("seq_len", seq_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    segments, rates = [original_context], [1]
    while segments[-1] < seq_len:
        segments.append(segments[-1] * 2)
        rates.append(rates[-1] * 2)
    return segments, rates


def read_hf_config(folder: str | Path) -> dict:
    """``folder/config.json`` of a transformers model folder, as a dict (no transformers import).

    Raises ``ValueError`` naming ``--hf-model`` when the folder or its config is missing or is not
    a transformers config.
    """
    path = Path(folder) / "config.json"
    if not Path(folder).is_dir():
        raise ValueError(f"--hf-model {folder}: no such folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ValueError(f"--hf-model {folder}: not a transformers model folder (no config.json)") from err
    except ValueError as err:
        raise ValueError(f"--hf-model {folder}: config.json is not valid JSON ({err})") from err
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError(f"--hf-model {folder}: config.json is not a transformers config (no model_type)")
    return config


def is_hf_checkpoint(folder: str | Path) -> bool:
    """True when ``folder/config.json`` is a transformers config: it names a ``model_type`` and is
    flat (a LongNet ``config.json`` also names its model type but nests the model config under
    ``"config"``)."""
    path = Path(folder) / "config.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and "model_type" in doc and not isinstance(doc.get("config"), dict)


def load_hf_tokenizer(folder: str | Path, config=None):
    """The model folder's ``tokenizer.json`` as a :class:`longnet.data.Tokenizer`.

    Documents are separated by the model's end-of-sequence token (``config.eos_token_id``, else
    ``tokenizer_config.json``'s ``eos_token``); padding is ``config.pad_token_id`` or that token.
    Raises ``ValueError`` when the folder has no ``tokenizer.json`` or no end-of-sequence token,
    or when the tokenizer has more ids than the model's vocabulary.
    """
    from tokenizers import Tokenizer as Backend

    from longnet.data.tokenizer import Tokenizer

    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"--hf-model {folder}: no tokenizer.json (a fast tokenizer file is needed; save "
                         "it with tokenizer.save_pretrained(folder) from transformers)")
    backend = Backend.from_file(str(path))

    def name(token_id):
        if isinstance(token_id, (list, tuple)):
            token_id = token_id[0] if token_id else None
        return None if token_id is None else backend.id_to_token(int(token_id))

    eos = name(getattr(config, "eos_token_id", None))
    extra = folder / "tokenizer_config.json"
    if eos is None and extra.is_file():
        value = json.loads(extra.read_text(encoding="utf-8")).get("eos_token")
        eos = value.get("content") if isinstance(value, dict) else value
    if eos is None or backend.token_to_id(eos) is None:
        raise ValueError(f"--hf-model {folder}: no end-of-sequence token (config.eos_token_id or "
                         "tokenizer_config.json eos_token), needed to separate documents")
    pad = name(getattr(config, "pad_token_id", None)) or eos
    tokenizer = Tokenizer(backend, eos_token=eos, pad_token=pad)
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and tokenizer.vocab_size > vocab:
        raise ValueError(f"--hf-model {folder}: the tokenizer has {tokenizer.vocab_size} ids but the model "
                         f"only {vocab} embeddings")
    return tokenizer


def _pattern(hf_config):
    """The dilated pattern of a transformers config (``ValueError`` naming missing fields)."""
    from longnet.integrations.hf_pattern import pattern_from_config

    return pattern_from_config(hf_config)


class HFRunConfig:
    """The model config of an ``--hf-model`` run (what ``build_config`` gives the trainer):
    the model folder and its transformers config switched to dilated attention.

    ``pattern()`` and ``shift_segments`` answer as a ``LongNetConfig`` does, so the checks of a
    sequence-parallel split read either config.
    """

    attention = "dilated"
    shift_segments = False  # transformers configs carry no shifted segments

    def __init__(self, folder: str | Path, hf_config, grad_checkpointing: bool = False):
        self.folder, self.hf, self.grad_checkpointing = Path(folder), hf_config, grad_checkpointing

    def to_dict(self) -> dict:
        return config_dict(self.hf, self.grad_checkpointing)

    def pattern(self):
        """The model's :class:`~longnet.ops.pattern.DilatedPattern` (from ``segment_lengths`` /
        ``dilation_rates`` of its config)."""
        return _pattern(self.hf)

    def describe(self) -> str:
        return describe(self.folder.name, self.hf)


def describe(name: str, hf_config) -> str:
    """One line naming the model, its type and its dilated pattern (the trainer's start line)."""
    return (f"{name} ({hf_config.model_type}, dilated: segments {hf_config.segment_lengths}, "
            f"dilations {hf_config.dilation_rates})")


@dataclass
class HFOutput:
    """What :meth:`HFCausalLM.forward` returns (as ``LongNetLM``'s output)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    num_tokens: torch.Tensor | None = None


class HFModelConfig:
    """The part of a transformers config the trainer reads: ``to_dict()``, ``attention``,
    ``grad_checkpointing`` (which switches the model's own gradient checkpointing), ``pattern()``
    and ``shift_segments`` (as a ``LongNetConfig``)."""

    attention = "dilated"
    shift_segments = False

    def __init__(self, owner: "HFCausalLM"):
        self._owner = owner

    @property
    def hf(self):
        return self._owner.model.config

    @property
    def vocab_size(self) -> int:
        """Embeddings of the model (as ``LongNetConfig.vocab_size``)."""
        return int(self.hf.vocab_size)

    @property
    def grad_checkpointing(self) -> bool:
        model = self._owner.model
        flag = "is_activation_checkpointing" if hasattr(model, "is_activation_checkpointing") else \
            "is_gradient_checkpointing"
        return bool(getattr(model, flag, False))

    @grad_checkpointing.setter
    def grad_checkpointing(self, on: bool) -> None:
        model = self._owner.model
        new = hasattr(model, "activation_checkpointing_enable")  # transformers >= 5.2x names
        if on:
            if new:
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif self.grad_checkpointing:
            (model.activation_checkpointing_disable if new else model.gradient_checkpointing_disable)()

    def to_dict(self) -> dict:
        """The model's config fields (JSON types), without where/how it was saved."""
        return config_dict(self.hf, self.grad_checkpointing)

    def pattern(self):
        """The model's :class:`~longnet.ops.pattern.DilatedPattern`."""
        return _pattern(self.hf)


def config_dict(hf_config, grad_checkpointing: bool = False) -> dict:
    """A transformers config as JSON types, without the fields saying where or how it was saved
    (so that a checkpoint's config equals the one the run builds from the model folder)."""
    data = hf_config.to_dict()
    out = {k: v for k, v in data.items() if k not in _METADATA and not k.startswith("_")}
    out["grad_checkpointing"] = bool(grad_checkpointing)
    return json.loads(json.dumps(out, default=str))


def prepare_hf_config(folder: str | Path, *, seq_len: int, segment_lengths=None, dilation_rates=None,
                      overrides: dict | None = None):
    """The config of ``folder`` switched to dilated attention, with ``overrides`` applied.

    Args:
        folder: a local transformers model folder.
        seq_len: the training length (for the default pattern).
        segment_lengths, dilation_rates: the pattern; both or neither (then
            :func:`default_pattern` of ``config.max_position_embeddings`` and ``seq_len``).
        overrides: config fields to set (e.g. ``{"rope_theta": 1e6}``).

    Sliding windows and chunked attention are switched off (dilated attention replaces them).
    """
    from transformers import AutoConfig

    from longnet.ops.pattern import DilatedPattern

    read_hf_config(folder)  # clear errors for a missing folder or config
    if (segment_lengths is None) != (dilation_rates is None):
        raise ValueError("give both --segment-lengths and --dilation-rates, or neither (then a pattern is "
                         "derived from the model's original context)")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"--hf-model {folder}: cannot read its config ({err})") from err
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"--hf-model {folder}: an encoder-decoder model; a causal LM is needed")
    for key, value in (overrides or {}).items():
        if not hasattr(config, key):
            raise ValueError(f"--model-overrides: {type(config).__name__} has no field {key!r}")
        setattr(config, key, value)
    if segment_lengths is None:
        original = getattr(config, "max_position_embeddings", None)
        if not original:
            raise ValueError(f"--hf-model {folder}: config has no max_position_embeddings to derive a "
                             "pattern from; give --segment-lengths and --dilation-rates")
        segment_lengths, dilation_rates = default_pattern(int(original), seq_len)
    try:
        pattern = DilatedPattern(list(segment_lengths), list(dilation_rates))
    except (TypeError, ValueError) as err:
        raise ValueError(f"--segment-lengths / --dilation-rates: {err}") from err
    config.segment_lengths = list(pattern.segment_lengths)
    config.dilation_rates = list(pattern.dilation_rates)
    for field in ("sliding_window", "attention_chunk_size"):
        if getattr(config, field, None) is not None:
            setattr(config, field, None)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = ["full_attention"] * len(config.layer_types)
    return config


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM (``model.model.layers`` for Llama, Mistral,
    Qwen2, ...), found through ``model.get_decoder()`` when the model has it.

    Raises ``ValueError`` when the decoder has no ``layers`` ModuleList.
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no decoder `layers` ModuleList found (looked at "
                         "model.get_decoder().layers and model.model.layers)")
    return layers


class HFCausalLM(nn.Module):
    """A transformers causal LM with dilated attention, behind the trainer's model interface.

    Args:
        model: a transformers ``PreTrainedModel`` for causal LM whose config carries
            ``segment_lengths`` / ``dilation_rates``; it is switched to dilated attention.

    Parallelism is applied from outside, as to LongNet models: :attr:`blocks` (the decoder layers)
    lets :func:`longnet.parallel.fsdp.fully_shard_model` shard it layer by layer, and
    :func:`longnet.parallel.parallelize_sequence` makes every attention call the exact
    distributed operator and sets :attr:`sequence_rank`, so that the rotary positions of a chunk
    of ``n`` tokens are ``sequence_rank * n + arange(n)``.
    """

    def __init__(self, model):
        super().__init__()
        import longnet.hf

        name = longnet.hf.register()
        longnet.hf.pattern_from_config(model.config)  # clear error when the pattern is missing
        model.config.use_cache = False
        model.set_attn_implementation(name)
        self.model = model
        self._config = HFModelConfig(self)
        # set from outside by longnet.parallel.parallelize_sequence: this model's chunk of each
        # sequence (positions start at sequence_rank * length of the input)
        self.sequence_rank = 0

    @property
    def config(self) -> HFModelConfig:
        return self._config

    @property
    def blocks(self) -> nn.ModuleList:
        """The decoder layers (:func:`decoder_layers`), the units FSDP shards one by one."""
        return decoder_layers(self.model)

    # ---------------------------------------------------------------------------------- loading
    @classmethod
    def from_folder(cls, folder: str | Path, *, seq_len: int, segment_lengths=None, dilation_rates=None,
                    overrides: dict | None = None) -> "HFCausalLM":
        """Load a transformers model folder (float32) for fine-tuning at ``seq_len`` with dilated
        attention; arguments as :func:`prepare_hf_config`."""
        config = prepare_hf_config(folder, seq_len=seq_len, segment_lengths=segment_lengths,
                                   dilation_rates=dilation_rates, overrides=overrides)
        return cls.from_run_config(HFRunConfig(folder, config))

    @classmethod
    def from_run_config(cls, run: HFRunConfig) -> "HFCausalLM":
        """The weights of ``run.folder`` under the run's config."""
        from transformers import AutoModelForCausalLM

        folder, config = run.folder, run.hf
        try:
            with _quiet_progress():  # the trainer's own progress bar and log lines are running
                model = AutoModelForCausalLM.from_pretrained(folder, config=config, local_files_only=True,
                                                             dtype=torch.float32)
        except (OSError, ValueError) as err:
            raise ValueError(f"--hf-model {folder}: cannot load the model ({err})") from err
        out = cls(model)
        out.config.grad_checkpointing = run.grad_checkpointing
        return out

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, verify: bool = True) -> "HFCausalLM":
        """Reload a checkpoint :meth:`save_pretrained` wrote (its config holds the pattern).

        ``verify``: check ``model.safetensors`` and ``config.json`` against the folder's
        ``manifest.json`` when it has one, and refuse non-finite weights
        (:func:`longnet.models.checkpoint.verify_weights`, the rule of every longnet loader; it
        costs one more read and hash of the files and one pass over the weights).
        """
        from transformers import AutoModelForCausalLM

        from longnet.models.checkpoint import WEIGHTS_NAME, CheckpointError, verify_weights

        try:
            with _quiet_progress():
                model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{folder}: cannot load the transformers checkpoint ({err})") from err
        if verify:
            verify_weights(model.state_dict(), Path(folder) / WEIGHTS_NAME)
        return cls(model)

    def save_pretrained(self, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write ``model.safetensors`` + ``config.json`` (+ ``generation_config.json``); quietly,
        since the trainer saves while its own progress bar runs.

        ``state_dict``: this module's weights to write instead of its own (keys as
        ``self.state_dict()``, e.g. the full weights gathered from FSDP2 shards)."""
        inner = None if state_dict is None else {k.removeprefix("model."): v for k, v in state_dict.items()}
        with _quiet_progress():
            self.model.save_pretrained(folder, safe_serialization=True, state_dict=inner)

    # ------------------------------------------------------------------------------- generating
    def make_cache(self, batch_size: int = 1):
        """A bounded :class:`~longnet.integrations.hf_cache.DilatedCache` for :meth:`generate`
        (``batch_size`` is accepted for symmetry with ``LongNetLM.make_cache``; the cache grows
        to the batch it is given)."""
        from longnet.integrations.hf_cache import DilatedCache

        return DilatedCache(self.model.config)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | None = None, cache=None, streamer=None,
                 prefill_chunk_size: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue ``input_ids`` (B, T) with transformers' ``generate`` over a bounded dilated
        cache; the arguments of :meth:`longnet.LongNetLM.generate`. ``streamer`` receives each new
        token (B,) through ``put`` (the prompt is not passed to it) and ``end()``. Returns
        ``(B, T + new)`` ids.

        ``prefill_chunk_size`` is not supported (transformers prefills the prompt at once: a
        ``ValueError``); ``generator`` seeds sampling through torch's global generator."""
        if prefill_chunk_size is not None:
            raise ValueError("--prefill-chunk-size applies to LongNet models; a Hugging Face model prefills "
                             "its prompt in one pass: drop it")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if max_new_tokens == 0:
            return input_ids
        if generator is not None:
            torch.manual_seed(int(generator.initial_seed()))
        cache = self.make_cache(input_ids.shape[0]) if cache is None else cache
        sampling = {"temperature": temperature, "top_k": top_k or 0, "top_p": top_p or 1.0} if do_sample else {}
        was_training = self.model.training
        self.model.eval()
        try:
            return self.model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                do_sample=do_sample, eos_token_id=eos_token_id, pad_token_id=eos_token_id, use_cache=True,
                cache=cache, streamer=None if streamer is None else _SkipPrompt(streamer), **sampling)
        finally:
            self.model.train(was_training)

    # ---------------------------------------------------------------------------------- running
    def describe(self) -> str:
        """One line: the model folder's name, its type and its dilated pattern."""
        name = Path(getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__).name
        return describe(name, self.model.config)

    def num_parameters(self) -> int:
        """Parameters, tied ones counted once."""
        return sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> HFOutput:
        """Logits ``(B, N, V)``; with ``labels`` (B, N, already shifted, -100 ignored) the mean
        cross-entropy over the labelled tokens (float32, or float64 for a float64 model; 0 when
        none is labelled) and their count.

        Under sequence parallelism ``input_ids`` is this rank's chunk of ``N`` tokens, at positions
        ``sequence_rank * N + arange(N)`` of the sequences.
        """
        extra = {}
        if self.sequence_rank:
            n = input_ids.shape[1]
            start = int(self.sequence_rank) * n
            extra["position_ids"] = torch.arange(start, start + n, device=input_ids.device).unsqueeze(0)
        logits = self.model(input_ids=input_ids, use_cache=False, **extra).logits
        if labels is None:
            return HFOutput(logits=logits)
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(labels.shape)}")
        count = (labels != IGNORE_INDEX).sum()
        logits32 = logits.to(torch.promote_types(logits.dtype, torch.float32))
        per_token = F.cross_entropy(logits32.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                    reduction="none")
        loss = per_token.sum() / count.clamp(min=1)
        return HFOutput(logits=logits, loss=loss, num_tokens=count)


class _SkipPrompt:
    """A streamer that forwards new tokens only (transformers first passes the prompt)."""

    def __init__(self, inner) -> None:
        self.inner, self.seen_prompt = inner, False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.inner.put(value)

    def end(self) -> None:
        if hasattr(self.inner, "end"):
            self.inner.end()


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """transformers' progress bars (loading, writing weights) off inside the block."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    if was_on:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
