"""Decoding a Hugging Face Llama with dilated attention: DilatedCache vs transformers' dense cache.

The model is a transformers ``LlamaForCausalLM`` of about 12.6M parameters (vocabulary 8192,
width 384, 6 layers, 6 query heads and 2 key/value heads of 64, MLP 1024, tied embeddings) with
``attn_implementation="dilated"`` and the pattern of LongNet's ``small`` preset (segments
128..2048, dilations 1, 2, 4, 6, 6), so the figures compare with ``benchmarks/decode.py``.

For each context position P (default 1K to 1M tokens) a cache is brought to position
``P - T`` and the model then decodes ``T = warmup + rounds * steps`` single tokens through
``model(input_ids=token, cache=cache)`` (positions ``P - T .. P - 1``). Three caches:

- ``dilated``: :class:`longnet.hf.DilatedCache` after a real prefill. The prompt's tokens before
  ``cache.first_needed(P - T)`` are never read by later positions (the segments nest), so the cache
  starts there (``cache.start_at``) and prefills at most one largest segment: reaching 1M costs
  2048 tokens of prefill.
- ``dense``: transformers' ``DynamicCache`` holding every key and value, same dilated model (the
  integration's dense-cache path, exact, reading a bounded number of keys per query but keeping
  and copying them all).
- ``dense_sdpa``: the same weights with ``attn_implementation="sdpa"`` over a ``DynamicCache``
  (a dense Llama).

Both dense caches are filled with random keys and values (a step's cost does not depend on them; a
real dense prefill to P costs O(P^2)), up to ``--dense-max`` positions. Timed steps run in rounds,
interleaved over positions (dilated) and over the two dense caches, so that load from other
processes spreads evenly. Reported: median wall-clock and CPU milliseconds per token, and the cache
bytes after the steps. Writes ``benchmarks/results/hf_decode-<device>.json`` and ``.png``, prints a
table and ends with one JSON line. Run: ``PYTHONPATH=src python benchmarks/hf_decode.py``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from longnet.bench.results import add_overwrite_option, claim_results

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--positions", default=",".join(str(2 ** k) for k in range(10, 21)),
                   help="comma-separated context positions (default: 1K..1M, powers of 2)")
    p.add_argument("--steps", type=int, default=4, help="timed single-token steps per round")
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds over all positions")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the rounds")
    p.add_argument("--dense-max", type=int, default=262144,
                   help="largest position for the dense caches (memory: 6 KiB per position)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(RESULTS), help="folder for the JSON and PNG")
    add_overwrite_option(p)
    return p.parse_args(argv)


def build_model(device):
    from transformers import LlamaConfig, LlamaForCausalLM

    import longnet.hf

    longnet.hf.register()
    config = LlamaConfig(vocab_size=8192, hidden_size=384, intermediate_size=1024,
                         num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
                         max_position_embeddings=1 << 21, tie_word_embeddings=True,
                         segment_lengths=[128, 256, 512, 1024, 2048],
                         dilation_rates=[1, 2, 4, 6, 6], bos_token_id=0, eos_token_id=None,
                         pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device).eval()
    model.set_attn_implementation("dilated")
    return model


def dense_bytes(cache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


class Run:
    """A cache at some position, stepped token by token (greedy)."""

    def __init__(self, model, cache, device, nbytes):
        from longnet.bench.measure import StepTimes

        self.model, self.cache, self.nbytes = model, cache, nbytes
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.timer = StepTimes(device)

    def _step(self) -> None:
        with torch.no_grad():
            logits = self.model(input_ids=self.token, cache=self.cache, use_cache=True,
                                logits_to_keep=1).logits
        self.token = logits[:, -1].argmax(-1, keepdim=True)

    def steps(self, count: int, record: bool = True) -> None:
        for _ in range(count):
            self.timer.run(self._step, record)

    def result(self, P: int) -> dict:
        if self.cache.get_seq_length() != P:
            raise RuntimeError(f"expected {P} tokens in the cache, got {self.cache.get_seq_length()}")
        return {**self.timer.summary(), "cache_bytes": self.nbytes(self.cache)}


def start_dilated(model, P: int, args, device) -> tuple[Run, float]:
    from longnet.hf import DilatedCache

    before = P - args.warmup - args.rounds * args.steps
    cache = DilatedCache(model.config)
    start = cache.first_needed(before)
    cache.start_at(start)
    g = torch.Generator().manual_seed(P)
    prompt = torch.randint(0, model.config.vocab_size, (1, before - start), generator=g).to(device)
    t = time.perf_counter()
    with torch.no_grad():
        model(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1)
    return Run(model, cache, device, lambda c: c.nbytes), time.perf_counter() - t


def start_dense(model, P: int, args, device) -> Run:
    from transformers import DynamicCache

    length = P - args.warmup - args.rounds * args.steps
    cfg = model.config
    cache = DynamicCache(config=cfg)
    g = torch.Generator().manual_seed(P)
    shape = (1, cfg.num_key_value_heads, length, cfg.hidden_size // cfg.num_attention_heads)
    for i in range(cfg.num_hidden_layers):
        cache.update(torch.randn(shape, generator=g).to(device),
                     torch.randn(shape, generator=g).to(device), i)
    return Run(model, cache, device, dense_bytes)


def plot(results: dict, path: Path) -> None:
    from longnet.bench.report import plot_decode

    plot_decode(results, path, [("dilated", "DilatedCache"), ("dense", "DynamicCache, dilated attention"),
                 ("dense_sdpa", "DynamicCache, sdpa (dense Llama)")],
                f"HF Llama decoding ({results['parameters'] / 1e6:.1f}M) on {results['device_name']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    try:
        claim_results(args.out, f"hf_decode-{device.type}", overwrite=args.overwrite)
    except OSError as err:  # ResultsExistError: an earlier result would be replaced
        print(f"hf_decode: error: {err}", file=sys.stderr)
        return 2
    positions = sorted(int(p) for p in args.positions.split(","))
    total = args.warmup + args.rounds * args.steps
    if min(positions) <= total:
        raise SystemExit(f"positions must exceed warmup + rounds * steps ({total})")
    import copy

    import transformers

    model = build_model(device)
    sdpa = copy.deepcopy(model)
    sdpa.set_attn_implementation("sdpa")
    params = sum(p.numel() for p in model.parameters())
    W = max(model.config.segment_lengths)
    name = platform.processor() or platform.machine()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    print(f"LlamaForCausalLM: {params:,} parameters, segments {model.config.segment_lengths}, "
          f"dilations {model.config.dilation_rates}, {model.config.num_attention_heads} heads / "
          f"{model.config.num_key_value_heads} kv heads; {args.rounds} x {args.steps} timed steps "
          f"per position (median), {torch.get_num_threads()} thread(s) on {name}", flush=True)
    print("ms/tok: median wall-clock ms per token (cpu: median CPU ms of this process)")
    print(f"{'position':>9} | {'DilatedCache ms/tok (cpu)':>25} {'MiB':>6} {'prefill s':>9} | "
          f"{'dense, dilated ms/tok (cpu)':>27} {'MiB':>7} | {'dense, sdpa ms/tok (cpu)':>24}",
          flush=True)
    runs, prefill = {}, {}
    for P in positions:
        runs[P], prefill[P] = start_dilated(model, P, args, device)
        runs[P].steps(args.warmup, record=False)
    for r in range(args.rounds):
        for P in (positions if r % 2 == 0 else positions[::-1]):
            runs[P].steps(args.steps)
    rows = []
    for P in positions:
        row = {"position": P, "dilated": {**runs.pop(P).result(P), "prefill_s": prefill[P]},
               "dense": None, "dense_sdpa": None}
        if P <= args.dense_max:
            dense = {"dense": start_dense(model, P, args, device),
                     "dense_sdpa": start_dense(sdpa, P, args, device)}
            for run in dense.values():
                run.steps(args.warmup, record=False)
            for _ in range(args.rounds):
                for run in dense.values():
                    run.steps(args.steps)
            row.update({k: run.result(P) for k, run in dense.items()})
            del dense, run
        rows.append(row)

        def ms(m, width):
            return f"{m['ms_per_token']:.1f} ({m['cpu_ms_per_token']:.1f})".rjust(width)

        d, e, s = row["dilated"], row["dense"], row["dense_sdpa"]
        e_txt = f"{ms(e, 27)} {e['cache_bytes'] / 2 ** 20:>7.1f}" if e else f"{'-':>27} {'-':>7}"
        s_txt = ms(s, 24) if s else f"{'-':>24}"
        print(f"{P:>9} | {ms(d, 25)} {d['cache_bytes'] / 2 ** 20:>6.2f} {d['prefill_s']:>9.2f} | "
              f"{e_txt} | {s_txt}", flush=True)

    def col(key, field, digits=3):
        return [round(r[key][field], digits) if r[key] else None for r in rows]

    summary = {
        "benchmark": "hf_decode", "device": args.device, "model": "LlamaForCausalLM",
        "parameters": params, "largest_segment": W, "positions": positions,
        "dilated_ms_per_token": col("dilated", "ms_per_token"),
        "dilated_cpu_ms_per_token": col("dilated", "cpu_ms_per_token"),
        "dilated_cache_bytes": [r["dilated"]["cache_bytes"] for r in rows],
        "dense_ms_per_token": col("dense", "ms_per_token"),
        "dense_cache_bytes": [r["dense"]["cache_bytes"] if r["dense"] else None for r in rows],
        "dense_sdpa_ms_per_token": col("dense_sdpa", "ms_per_token"),
    }
    flat = [r["dilated"] for r in rows if r["position"] >= W]
    if flat:
        ms_flat = [f["ms_per_token"] for f in flat]
        mid = statistics.median(ms_flat)
        summary["dilated_latency_max_deviation_from_median"] = round(
            max(abs(m / mid - 1) for m in ms_flat), 4)
        summary["dilated_cache_bytes_constant_from_largest_segment"] = len(
            {f["cache_bytes"] for f in flat}) == 1
    results = {**summary, "rows": rows, "device_name": name, "threads": torch.get_num_threads(),
               "torch": torch.__version__, "transformers": transformers.__version__,
               "steps": args.steps, "rounds": args.rounds, "warmup": args.warmup,
               "config": {k: v for k, v in model.config.to_dict().items()
                          if isinstance(v, (int, float, str, list, bool, type(None)))}}
    from longnet.bench.report import write_results

    write_results(args.out, f"hf_decode-{device.type}", results, plot)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
