"""``longnet plan``: per-device memory, FLOPs and communication of sequence-parallel LongNet.

The model is a :class:`~longnet.LongNetConfig` (``LongNetConfig.from_preset`` plus the flags), and
its sizes come from the config's own counts: ``params`` is
:meth:`~longnet.LongNetConfig.matmul_parameters` (the weights that multiply every token, the ones
the FLOPs and the model's ``flops_per_token`` count; biases and LayerNorms, about 0.2%, are left
out of the memory and all-reduce estimates), ``params_total`` is
:meth:`~longnet.LongNetConfig.num_parameters`, equal to ``model.num_parameters()``.
Communication comes from :func:`longnet.parallel.plan_bytes`, the code the run-time byte counter
is checked against; FLOPs from :meth:`DilatedPattern.flops` for the branches a device runs alone
and from the gathered-row shapes for the ones it shares. Memory is an estimate (stated below).
"""

from __future__ import annotations

import argparse
import math
import sys

from longnet.cli.options import int_list
from longnet.models.config import PRESETS, LongNetConfig
from longnet.ops.pattern import DilatedPattern
from longnet.paper import GPT2_VOCAB
from longnet.parallel.layout import kv_pairs, place_branches, plan_bytes, residue_slots
from longnet.utils.strict_json import print_json_line

FLAG_FIELDS = {"layers": "num_layers", "embed_dim": "embed_dim", "heads": "num_heads", "kv_heads": "num_kv_heads",
               "ffn_dim": "ffn_dim", "vocab_size": "vocab_size", "segment_lengths": "segment_lengths",
               "dilation_rates": "dilation_rates"}
"""``longnet plan`` flag -> the :class:`LongNetConfig` field it overrides."""

# values a layer keeps per token for backward (bf16 training, attention by fused kernels):
# norm input, q, k, v, attention output, output-projection input, residual, second norm input,
# FFN input (9 * d) and the FFN hidden before and after the activation (2 * f)
_ACT_D, _ACT_F = 9, 2

EPILOG = """\
examples:
  longnet plan --seq-len 1048576 --gpus 8          # the paper's base model, 1M tokens over 8 devices
  longnet plan --preset 2.7b --seq-len 262144 --gpus 4 --data-parallel 2 --fsdp
  longnet plan --preset tiny --seq-len 4096 --gpus 2 --layers 4 --segment-lengths 512,1024 --dilation-rates 1,2"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``longnet plan``."""
    parser.epilog = EPILOG
    parser.add_argument("--seq-len", type=int, required=True, help="tokens per sequence N")
    parser.add_argument("--gpus", type=int, required=True,
                        help="devices sharing one sequence (sequence parallel size)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="base",
                        help="model preset (LongNetConfig.from_preset; base and 2.7b are the paper's "
                             "sizes with its pattern); the flags below override it")
    parser.add_argument("--layers", type=int, help="transformer layers (default: the preset's)")
    parser.add_argument("--embed-dim", type=int, help="model width d (default: the preset's)")
    parser.add_argument("--heads", type=int, help="query heads (default: the preset's)")
    parser.add_argument("--kv-heads", type=int, help="key/value heads (GQA), default = heads")
    parser.add_argument("--ffn-dim", type=int, help="FFN hidden width (default: the preset's)")
    parser.add_argument("--vocab-size", type=int, help="vocabulary (default: the preset's)")
    parser.add_argument("--segment-lengths", type=int_list,
                        help="w_i, comma-separated (default: the preset's)")
    parser.add_argument("--dilation-rates", type=int_list,
                        help="r_i, comma-separated (default: the preset's)")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per step")
    parser.add_argument("--dtype-bytes", type=int, default=2,
                        help="bytes per activation element (2 = bf16)")
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True,
                        help="causal LM (halves attention FLOPs)")
    parser.add_argument("--data-parallel", type=int, default=1, metavar="DP",
                        help="data-parallel groups of --gpus devices (world = DP x gpus; default 1)")
    parser.add_argument("--fsdp", action="store_true",
                        help="FSDP2 as `longnet train --fsdp`: weights, gradients and AdamW sharded over "
                             "all DP x gpus devices (default: every device holds them whole)")
    parser.add_argument("--fsdp-shard", choices=("mesh", "data"), default="mesh",
                        help="with --fsdp: shard over every device (mesh) or over the DP axis only (data)")


