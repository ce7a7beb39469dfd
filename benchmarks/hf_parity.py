"""A Hugging Face model trained on several processes equals one process: the parity table.

A tiny random Llama (2 layers, 4 query heads, 2 key/value heads, original context 8) with a
byte-level BPE tokenizer is saved to a local folder (``longnet.testing.hf_fixtures``) and
fine-tuned with ``longnet.train.train(hf_model=...)`` at 32 tokens with dilated attention (segments
8, 16, 32; rates 1, 2, 4), 4 sequences per step, for 4 steps:

* once on one process (the reference);
* on 2 gloo CPU processes in each layout: data parallel (DDP), FSDP2, sequence parallel
  (each rank holds 16 of the 32 tokens; the 32-token branch spans both ranks), and FSDP2 with
  sequence parallelism; and on 4 processes, 2 data parallel x 2 sequence parallel;
* resharded resume: FSDP2 over 2 processes to step 2, then resumed on one process to step 4;
  and sequence parallel over 2 processes to step 2, resumed with DDP over 2 to step 4.

Each row gives the largest difference to the reference of the logged training losses, the
validation losses and the final weights (float32 throughout: differences come from summation
order). Prints the table, writes ``hf_parity_gloo-cpu.json`` under ``--out`` and ends with one JSON
line. Run: ``PYTHONPATH=src python benchmarks/hf_parity.py --help``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from longnet.bench.results import add_overwrite_option, claim_results
from longnet.utils.strict_json import print_json_line

STEM = "hf_parity_gloo-cpu"
LAYOUTS: dict[str, dict[str, Any]] = {
    "ddp (dp 2)": {"world": 2},
    "fsdp2 (dp 2)": {"world": 2, "fsdp": True},
    "sequence parallel 2": {"world": 2, "sequence_parallel": 2},
    "fsdp2 + sequence parallel 2": {"world": 2, "fsdp": True, "sequence_parallel": 2},
    "ddp 2 x sequence parallel 2": {"world": 4, "sequence_parallel": 2},
}
RESUMES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "fsdp2 (2) -> resume on 1 process": ({"world": 2, "fsdp": True}, {"world": 1}),
    "sequence parallel 2 -> resume ddp (dp 2)": ({"world": 2, "sequence_parallel": 2}, {"world": 2}),
}
STEPS = 4


def prepare(root: Path) -> dict[str, str]:
    """The corpus, the model folder and the token cache under ``root``."""
    from longnet.testing.hf_fixtures import write_corpus, write_llama

    corpus = root / "corpus"
    if not corpus.exists():
        write_corpus(corpus)
        write_llama(root / "llama", corpus)
    return {"hf_model": str(root / "llama"), "data": str(corpus), "cache_dir": str(root / "cache")}


def settings(paths: dict[str, str], **kw: Any) -> dict[str, Any]:
    return dict(paths, seq_len=32, batch_tokens=128, micro_batch=1, max_steps=STEPS, decay_steps=STEPS,
                eval_every=2, eval_tokens=128, save_every=2, lr=3e-3, warmup_steps=1, device="cpu",
                progress=False) | kw


def _worker(rank: int, world: int, paths: dict[str, str], out: str, layout: dict[str, Any], resume: bool,
            max_steps: int) -> int:
    from longnet.train import train

    given = {k: v for k, v in layout.items() if k != "world"}
    if resume:
        result = train({**given, "max_steps": max_steps, "progress": False}, out, resume=True, log=lambda m: None)
    else:
        result = train(settings(paths, max_steps=max_steps, **given), out, log=lambda m: None)
    return result.step


def run(paths: dict[str, str], out: Path, layout: dict[str, Any], *, resume: bool = False,
        max_steps: int = STEPS) -> None:
    """Train (or resume) the run ``out`` in ``layout`` (``world`` processes on gloo)."""
    from longnet.parallel import run_workers

    if layout["world"] == 1:
        _worker(0, 1, paths, str(out), layout, resume, max_steps)
        return
    steps = run_workers(_worker, layout["world"], paths, str(out), layout, resume, max_steps, timeout_s=300,
                        start_method="fork")
    assert steps == [max_steps] * layout["world"], steps


def compare(reference: Path, other: Path) -> dict[str, float]:
    """Largest differences between two run folders: training and validation losses, weights."""
    from safetensors.torch import load_file

    from longnet.train import read_metrics

    def losses(run: Path, kind: str, key: str) -> dict[int, float]:
        return {r["step"]: r[key] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == kind}

    out = {}
    for kind, key in (("train", "loss"), ("eval", "val_loss")):
        a, b = losses(reference, kind, key), losses(other, kind, key)
        if sorted(a) != sorted(b):
            raise AssertionError(f"{other}: logged {kind} steps {sorted(b)}, the reference {sorted(a)}")
        out[f"max_abs_{key}"] = max(abs(a[s] - b[s]) for s in a)
    wa, wb = load_file(str(reference / "model.safetensors")), load_file(str(other / "model.safetensors"))
    if wa.keys() != wb.keys():
        raise AssertionError(f"{other}: weights {sorted(wb)[:3]}..., the reference {sorted(wa)[:3]}...")
    out["max_abs_weight"] = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    out["max_weight_change"] = 0.0  # filled by the caller: how far training moved the weights
    return out


def table(root: Path, names: list[str] | None = None) -> list[dict[str, Any]]:
    """The parity rows (one reference run, then each layout and resume), under ``root``."""
    from safetensors.torch import load_file

    paths = prepare(root)
    reference = root / "one-process"
    if not reference.exists():
        run(paths, reference, {"world": 1})
    start = load_file(str(Path(paths["hf_model"]) / "model.safetensors"))
    final = load_file(str(reference / "model.safetensors"))
    moved = max(float((final[k] - start[k]).abs().max()) for k in final)
    rows = []
    for name, layout in LAYOUTS.items():
        if names is not None and name not in names:
            continue
        out = root / name.replace(" ", "_")
        t0 = time.perf_counter()
        run(paths, out, layout)
        rows.append({"layout": name, "processes": layout["world"], **compare(reference, out),
                     "max_weight_change": moved, "wall_s": time.perf_counter() - t0})
    for name, (first, then) in RESUMES.items():
        if names is not None and name not in names:
            continue
        out = root / name.replace(" ", "_").replace(">", "")
        t0 = time.perf_counter()
        run(paths, out, first, max_steps=STEPS // 2)
        run(paths, out, then, resume=True)
        rows.append({"layout": name, "processes": f"{first['world']} then {then['world']}",
                     **compare(reference, out), "max_weight_change": moved, "wall_s": time.perf_counter() - t0})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results", help="results folder (default: %(default)s)")
    parser.add_argument("--work", default=None, help="folder for the runs (default: a temporary folder)")
    add_overwrite_option(parser)
    args = parser.parse_args(argv)
    out = claim_results(args.out, STEM, overwrite=args.overwrite, suffixes=(".json",))
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        rows = table(Path(args.work or tmp))
    print(f"{'layout':<42} {'procs':>8} {'|d loss|':>10} {'|d val|':>10} {'|d weight|':>11} {'moved':>8} {'s':>6}")
    for r in rows:
        print(f"{r['layout']:<42} {str(r['processes']):>8} {r['max_abs_loss']:>10.2e} {r['max_abs_val_loss']:>10.2e} "
              f"{r['max_abs_weight']:>11.2e} {r['max_weight_change']:>8.2e} {r['wall_s']:>6.1f}")
    doc = {"what": "HF Llama (tiny, random) fine-tuned with dilated attention: each layout against one process",
           "steps": STEPS, "dtype": "float32", "backend": "gloo", "device": "cpu", "rows": rows}
    from longnet.utils.atomic import atomic_write_json

    atomic_write_json(out / f"{STEM}.json", doc, indent=1)
    print_json_line({"results": str(out / f"{STEM}.json"),
                     "max_abs_weight": max(r["max_abs_weight"] for r in rows)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
