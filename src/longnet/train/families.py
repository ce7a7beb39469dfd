"""The model families the trainer knows, behind one small adapter: LongNet LMs and Hugging Face
causal LMs.

A :class:`ModelFamily` says how to derive a run's defaults, tokenize, build, load, save and
describe its models. The trainer asks :func:`family_for` once and then calls the adapter; it never
asks which family it holds. Both families' models share the training interface
``model(input_ids, labels=) -> .loss, .num_tokens``, ``model.config.to_dict()`` and
``model.config.grad_checkpointing``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from longnet.paper import PAPER_BATCH_TOKENS, PAPER_LR, PAPER_WARMUP_STEPS
from longnet.train.defaults import HF_LR, PRESET_DEFAULTS

__all__ = ["ModelFamily", "LongNetFamily", "HFFamily", "family_for", "family_of_folder"]

class ModelFamily:
    """How the trainer handles one kind of model. Subclasses implement every method."""

    name = ""

    def defaults(self, config: Any) -> dict[str, Any]:
        """The values of ``vocab_size``, ``seq_len``, ``lr`` and ``batch_tokens`` when not given;
        ``ValueError`` for settings this family cannot use."""
        raise NotImplementedError

    def tokenizer(self, config: Any) -> Any:
        """The model's own tokenizer, or None to train a BPE tokenizer on the data."""
        raise NotImplementedError

    def model_config(self, config: Any, vocab_size: int) -> Any:
        """The model configuration of the run (``to_dict()``, ``pattern()``, ``attention``)."""
        raise NotImplementedError

    def create(self, model_config: Any) -> nn.Module:
        """A new model of ``model_config`` (random or pretrained weights, on CPU)."""
        raise NotImplementedError

    def load(self, folder: Path) -> nn.Module:
        """The model a checkpoint folder holds (verified)."""
        raise NotImplementedError

    def save(self, model: nn.Module, folder: Path, state: dict[str, torch.Tensor] | None = None) -> None:
        """Write ``model`` (its weights, or the full ``state`` gathered from shards) into ``folder``."""
        raise NotImplementedError

    def describe(self, model: nn.Module, config: Any) -> str:
        """A few words naming the model, for the run's first line."""
        raise NotImplementedError

    def for_length(self, model: nn.Module, seq_len: int) -> nn.Module:
        """The model to evaluate ``seq_len``-token windows with (the model itself by default)."""
        return model

    def resolve(self, config: Any) -> None:
        """Fill the derived settings of ``config`` (in place) from :meth:`defaults` and the schedule rule."""
        d, o, s = config.data, config.optim, config.schedule
        defaults = self.defaults(config)
        if d.vocab_size is None:
            d.vocab_size = defaults["vocab_size"]
        if d.seq_len is None:
            d.seq_len = defaults["seq_len"]
        if o.batch_tokens is None:
            o.batch_tokens = max(d.seq_len, defaults["batch_tokens"])
        if o.lr is None:
            o.lr = defaults["lr"]
        if s.decay_steps is None:
            s.decay_steps = s.max_steps
        if s.warmup_steps is None:
            s.warmup_steps = min(PAPER_WARMUP_STEPS, max(1, s.decay_steps // 10))


class LongNetFamily(ModelFamily):
    """LongNet language models from a preset (:class:`longnet.LongNetLM`)."""

    name = "longnet"

    def defaults(self, config: Any) -> dict[str, Any]:
        from longnet.models import PRESETS

        m = config.model
        if m.preset not in PRESETS:
            raise ValueError(f"unknown preset {m.preset!r}; choose one of: {', '.join(sorted(PRESETS))}")
        if m.segment_lengths is not None:
            raise ValueError("--segment-lengths / --dilation-rates choose the pattern of --hf-model; for a "
                             "LongNet preset use --model-overrides '{\"segment_lengths\": [...], ...}'")
        preset, extra = PRESETS[m.preset], PRESET_DEFAULTS.get(m.preset, {})
        return {"vocab_size": int(m.model_overrides.get("vocab_size") or preset.get("vocab_size") or 8192),
                "seq_len": int(preset.get("max_train_length", 2048)),
                "batch_tokens": int(extra.get("batch_tokens", PAPER_BATCH_TOKENS)),
                "lr": float(extra.get("lr", PAPER_LR))}

    def tokenizer(self, config: Any) -> Any:
        return None

    def model_config(self, config: Any, vocab_size: int) -> Any:
        from longnet.models import LongNetConfig

        m = config.model
        overrides = dict(m.model_overrides)
        if m.attention is not None:
            overrides["attention"] = m.attention
        overrides.update(vocab_size=vocab_size, max_train_length=config.seq_len,
                         grad_checkpointing=config.parallel.grad_checkpointing)
        return LongNetConfig.from_preset(m.preset, **overrides)

    def create(self, model_config: Any) -> nn.Module:
        from longnet.models import LongNetLM

        return LongNetLM(model_config)

    def load(self, folder: Path) -> nn.Module:
        from longnet.models import LongNetLM

        return LongNetLM.from_pretrained(folder)

    def save(self, model: nn.Module, folder: Path, state: dict[str, torch.Tensor] | None = None) -> None:
        model.save_pretrained(folder, state_dict=state)

    def describe(self, model: nn.Module, config: Any) -> str:
        return f"{config.model.preset} LongNet ({model.config.attention})"

    def for_length(self, model: nn.Module, seq_len: int) -> nn.Module:
        """Dense attention beyond its training length becomes blockwise (the paper's evaluation)."""
        from longnet.train.evaluate import model_for_length

        return model_for_length(model, seq_len)


class HFFamily(ModelFamily):
    """A local transformers causal LM switched to dilated attention
    (:class:`longnet.integrations.hf_train.HFCausalLM`)."""

    name = "hf"

    def defaults(self, config: Any) -> dict[str, Any]:
        from longnet.integrations.hf_train import read_hf_config

        m, d = config.model, config.data
        hf = read_hf_config(m.hf_model)
        if d.vocab_size not in (None, hf.get("vocab_size")):
            raise ValueError(f"--vocab-size {d.vocab_size} does not apply to --hf-model, which keeps its "
                             f"tokenizer and {hf.get('vocab_size')} embeddings; drop --vocab-size")
        if m.attention is not None or "attention" in m.model_overrides:
            raise ValueError("--attention does not apply to --hf-model: its attention becomes dilated (choose the "
                             "pattern with --segment-lengths / --dilation-rates)")
        return {"vocab_size": hf.get("vocab_size"), "seq_len": int(hf.get("max_position_embeddings") or 2048),
                "batch_tokens": PAPER_BATCH_TOKENS, "lr": HF_LR}

    def _hf_config(self, config: Any) -> Any:
        from longnet.integrations.hf_train import prepare_hf_config

        m = config.model
        return prepare_hf_config(m.hf_model, seq_len=config.seq_len, segment_lengths=m.segment_lengths,
                                 dilation_rates=m.dilation_rates, overrides=m.model_overrides)

    def tokenizer(self, config: Any) -> Any:
        from longnet.integrations.hf_train import load_hf_tokenizer

        return load_hf_tokenizer(config.model.hf_model, self._hf_config(config))

    def model_config(self, config: Any, vocab_size: int) -> Any:
        from longnet.integrations.hf_train import HFRunConfig

        return HFRunConfig(config.model.hf_model, self._hf_config(config), config.parallel.grad_checkpointing)

    def create(self, model_config: Any) -> nn.Module:
        from longnet.integrations.hf_train import HFCausalLM

        return HFCausalLM.from_run_config(model_config)

    def load(self, folder: Path) -> nn.Module:
        from longnet.integrations.hf_train import HFCausalLM

        return HFCausalLM.from_pretrained(folder)

    def save(self, model: nn.Module, folder: Path, state: dict[str, torch.Tensor] | None = None) -> None:
        model.save_pretrained(folder, state_dict=state)

    def describe(self, model: nn.Module, config: Any) -> str:
        return model.describe()


def family_for(config: Any) -> ModelFamily:
    """The family of a training config: Hugging Face with ``--hf-model``, else LongNet."""
    return HFFamily() if config.model.hf_model is not None else LongNetFamily()


def family_of_folder(folder: str | Path) -> ModelFamily:
    """The family of a run or checkpoint folder (its ``config.json`` names a transformers
    ``model_type``, or is a LongNet config)."""
    from longnet.integrations.hf_train import is_hf_checkpoint  # reads JSON only: no transformers import

    return HFFamily() if is_hf_checkpoint(folder) else LongNetFamily()