def _valid_length(pattern: DilatedPattern, seq_len: int, gpus: int, tries: int = 20_000) -> int:
    """Smallest N' >= N that splits evenly and fits the pattern (segments inside or over chunks).

    A chunk at least as long as the shortest segment must be a multiple of it, so the search
    steps by that segment from there: the paper's pattern needs at most 16 tries.
    """
    n = -(-seq_len // gpus)
    shortest = min(pattern.segment_lengths)
    for _ in range(tries):
        if n >= shortest and n % shortest:
            n += shortest - n % shortest
        try:
            place_branches(pattern, n * gpus, gpus)
            return n * gpus
        except ValueError:
            n += shortest if n >= shortest else 1
    raise ValueError(f"no sequence length from {seq_len:,} to {n * gpus:,} splits over {gpus} device(s) for "
                     f"segment_lengths={list(pattern.segment_lengths)}: every segment must fit in a device's "
                     "chunk a whole number of times or span whole chunks; use segment lengths that divide one "
                     "another (e.g. powers of two)")


def plan_model(*, seq_len: int, gpus: int, layers: int, embed_dim: int, heads: int,
               ffn_dim: int, segment_lengths, dilation_rates, kv_heads: int | None = None,
               vocab_size: int = GPT2_VOCAB, batch_size: int = 1, dtype_bytes: int = 2,
               causal: bool = True) -> dict:
    """:func:`plan_config` of a LongNet LM of this shape (other fields: the config's defaults)."""
    config = LongNetConfig(vocab_size=vocab_size, embed_dim=embed_dim, num_layers=layers, num_heads=heads,
                           num_kv_heads=kv_heads, ffn_dim=ffn_dim, segment_lengths=tuple(segment_lengths),
                           dilation_rates=tuple(dilation_rates))
    return plan_config(config, seq_len=seq_len, gpus=gpus, batch_size=batch_size, dtype_bytes=dtype_bytes,
                       causal=causal)


def config_from_args(args: argparse.Namespace) -> LongNetConfig:
    """``LongNetConfig.from_preset(--preset)`` with the flags that were given."""
    overrides = {field: getattr(args, flag) for flag, field in FLAG_FIELDS.items()
                 if getattr(args, flag, None) is not None}
    return LongNetConfig.from_preset(args.preset, **overrides)


def _state_bytes(config: LongNetConfig, kind: str, world: int) -> dict:
    """Per-device bytes of float32 weights, gradients and AdamW state (device 0, the busiest).

    Every parameter's dim 0 is split over ``world`` devices as FSDP2 splits it
    (:func:`longnet.parallel.fsdp.sharded_state_bytes`, from the shapes of a model built on the
    meta device: no memory).
    """
    import torch

    from longnet.models import LongNetEncoder, LongNetLM
    from longnet.parallel.fsdp import sharded_state_bytes

    with torch.device("meta"):
        model = LongNetLM(config) if kind == "lm" else LongNetEncoder(config)
    shapes = [tuple(p.shape) for p in model.parameters()]
    block = sum(p.numel() for p in model.blocks[0].parameters())
    root = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in model.blocks.parameters())
    return sharded_state_bytes(shapes, world, 0) | {"block_params": block, "root_params": root}


