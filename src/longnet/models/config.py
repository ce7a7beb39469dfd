"""Model configuration: one dataclass for the LM and the encoder, validation, presets.

Paper presets (Ding et al., 2023, section 4; sizes as GPT-3's 125M/350M/760M/2.7B): MAGNETO
blocks with XPos, vocabulary 50,257 (a GPT-2-style byte-level BPE; the paper trains on The Stack
and does not give its tokenizer, so this is an assumption), tied embeddings, and the paper's
LongNet pattern ``w = 2048, 4096, 8192, 16384, 32768`` with ``r = 1, 2, 4, 6, 12`` (the numbers
live in :mod:`longnet.paper`).

Baselines as configuration of the same model (``attention``):

- ``"dilated"``: LongNet, the pattern ``segment_lengths`` / ``dilation_rates``.
- ``"dense"``: vanilla Transformer, ``F.scaled_dot_product_attention`` over the whole sequence.
  Beyond its training length the paper evaluates it with blockwise causal attention, which is the
  single dilated branch ``(max_train_length, 1)``: :meth:`LongNetConfig.for_eval_length` switches
  to it.
- ``"sparse"``: a fixed sparse pattern in the spirit of the Sparse Transformer (Child et al.,
  2019), as two dilated branches: ``(sparse_block, 1)`` (local attention inside blocks) and
  ``(max_train_length, sparse_stride)`` (strided attention: positions ``i, j`` with
  ``i = j (mod sparse_stride)`` inside one ``max_train_length`` window). Unlike Child et al., the
  strided branch of head ``h`` only covers residue ``h mod sparse_stride`` (the dilated operator's
  per-head offset), so every residue is covered when ``sparse_stride <= num_heads``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, fields
from typing import Any

from longnet.ops.pattern import DilatedPattern
from longnet.paper import (
    GPT2_VOCAB,
    PAPER_DILATION_RATES,
    PAPER_MODEL_SHAPES,
    PAPER_SEGMENT_LENGTHS,
    PAPER_TRAIN_LENGTH,
)

__all__ = ["LongNetConfig", "PRESETS", "POSITIONS", "ATTENTIONS"]

POSITIONS = ("xpos", "rope", "none")
ATTENTIONS = ("dilated", "dense", "sparse")
ACTIVATIONS = ("gelu", "relu")
SEMANTICS = ("paper", "torchscale")


@dataclass
class LongNetConfig:
    """Hyper-parameters of :class:`~longnet.LongNetLM` and :class:`~longnet.LongNetEncoder`."""

    vocab_size: int | None = GPT2_VOCAB
    """Token vocabulary size (LM only; ``None`` is allowed for an encoder)."""
    embed_dim: int = 768
    """Model width E."""
    num_layers: int = 12
    """Number of Transformer blocks."""
    num_heads: int = 12
    """Query heads; ``embed_dim % num_heads == 0``."""
    num_kv_heads: int | None = None
    """Key/value heads for grouped-query attention (a divisor of ``num_heads``); None = num_heads."""
    ffn_dim: int = 3072
    """Hidden width of the feed-forward network."""
    segment_lengths: tuple[int, ...] = PAPER_SEGMENT_LENGTHS
    """Segment length ``w_i`` of each dilated branch (``attention="dilated"``)."""
    dilation_rates: tuple[int, ...] = PAPER_DILATION_RATES
    """Dilation rate ``r_i`` of each branch; one of them must be 1 so every position attends."""
    position: str = "xpos"
    """Relative positions on q/k: ``"xpos"`` (paper), ``"rope"`` or ``"none"``."""
    attention: str = "dilated"
    """``"dilated"`` (LongNet), ``"dense"`` (vanilla Transformer) or ``"sparse"`` (see module doc)."""
    max_train_length: int = PAPER_TRAIN_LENGTH
    """Training sequence length: the blockwise window of dense eval and the sparse pattern's window."""
    sparse_block: int = 256
    """Local block length of ``attention="sparse"``."""
    sparse_stride: int | None = None
    """Stride of the sparse strided branch; None = ``sparse_block``."""
    dropout: float = 0.0
    """Dropout on embeddings and residual branches (the paper uses 0)."""
    attention_dropout: float = 0.0
    """Dropout on attention weights."""
    activation: str = "gelu"
    """Feed-forward activation: ``"gelu"`` or ``"relu"``."""
    bias: bool = True
    """Biases in the linear layers (as MAGNETO / torchscale)."""
    norm_eps: float = 1e-5
    """LayerNorm epsilon."""
    sub_ln: bool = True
    """MAGNETO sub-LayerNorm inside attention (before out_proj) and FFN (before fc2)."""
    tie_embeddings: bool = True
    """LM head shares the token embedding matrix."""
    grad_checkpointing: bool = False
    """Recompute each block in backward (torch.utils.checkpoint, non-reentrant)."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies (RoPE and XPos)."""
    xpos_scale_base: float = 512.0
    """XPos decay scale base ``s`` in ``zeta^(distance / s)``."""
    init_gamma: float | None = None
    """MAGNETO init scale on fc1, fc2, v_proj, out_proj; None = ``sqrt(log(2 * num_layers))``."""
    backend: str = "auto"
    """Kernel family of :func:`longnet.dilated_attention`."""
    shift_segments: bool = False
    """Odd-numbered layers (1, 3, ...) move every branch's segment boundaries half the shortest
    segment earlier (``DilatedPattern(..., shift=min(w) // 2)``): a causal model then has no pair of
    positions that every layer cuts apart (see ``longnet reach --shifted``). Dilated attention
    only; the generation cache and sequence parallelism refuse it."""
    semantics: str = "paper"
    """``"paper"`` (head offset ``h % r``, padding masked) or ``"torchscale"``: torchscale's
    dilated-attention rule, for its checkpoints (Prov-GigaPath's among them); see
    :mod:`longnet.interop.torchscale`."""

    # ---------------------------------------------------------------------------- validation
    def __post_init__(self) -> None:
        for name in ("segment_lengths", "dilation_rates"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"LongNetConfig.{name} {why}, got {getattr(self, name)!r}")

        def pos_int(name: str, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise bad(name, "must be a positive int" + (" or None" if allow_none else ""))

        def real(name: str, lo: float, hi: float, lo_open: bool = False, hi_open: bool = True,
                 allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise bad(name, "must be a finite number")
            if v < lo or (lo_open and v == lo) or v > hi or (hi_open and v == hi):
                raise bad(name, f"must be in {'(' if lo_open else '['}{lo}, {hi}"
                                f"{')' if hi_open else ']'}")

        pos_int("vocab_size", allow_none=True)
        for name in ("embed_dim", "num_layers", "num_heads", "ffn_dim", "max_train_length",
                     "sparse_block"):
            pos_int(name)
        pos_int("num_kv_heads", allow_none=True)
        pos_int("sparse_stride", allow_none=True)
        if self.embed_dim % self.num_heads:
            raise bad("num_heads", f"must divide embed_dim={self.embed_dim}")
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise bad("num_kv_heads", f"must divide num_heads={self.num_heads}")
        for name, allowed in (("position", POSITIONS), ("attention", ATTENTIONS),
                              ("activation", ACTIVATIONS),
                              ("semantics", SEMANTICS)):
            if getattr(self, name) not in allowed:
                raise bad(name, f"must be one of {allowed}")
        if self.position != "none" and (self.embed_dim // self.num_heads) % 2:
            raise bad("position", f"needs an even head dim (embed_dim / num_heads = "
                                  f"{self.embed_dim // self.num_heads})")
        for name in ("segment_lengths", "dilation_rates"):
            v = getattr(self, name)
            if not isinstance(v, tuple) or not v or any(
                    isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 1 for x in v):
                raise bad(name, "must be a non-empty sequence of positive ints")
        if len(self.segment_lengths) != len(self.dilation_rates):
            raise bad("dilation_rates", f"must have one rate per segment length "
                                        f"({len(self.segment_lengths)})")
        if self.semantics == "torchscale" and self.attention != "dilated":
            raise bad("semantics", "'torchscale' needs attention='dilated'")
        if 1 not in self.dilation_rates:
            raise bad("dilation_rates", "must contain 1 (else some positions attend to nothing)")
        real("dropout", 0.0, 1.0)
        real("attention_dropout", 0.0, 1.0)
        real("norm_eps", 0.0, 1.0, lo_open=True)
        real("rope_theta", 1.0, math.inf, lo_open=True)
        real("xpos_scale_base", 0.0, math.inf, lo_open=True)
        real("init_gamma", 0.0, math.inf, lo_open=True, allow_none=True)
        if self.shift_segments is not False and self.shift_segments is not True:
            raise bad("shift_segments", "must be a bool")
        if self.shift_segments and self.semantics == "torchscale":
            raise bad("shift_segments", "cannot combine with semantics='torchscale'")
        if self.shift_segments and self.attention != "dilated":
            raise bad("shift_segments", f"needs attention='dilated' (attention={self.attention!r})")
        for name in ("bias", "sub_ln", "tie_embeddings", "grad_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be a bool")
        if not isinstance(self.backend, str):
            raise bad("backend", "must be a str")

    # ------------------------------------------------------------------------- derived
    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads actually used."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def gamma(self) -> float:
        """MAGNETO init scale: ``init_gamma`` or ``sqrt(log(2 * num_layers))``."""
        if self.init_gamma is not None:
            return float(self.init_gamma)
        return math.sqrt(math.log(2 * self.num_layers))

    def pattern(self, layer: int = 0) -> DilatedPattern | None:
        """The dilated pattern layer ``layer`` runs (``None`` for dense attention); with
        ``shift_segments`` odd layers are shifted by half the shortest segment."""
        if self.attention == "dense":
            return None
        if self.attention == "sparse":
            stride = self.sparse_block if self.sparse_stride is None else self.sparse_stride
            return DilatedPattern((self.sparse_block, self.max_train_length), (1, stride))
        pattern = DilatedPattern(self.segment_lengths, self.dilation_rates)
        return pattern.for_layer(layer) if self.shift_segments else pattern

    def patterns(self) -> list[DilatedPattern | None]:
        """The pattern of every layer, in order."""
        return [self.pattern(i) for i in range(self.num_layers)]

    def for_eval_length(self, length: int) -> "LongNetConfig":
        """The configuration to evaluate at ``length`` tokens (same weights).

        Dense attention beyond ``max_train_length`` becomes blockwise causal attention, the single
        dilated branch ``(max_train_length, 1)``, as in the paper's evaluation. Other kinds are
        returned unchanged (their patterns already work at any length).
        """
        if isinstance(length, bool) or not isinstance(length, numbers.Integral) or length < 1:
            raise ValueError(f"length must be a positive int, got {length!r}")
        if self.attention == "dense" and length > self.max_train_length:
            return dataclasses.replace(self, attention="dilated",
                                       segment_lengths=(self.max_train_length,),
                                       dilation_rates=(1,))
        return dataclasses.replace(self)

    # ---------------------------------------------------------------------------- counting
    def layer_matmul_parameters(self) -> int:
        """Weights of one block that multiply every token: q/k/v/out projections and the FFN."""
        e, kv = self.embed_dim, self.kv_heads * self.head_dim
        return e * (e + 2 * kv) + e * e + 2 * e * self.ffn_dim

    def layer_parameters(self) -> int:
        """Every parameter of one block: :meth:`layer_matmul_parameters`, biases, LayerNorms."""
        e, kv, f = self.embed_dim, self.kv_heads * self.head_dim, self.ffn_dim
        biases = (e + 2 * kv + e + f + e) if self.bias else 0  # q, k, v, out, fc1, fc2
        norms = 2 * (e + e) + (2 * (e + f) if self.sub_ln else 0)  # weight + bias each
        return self.layer_matmul_parameters() + biases + norms

    def _ends(self, model: str, input_dim: int | None) -> tuple[int, int, int]:
        """``(matmul weights, other parameters, embedding)`` of the layers around the blocks."""
        if model == "lm":
            if self.vocab_size is None:
                raise ValueError("LongNetConfig.vocab_size must be set to count a language model, got None")
            if input_dim is not None:
                raise ValueError("input_dim is for model='encoder'")
            embedding = self.vocab_size * self.embed_dim
            # the LM head (vocab x width) multiplies every token, tied or not; untied, the
            # embedding is a second matrix of that size
            return embedding, 0 if self.tie_embeddings else embedding, embedding
        if model == "encoder":
            if input_dim is not None and (isinstance(input_dim, bool) or not isinstance(input_dim, int)
                                          or input_dim < 1):
                raise ValueError(f"input_dim must be a positive int or None, got {input_dim!r}")
            if input_dim is None or input_dim == self.embed_dim:
                return 0, 0, 0
            return input_dim * self.embed_dim, self.embed_dim, 0  # input projection and its bias
        raise ValueError(f"model must be 'lm' or 'encoder', got {model!r}")

    def matmul_parameters(self, model: str = "lm", *, input_dim: int | None = None) -> int:
        """Weights that take part in a matmul per token: every block linear, the LM head
        (``model="lm"``) or the input projection (``model="encoder"`` with ``input_dim``).

        ``6 *`` this is the dense part of the training FLOPs per token
        (:meth:`LongNetBase.flops_per_token <longnet.models.base.LongNetBase.flops_per_token>`).
        """
        matmul, _, _ = self._ends(model, input_dim)
        return self.num_layers * self.layer_matmul_parameters() + matmul

    def num_parameters(self, model: str = "lm", *, input_dim: int | None = None,
                       exclude_embeddings: bool = False) -> int:
        """Parameters of the model this config builds, as ``model.num_parameters()`` counts them.

        Args:
            model: ``"lm"`` (:class:`~longnet.LongNetLM`: embedding, LM head tied or not) or
                ``"encoder"`` (:class:`~longnet.LongNetEncoder` over inputs of width ``input_dim``).
            exclude_embeddings: leave out the token embedding (and with it a tied LM head).
        """
        matmul, other, embedding = self._ends(model, input_dim)
        total = (self.num_layers * self.layer_parameters() + 2 * self.embed_dim  # blocks, final norm
                 + matmul + other)
        if model == "lm" and exclude_embeddings:
            total -= embedding
        return total

    # ------------------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (tuples as lists)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LongNetConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        if not isinstance(data, dict):
            raise TypeError(f"config must be a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LongNetConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "LongNetConfig":
        """A named preset (see :data:`PRESETS`) with fields overridden, e.g. ``vocab_size``."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
        data = dict(PRESETS[name])
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown LongNetConfig keys {unknown} in overrides")
        data.update(overrides)
        return cls(**data)


def _paper(layers: int, width: int, heads: int) -> dict[str, Any]:
    return dict(vocab_size=GPT2_VOCAB, embed_dim=width, num_layers=layers, num_heads=heads,
                ffn_dim=4 * width, segment_lengths=PAPER_SEGMENT_LENGTHS,
                dilation_rates=PAPER_DILATION_RATES, max_train_length=PAPER_TRAIN_LENGTH)


PRESETS: dict[str, dict[str, Any]] = {
    # the paper's scaling study (GPT-3 shapes): base ~124M, 350m, 760m, 2.7b ~2.65B parameters
    **{name: _paper(*shape) for name, shape in PAPER_MODEL_SHAPES.items()},
    # CPU-sized: train in minutes; vocab_size is normally set from the tokenizer
    "tiny": dict(vocab_size=4096, embed_dim=192, num_layers=4, num_heads=4, ffn_dim=768,
                 segment_lengths=(64, 128, 256, 512), dilation_rates=(1, 2, 4, 8),
                 max_train_length=512),  # ~2.6M with vocab 4096
    "small": dict(vocab_size=8192, embed_dim=384, num_layers=6, num_heads=6, ffn_dim=1536,
                  segment_lengths=(128, 256, 512, 1024, 2048), dilation_rates=(1, 2, 4, 6, 6),
                  max_train_length=2048),  # ~14M with vocab 8192
    # Prov-GigaPath-like slide encoder: 12 layers, 768 wide, 16 heads, segments growing
    # geometrically from 1024 to 2^20 with r = 1..16; positions are expected in the input
    # embeddings (the slide encoder adds 2-D ones), none in attention
    "gigapath-slide": dict(vocab_size=None, embed_dim=768, num_layers=12, num_heads=16,
                           ffn_dim=3072,
                           segment_lengths=(1024, 5792, 32768, 185363, 1048576),
                           dilation_rates=(1, 2, 4, 8, 16), position="none",
                           max_train_length=1048576),
}
"""Named presets for :meth:`LongNetConfig.from_preset`: field -> value overrides of the defaults."""
