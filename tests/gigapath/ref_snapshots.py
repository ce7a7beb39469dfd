"""Import the reference code (torchscale 4d1e0e8, prov-gigapath 09d8e87) for tests, on CPU.

The snapshots are unpacked from the read-only tarballs into a temporary directory. Both ship a
package called ``torchscale`` (prov-gigapath vendors its own copy), so each is imported with a
clean ``sys.modules`` and ``sys.path`` and removed again afterwards; the module objects keep
working. Their CUDA-only ``flash_attn_func`` is replaced by :func:`exact_attention` (same call,
float64-capable, differentiable) and the FFN's activation runs in the model's dtype (see
:func:`_activation_in_model_dtype`; ``forward_as_released`` keeps the original), ``fairscale`` (only ``checkpoint_wrapper`` and ``wrap`` are
imported) and ``timm`` (only its ``register_model`` decorator and, in torchscale's DropPath,
``drop_path``, an identity at eval; the real timm needs torchvision) are stubbed during the import.
"""

from __future__ import annotations

import ast
import contextlib
import os
import sys
import tarfile
import types
from pathlib import Path

import torch


def _reference_dir() -> Path:
    """``$LONGNET_REFERENCE_DIR``, else ``shared/reference`` beside the checkout, else the one in
    /work (a worktree elsewhere still finds it)."""
    if os.environ.get("LONGNET_REFERENCE_DIR"):
        return Path(os.environ["LONGNET_REFERENCE_DIR"])
    beside = Path(__file__).resolve().parents[3] / "shared" / "reference"
    return beside if beside.is_dir() else Path("/work/shared/reference")


REFERENCE_DIR = _reference_dir()
TORCHSCALE_TAR = "torchscale-4d1e0e8.tar.gz"
GIGAPATH_TAR = "prov-gigapath-09d8e87.tar.gz"


def available() -> bool:
    return (REFERENCE_DIR / TORCHSCALE_TAR).is_file() and (REFERENCE_DIR / GIGAPATH_TAR).is_file()


def exact_attention(q, k, v, dropout=0.0, bias=None, softmax_scale=None, is_causal=False):
    """flash_attn_func's contract: q/k/v (b, l, h, d) -> (out (b, l, h, d), lse (b, h, l))."""
    assert dropout == 0.0 and bias is None
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    outs, lses = [], []
    for h in range(q.shape[2]):  # one head at a time keeps the score matrix small
        s = torch.bmm(q[:, :, h], k[:, :, h].transpose(1, 2)) * scale  # (b, l, l)
        if is_causal:
            L = s.shape[-1]
            s = s.masked_fill(~torch.ones(L, L, dtype=torch.bool, device=s.device).tril(), float("-inf"))
        top = s.amax(-1, keepdim=True)
        if grad:
            e = torch.exp(s - top)
            total = e.sum(-1, keepdim=True)
            p = e / total
        else:  # in place: the float64 reference at thousands of tiles is memory-bound
            p = s.sub_(top).exp_()
            total = p.sum(-1, keepdim=True)
            p.div_(total)
        outs.append(torch.bmm(p, v[:, :, h]))
        lses.append((top + total.log()).squeeze(-1))
    return torch.stack(outs, 2), torch.stack(lses, 1)


def _stub_modules() -> dict[str, types.ModuleType]:
    fairscale = types.ModuleType("fairscale")
    fairscale_nn = types.ModuleType("fairscale.nn")
    fairscale_nn.checkpoint_wrapper = lambda module, *a, **k: module
    fairscale_nn.wrap = lambda module, *a, **k: module
    fairscale.nn = fairscale_nn
    timm = types.ModuleType("timm")
    timm_models = types.ModuleType("timm.models")
    timm_registry = types.ModuleType("timm.models.registry")
    timm_registry.register_model = lambda fn: fn
    timm_layers = types.ModuleType("timm.models.layers")

    def drop_path(x, drop_prob=0.0, training=False):  # torchscale's DropPath at eval
        if drop_prob == 0.0 or not training:
            return x
        raise RuntimeError("the timm stub has no training-mode drop_path")

    timm_layers.drop_path = drop_path
    timm.models, timm_models.registry, timm_models.layers = timm_models, timm_registry, timm_layers
    return {"fairscale": fairscale, "fairscale.nn": fairscale_nn, "timm": timm,
            "timm.models": timm_models, "timm.models.registry": timm_registry,
            "timm.models.layers": timm_layers}


