"""Bytes of longnet.hf.DilatedCache with grouped-query attention: per key/value head vs per query head.

A Llama-shaped config (transformers ``LlamaConfig``: 32 layers, 32 query heads and 8 key/value
heads of 128, so G = 4 query heads per key/value head; bfloat16; batch 1) with the paper's pattern
w = 2048, 4096, 8192, 16384, 32768, r = 1, 2, 4, 6, 12. Three caches, all real cache objects whose
tensors live on the ``meta`` device (real shapes and dtypes, no memory), bytes summed from the
tensors' ``nbytes``:

- ``per_kv_head``: :class:`longnet.hf.DilatedCache` as it is now: each key/value head keeps, per
  branch, the union of its group's residues once (``longnet.ops.kv_slots``). Checked against
  :func:`longnet.integrations.hf_cache.bound_bytes`.
- ``per_query_head``: the layout before, ``sum_i ceil(w_i / r_i)`` slots per query head (keys of a
  group held once per query head): the same cache made with ``num_key_value_heads = 32``, whose
  layout is exactly that (G = 1), checked against the formula
  ``layers * H * sum_i ceil(w_i / r_i) * (2 * D * 2 + 8)``.
- ``dense``: transformers' ``DynamicCache`` holding every key and value up to the position.

Both dilated caches are preallocated at their bound on the first token, so their bytes are the
same at every position (the tests assert that they stay constant while decoding); the dense cache
grows with the position. Prints a table and ends with one JSON line; writes
``benchmarks/results/gqa_cache_bytes.json`` (refuses to replace it without ``--overwrite``).
Run: ``PYTHONPATH=src python benchmarks/gqa_cache_bytes.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from longnet.bench.results import add_overwrite_option, claim_results
from longnet.paper import PAPER_DILATION_RATES, PAPER_SEGMENT_LENGTHS
from longnet.utils.atomic import atomic_write_json
from longnet.utils.strict_json import print_json_line

RESULTS = Path(__file__).resolve().parent / "results"
STEM = "gqa_cache_bytes"
LAYERS, HEADS, KV_HEADS, HEAD_DIM = 32, 32, 8, 128
DTYPE = torch.bfloat16


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--positions", default="8192,65536,262144", help="comma-separated context positions")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS), help="folder for the JSON")
    add_overwrite_option(p)
    return p.parse_args(argv)


def llama_config(kv_heads: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128, hidden_size=HEADS * HEAD_DIM, intermediate_size=64,
                       num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=kv_heads,
                       head_dim=HEAD_DIM, segment_lengths=list(PAPER_SEGMENT_LENGTHS),
                       dilation_rates=list(PAPER_DILATION_RATES))


def dilated_bytes(config, batch_size: int) -> tuple[int, int]:
    """(bytes summed over the allocated tensors, slots per key/value head) of a DilatedCache."""
    from longnet.hf import DilatedCache
    from longnet.integrations.hf_cache import bound_bytes

    cache = DilatedCache(config)
    key = torch.empty(batch_size, config.num_key_value_heads, 1, HEAD_DIM, dtype=DTYPE, device="meta")
    for layer in cache.layers:
        layer.lazy_initialization(key, key)
        layer.allocate()  # what the first token does: every slot, at the bound
    real = sum(t.nbytes for layer in cache.layers
               for t in (layer.slots.keys, layer.slots.values, layer.slots.positions))
    if not real == cache.nbytes == bound_bytes(config, batch_size, DTYPE):
        raise AssertionError(f"tensor bytes {real}, cache.nbytes {cache.nbytes}, bound_bytes "
                             f"{bound_bytes(config, batch_size, DTYPE)} disagree")
    return real, cache.slots_per_kv_head


def dense_bytes(config, batch_size: int, position: int) -> int:
    """Bytes of a transformers DynamicCache holding ``position`` keys and values per layer."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    kv = torch.empty(batch_size, config.num_key_value_heads, position, HEAD_DIM, dtype=DTYPE, device="meta")
    for i in range(config.num_hidden_layers):
        cache.update(kv, kv, i)
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        out = claim_results(args.out, STEM, overwrite=args.overwrite, suffixes=(".json",))
    except OSError as err:  # ResultsExistError: an earlier result would be replaced
        print(f"gqa_cache_bytes: error: {err}", file=sys.stderr)
        return 2
    positions = sorted(int(p) for p in args.positions.split(","))
    B = args.batch_size
    after, slots_kv = dilated_bytes(llama_config(KV_HEADS), B)
    before, slots_q = dilated_bytes(llama_config(HEADS), B)  # G = 1: sum ceil(w/r) per query head
    per_slot = 2 * HEAD_DIM * torch.empty((), dtype=DTYPE).element_size() + 8
    slots = sum(-(-w // r) for w, r in zip(PAPER_SEGMENT_LENGTHS, PAPER_DILATION_RATES))  # per query head
    formula = LAYERS * B * HEADS * slots * per_slot
    if before != formula:
        raise AssertionError(f"per-query-head bytes {before} != formula {formula}")
    rows = [{"position": P, "dense_bytes": dense_bytes(llama_config(KV_HEADS), B, P),
             "per_query_head_bytes": before, "per_kv_head_bytes": after} for P in positions]
    gib = 2 ** 30
    print(f"Llama-shaped: {LAYERS} layers, {HEADS} query / {KV_HEADS} key/value heads (G = {HEADS // KV_HEADS}) of "
          f"{HEAD_DIM}, {str(DTYPE).removeprefix('torch.')}, batch {B}; pattern w = {list(PAPER_SEGMENT_LENGTHS)}, "
          f"r = {list(PAPER_DILATION_RATES)}")
    print(f"slots per layer and row: per query head {HEADS} x {slots_q} = {HEADS * slots_q}; "
          f"per kv head {KV_HEADS} x {slots_kv} = {KV_HEADS * slots_kv}")
    print(f"{'position':>9} | {'dense DynamicCache':>20} | {'dilated, per query head':>24} | "
          f"{'dilated, per kv head':>21} | {'after / before':>14}")
    for r in rows:
        print(f"{r['position']:>9} | {r['dense_bytes'] / gib:>16.3f} GiB | {before / gib:>20.3f} GiB | "
              f"{after / gib:>17.3f} GiB | {after / before:>14.4f}")
    result = {
        "benchmark": STEM, "layers": LAYERS, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "dtype": str(DTYPE).removeprefix("torch."), "batch_size": B,
        "segment_lengths": list(PAPER_SEGMENT_LENGTHS), "dilation_rates": list(PAPER_DILATION_RATES),
        "slots_per_query_head": slots_q, "slots_per_kv_head": slots_kv,
        "per_query_head_bytes": before, "per_kv_head_bytes": after, "ratio": round(after / before, 6),
        "rows": rows,
    }
    path = out / f"{STEM}.json"
    atomic_write_json(path, result)
    print_json_line({"benchmark": STEM, "positions": positions, "per_query_head_bytes": before,
                     "per_kv_head_bytes": after, "ratio": round(after / before, 6),
                     "dense_bytes": [r["dense_bytes"] for r in rows], "file": path.name}, compact=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