def plan_config(config: LongNetConfig, *, seq_len: int, gpus: int, batch_size: int = 1, dtype_bytes: int = 2,
                causal: bool = True, data_parallel: int = 1, fsdp: bool = False, fsdp_shard: str = "mesh") -> dict:
    """Per-device numbers of one training step of ``config`` (the busiest device), as a flat dict.

    A config with a vocabulary is a language model (embedding and LM head); one without
    (``vocab_size=None``, e.g. ``gigapath-slide``) is an encoder over inputs of its width.
    ``gpus`` devices share each sequence; ``data_parallel`` such groups split the batch
    (``batch_size`` sequences per group). With ``fsdp`` the weights, gradients and AdamW state are
    sharded over all ``data_parallel * gpus`` devices (``longnet train --fsdp``; ``fsdp_shard="data"``:
    over the ``data_parallel`` axis only, replicated over the ``gpus`` of a sequence): the
    ``memory_bytes_{params,grads,optimizer}`` keys are then the exact bytes of device 0, and
    ``memory_bytes_fsdp_gathered`` estimates the unsharded copies alive at once (the root group,
    kept gathered, and two blocks: the running one and the prefetched one, each with its full
    bf16 weights and float32 gradient).
    """
    for name, v in (("data_parallel", data_parallel), ("gpus", gpus)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    pattern = config.pattern()
    if pattern is None:
        raise ValueError("longnet plan needs a dilated (or sparse) pattern; dense attention has no "
                         "sequence-parallel split")
    kind = "lm" if config.vocab_size is not None else "encoder"
    layers, embed_dim, heads, ffn_dim = config.num_layers, config.embed_dim, config.num_heads, config.ffn_dim
    kv_heads, D = config.kv_heads, config.head_dim
    vocab_size = config.vocab_size or 0
    N = _valid_length(pattern, seq_len, gpus)
    n = N // gpus
    comm = plan_bytes(pattern, N, gpus, heads, D, dtype_bytes, kv_heads=kv_heads,
                      batch_size=batch_size)
    # attention FLOPs on the busiest device: local branches as on one device, shared branches
    # as m local queries against the gathered rows (causal: the ranks up to this one)
    attn = 0.0
    local = [pl for pl in place_branches(pattern, N, gpus) if pl.local]
    if local:
        attn += DilatedPattern([p.segment for p in local], [p.dilation for p in local]).flops(
            n, D, heads, is_causal=causal, batch_size=batch_size)
    for pl, bc in zip(place_branches(pattern, N, gpus), comm.branches):
        if not pl.local:
            m = residue_slots(n, pl.dilation)
            attn += batch_size * heads * 4.0 * m * (bc.group_size * m) * D
    params_layer = config.layer_matmul_parameters()
    params = config.matmul_parameters(kind)
    tokens = batch_size * n
    dense_fwd = 2.0 * tokens * params_layer
    layer_fwd = dense_fwd + attn
    layer_train = 3.0 * dense_fwd + 3.5 * attn
    head_train = 3.0 * 2.0 * tokens * vocab_size * embed_dim
    act_layer = tokens * (_ACT_D * embed_dim + _ACT_F * ffn_dim) * dtype_bytes \
        + sum(b.gathered_bytes for b in comm.branches)
    comm_layer = comm.forward_bytes + comm.backward_bytes
    world = data_parallel * gpus
    grad_allreduce = 2 * (world - 1) / world * params * 4
    extra: dict = {"data_parallel": data_parallel, "world": world, "fsdp": bool(fsdp)}
    states = params * 16
    if fsdp:
        from longnet.parallel.fsdp import shard_world

        extra["fsdp_shard"] = fsdp_shard
        sb = _state_bytes(config, kind, shard_world(data_parallel, gpus, fsdp_shard))
        states = sb["params"] + sb["grads"] + sb["optimizer"]
        extra.update(memory_bytes_params=sb["params"], memory_bytes_grads=sb["grads"],
                     memory_bytes_optimizer=sb["optimizer"],
                     memory_bytes_fsdp_gathered=(sb["root_params"] + 2 * sb["block_params"]) * (dtype_bytes + 4))
        # FSDP all-gathers every weight twice (forward and backward, in the compute dtype) and
        # reduce-scatters the float32 gradients, instead of one float32 all-reduce
        grad_allreduce = (world - 1) / world * params * (2 * dtype_bytes + 4)
    return extra | {
        "seq_len": N, "requested_seq_len": seq_len, "gpus": gpus, "tokens_per_device": n,
        "layers": layers, "embed_dim": embed_dim, "heads": heads, "kv_heads": kv_heads,
        "head_dim": D, "ffn_dim": ffn_dim, "pattern": [list(pattern.segment_lengths),
                                                       list(pattern.dilation_rates)],
        "branches": [{"segment": pl.segment, "dilation": pl.dilation, "local": pl.local,
                      "ranks_per_segment": bc.group_size, "pairs": len(
                          kv_pairs(heads, kv_heads, pl.dilation)[0]),
                      "forward_bytes": bc.forward_sent, "backward_bytes": bc.backward_sent}
                     for pl, bc in zip(place_branches(pattern, N, gpus), comm.branches)],
        "params": params,
        "params_total": config.num_parameters(kind),
        "attention_flops_per_layer_fwd": attn,
        "flops_per_layer_fwd": layer_fwd,
        "flops_per_step_train": layers * layer_train + head_train,
        "comm_bytes_per_layer_fwd": comm.forward_bytes,
        "comm_bytes_per_layer_bwd": comm.backward_bytes,
        "comm_bytes_per_step_attention": layers * comm_layer,
        "comm_bytes_per_step_grad_allreduce": int(grad_allreduce),
        "memory_bytes_states": states,
        "memory_bytes_activations_per_layer": act_layer,
        "memory_bytes_activations": layers * act_layer,
        "memory_bytes_total": states + layers * act_layer + extra.get("memory_bytes_fsdp_gathered", 0),
        # per-layer activation checkpointing: keep each layer's input, recompute one at a time
        "memory_bytes_total_checkpointed": states + layers * tokens * embed_dim * dtype_bytes
        + act_layer + extra.get("memory_bytes_fsdp_gathered", 0),
    }


def _fmt_bytes(x: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(x) < 1024 or unit == "TiB":
            return f"{x:,.1f} {unit}" if unit != "B" else f"{int(x):,} B"
        x /= 1024
    return str(x)


def _fmt_flops(x: float) -> str:
    if x == 0:
        return "0"
    e = min(int(math.log10(abs(x)) // 3), 5)
    return f"{x / 10 ** (3 * e):,.2f} {['', 'K', 'M', 'G', 'T', 'P'][e]}FLOP"


def run(args: argparse.Namespace) -> int:
    """Print the table and the JSON line; 2 (and one ``error:`` line on stderr) on bad flags."""
    try:
        r = plan_config(config_from_args(args), seq_len=args.seq_len, gpus=args.gpus, batch_size=args.batch_size,
                        dtype_bytes=args.dtype_bytes, causal=args.causal, data_parallel=args.data_parallel,
                        fsdp=args.fsdp, fsdp_shard=args.fsdp_shard)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if r["seq_len"] != r["requested_seq_len"]:
        print(f"note: N rounded up from {r['requested_seq_len']:,} to {r['seq_len']:,} so that it "
              f"splits into {args.gpus} equal chunks that fit the pattern")
    print(f"LongNet {r['layers']} layers x {r['embed_dim']} wide, {r['heads']} heads x "
          f"{r['head_dim']}, FFN {r['ffn_dim']}; N = {r['seq_len']:,} on {args.gpus} devices "
          f"({r['tokens_per_device']:,} tokens each), {r['params'] / 1e6:,.1f}M parameters")
    if r["world"] > 1 and (args.data_parallel > 1 or r["fsdp"]):
        print(f"{r['world']} devices = {r['data_parallel']} data parallel x {args.gpus} sequence parallel"
              + (("; FSDP: weights, gradients and AdamW sharded over all of them" if r["fsdp_shard"] == "mesh"
                  else f"; FSDP: weights, gradients and AdamW sharded over the {r['data_parallel']} data-parallel "
                  "devices") if r["fsdp"] else ""))
    print(f"{'branch (w, r)':>18} {'where':>10} {'ranks':>6} {'fwd bytes':>14} {'bwd bytes':>14}")
    for b in r["branches"]:
        where = "local" if b["local"] else "shared"
        print(f"{str((b['segment'], b['dilation'])):>18} {where:>10} {b['ranks_per_segment']:>6} "
              f"{_fmt_bytes(b['forward_bytes']):>14} {_fmt_bytes(b['backward_bytes']):>14}")
    rows = [
        ("attention comm / layer (fwd + bwd)", _fmt_bytes(r["comm_bytes_per_layer_fwd"]
                                                          + r["comm_bytes_per_layer_bwd"])),
        ("attention comm / step", _fmt_bytes(r["comm_bytes_per_step_attention"])),
        ("FSDP all-gathers + reduce-scatter / step" if r["fsdp"] else "gradient all-reduce / step (fp32)",
         _fmt_bytes(r["comm_bytes_per_step_grad_allreduce"])),
        ("FLOPs / layer (forward)", _fmt_flops(r["flops_per_layer_fwd"])),
        ("  of which attention", _fmt_flops(r["attention_flops_per_layer_fwd"])),
        ("FLOPs / step (train)", _fmt_flops(r["flops_per_step_train"])),
        ("memory: weights+grads+AdamW (fp32)", _fmt_bytes(r["memory_bytes_states"])),
        *([("  weights (fp32, sharded)", _fmt_bytes(r["memory_bytes_params"])),
           ("  gradients (fp32, sharded)", _fmt_bytes(r["memory_bytes_grads"])),
           ("  AdamW state (fp32, sharded)", _fmt_bytes(r["memory_bytes_optimizer"])),
           ("memory: FSDP unsharded copies (est.)", _fmt_bytes(r["memory_bytes_fsdp_gathered"]))]
          if r["fsdp"] else []),
        ("memory: activations / layer (est.)", _fmt_bytes(r["memory_bytes_activations_per_layer"])),
        ("memory: total (est., no checkpointing)", _fmt_bytes(r["memory_bytes_total"])),
        ("memory: total (est., per-layer checkpoint)",
         _fmt_bytes(r["memory_bytes_total_checkpointed"])),
    ]
    for name, value in rows:
        print(f"{name:<42} {value:>16}")
    print_json_line(r)
    return 0