def _ours(name: str) -> bool:
    return any(name == p or name.startswith(p + ".")
               for p in ("torchscale", "gigapath", "fairscale", "timm"))


@contextlib.contextmanager
def _isolated_import(paths: list[Path]):
    saved = {k: v for k, v in sys.modules.items() if _ours(k)}
    for k in saved:
        del sys.modules[k]
    sys.modules.update(_stub_modules())
    old_path = list(sys.path)
    sys.path[:0] = [str(p) for p in paths]
    try:
        yield
    finally:
        sys.path[:] = old_path
        for k in [k for k in sys.modules if _ours(k)]:
            del sys.modules[k]
        sys.modules.update(saved)


def _activation_in_model_dtype(self, x):
    """torchscale's FeedForwardNetwork.forward, with the activation evaluated in x's dtype.

    torchscale evaluates it on ``x.float()``: a no-op for float32 models, but in float64 it rounds
    to float32, so 1e-16 differences in the input flip float32 roundings and the outputs of two
    exact float64 implementations would only agree to ~1e-8. The float64 comparisons use this.
    """
    shape = x.shape
    x = self.activation_fn(self.fc1(x.reshape(-1, x.size(-1))))
    x = self.activation_dropout_module(x)
    if self.ffn_layernorm is not None:
        x = self.ffn_layernorm(x)
    return self.dropout_module(self.fc2(x)).view(shape)


def _patch() -> None:
    for name in ("torchscale.component.flash_attention", "torchscale.component.multihead_attention"):
        sys.modules[name].flash_attn_func = exact_attention
    ffn = sys.modules["torchscale.component.feedforward_network"].FeedForwardNetwork
    ffn.forward_as_released = ffn.forward
    ffn.forward = _activation_in_model_dtype


def unpack(dest: Path) -> tuple[Path, Path]:
    for tar in (TORCHSCALE_TAR, GIGAPATH_TAR):
        with tarfile.open(REFERENCE_DIR / tar) as t:
            t.extractall(dest, filter="data")
    return dest / "torchscale-4d1e0e8", dest / "prov-gigapath-09d8e87"


def load_torchscale(root: Path) -> types.SimpleNamespace:
    """torchscale 4d1e0e8: LongNetEncoder/Decoder, DilatedAttention and the configs."""
    with _isolated_import([root]):
        import torchscale.architecture.config as config
        import torchscale.component.dilated_attention as dilated
        import torchscale.model.LongNet as longnet
        _patch()
        return types.SimpleNamespace(
            EncoderConfig=config.EncoderConfig, DecoderConfig=config.DecoderConfig,
            DilatedAttention=dilated.DilatedAttention, LongNetEncoder=longnet.LongNetEncoder,
            LongNetDecoder=longnet.LongNetDecoder)


def load_gigapath(root: Path) -> types.SimpleNamespace:
    """prov-gigapath 09d8e87 with its vendored torchscale: LongNetViT and the position table."""
    with _isolated_import([root / "gigapath", root]):
        import gigapath.pos_embed as pos_embed
        import gigapath.slide_encoder as slide_encoder
        _patch()
        original = slide_encoder.LongNetViT.get_optimal_segment_length

        def plain_ints(self, *args, **kwargs):  # numpy 2 prints np.int64(...): prov-gigapath issue 125
            text = original(self, *args, **kwargs).replace("np.int64(", "").replace(")", "")
            return str([int(x) for x in ast.literal_eval(text)])

        slide_encoder.LongNetViT.get_optimal_segment_length = plain_ints
        return types.SimpleNamespace(LongNetViT=slide_encoder.LongNetViT, pos_embed=pos_embed,
                                     attention=sys.modules["torchscale.component.multihead_attention"])
