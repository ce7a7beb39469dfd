"""``longnet slide-embed``: Prov-GigaPath slide embeddings of tile-feature files."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from longnet.cli.train import report_error
from longnet.utils.strict_json import print_json_line

DESCRIPTION = """\
Slide embeddings with Prov-GigaPath's slide encoder (slide_encoder.pth, or a file written by
python -m longnet.gigapath.convert), on CPU or GPU, without flash-attn.

Each input file holds one slide: tile features (N, 1536) from the tile encoder and their level-0
pixel coordinates (N, 2) as (x, y): a .pt file (torch.save of {"features": ..., "coords": ...})
or an .h5 file with "features" and "coords" datasets (needs h5py: pip install
'longnet-torch[gigapath]'). Folders are searched for such files.

Slides are batched by length (padding never changes a slide's output) and one safetensors file
per slide is written to --out as <name>.safetensors: "slide" (768,), with --tiles "tiles"
(N, 768) (per-tile contextual embeddings), with --all-layers "layers" (13, 768) (the embedding
from each of the 13 states, GigaPath's all_layer_embed). --table also writes embeddings.safetensors
("embeddings" (slides, 768), names in its metadata) and embeddings.csv over all finished slides.

Resumable: slides whose output file exists are skipped. A file that cannot be used is reported
and skipped; the others go on. Exit status 0 when every slide is embedded, 1 when some failed."""

EPILOG = """\
examples:
  longnet slide-embed --checkpoint slide_encoder.pth --features feats/ --out emb/
  longnet slide-embed --checkpoint slide_encoder.pth --features a.h5 b.h5 --out emb/ --tiles --device cuda
  longnet slide-embed --checkpoint slide_encoder.pth --features feats/ --out emb/ --table --global-pool"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``longnet slide-embed``."""
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--checkpoint", required=True, metavar="FILE",
                        help="slide_encoder.pth (Prov-GigaPath) or its converted .safetensors")
    parser.add_argument("--features", required=True, nargs="+", metavar="PATH",
                        help="feature files (.pt, .h5) or folders holding them")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    parser.add_argument("--compat", choices=("torchscale", "paper"), default="torchscale",
                        help="torchscale = the released model's outputs; paper = the paper's dilated "
                             "attention on the same weights (default: torchscale)")
    parser.add_argument("--global-pool", action="store_true",
                        help="mean of the tiles instead of the class token (checkpoints trained so)")
    parser.add_argument("--tiles", action="store_true", help="also save per-tile embeddings")
    parser.add_argument("--all-layers", action="store_true", help="also save the 13 per-state embeddings")
    parser.add_argument("--table", action="store_true",
                        help="also write embeddings.safetensors and embeddings.csv over all slides")
    parser.add_argument("--batch-tiles", type=int, default=65536, metavar="N",
                        help="most tiles per batch, padding included (default: 65536)")
    parser.add_argument("--num-heads", type=int, default=16, help="attention heads (default: 16)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default: auto)")
    parser.add_argument("--dtype", choices=("auto", "float32", "float64", "bfloat16", "float16"),
                        default="auto", help="auto = bfloat16 on GPU, float32 on CPU (default: auto)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show a progress bar (default: when stderr is a terminal)")


@dataclass
class _Slide:
    name: str
    path: Path
    features: object = None
    coords: object = None

    @property
    def tiles(self) -> int:
        return int(self.features.shape[0])


def find_inputs(paths: list[str]) -> list[tuple[str, Path]]:
    """``(name, path)`` of every feature file; names (file stems) must be unique."""
    from longnet.gigapath.slides import SUFFIXES

    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix in SUFFIXES and f.is_file())
        elif p.exists():
            files.append(p)
        else:
            raise ValueError(f"--features {p}: no such file or folder")
    if not files:
        raise ValueError(f"--features {' '.join(paths)}: no .pt or .h5 files found")
    seen: dict[str, Path] = {}
    for f in files:
        if f.stem in seen and seen[f.stem] != f:
            raise ValueError(f"two inputs would write {f.stem}.safetensors: {seen[f.stem]} and {f}; "
                             f"rename one")
        seen[f.stem] = f
    return list(seen.items())


def _batches(slides: list[_Slide], budget: int):
    """Slides sorted by length, grouped so that count x longest <= budget (at least one each)."""
    order = sorted(slides, key=lambda s: s.tiles)
    batch: list[_Slide] = []
    for s in order:
        if batch and (len(batch) + 1) * s.tiles > budget:
            yield batch
            batch = []
        batch.append(s)
    if batch:
        yield batch


def run(args: argparse.Namespace) -> int:
    """Embed; 0 when every slide is done, 1 when some failed, 2 on bad options."""
    try:
        return _run(args)
    except (ValueError, OSError) as err:
        report_error(err)
        return 2


def _resolve(args):
    import torch

    from longnet.train.runtime import resolve_device

    device = resolve_device(args.device)
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    return device, dtype


def _run(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save
    from tqdm import tqdm

    from longnet.gigapath import load_slide_encoder, pad_slides
    from longnet.gigapath.slides import read_slide
    from longnet.interop.torchscale import check_torchscale_length
    from longnet.utils.atomic import atomic_write_bytes

    if args.batch_tiles < 1:
        raise ValueError(f"--batch-tiles must be positive, got {args.batch_tiles}")
    inputs = find_inputs(args.features)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = [(n, p) for n, p in inputs if not (out / f"{n}.safetensors").is_file()]
    device, dtype = _resolve(args)
    compat = None if args.compat == "paper" else "torchscale"
    model = load_slide_encoder(args.checkpoint, compat=compat, num_heads=args.num_heads,
                               global_pool=args.global_pool, device=device, dtype=dtype)
    pattern = model.encoder.config.pattern()
    failed: dict[str, str] = {}
    done = 0
    started = time.perf_counter()
    show = sys.stderr.isatty() if args.progress is None else args.progress
    bar = tqdm(total=len(todo), unit="slide", desc="slide-embed", disable=not show, dynamic_ncols=True)

    def fail(slide_name: str, path: Path, why: object) -> None:
        failed[slide_name] = " ".join(str(why).split())
        tqdm.write(f"skipped {path}: {failed[slide_name]}", file=sys.stderr)
        bar.update(1)

    def embed(batch: list[_Slide]) -> None:
        nonlocal done
        feats, coords, mask = pad_slides([(s.features, s.coords) for s in batch])
        feats, coords, mask = feats.to(device, dtype), coords.to(device), mask.to(device)
        with torch.no_grad():
            states = model.hidden_states(feats, coords, mask, all_states=args.all_layers)
            res = model.readout(states, mask, return_tiles=args.tiles)
            layers = model.readout(states, mask, all_layers=True) if args.all_layers else None
        del states
        slide, tiles = res if args.tiles else (res, None)
        for i, s in enumerate(batch):
            tensors = {"slide": slide[i]}
            if layers is not None:
                tensors["layers"] = layers[:, i]
            if tiles is not None:
                tensors["tiles"] = tiles[i, :s.tiles]
            tensors = {k: v.float().cpu().contiguous() for k, v in tensors.items()}
            meta = {"source": str(s.path), "tiles": str(s.tiles), "checkpoint": str(args.checkpoint),
                    "compat": args.compat, "global_pool": str(bool(args.global_pool))}
            atomic_write_bytes(out / f"{s.name}.safetensors", save(tensors, metadata=meta))
            done += 1
            bar.update(1)

    pending: list[_Slide] = []
    window = 4 * args.batch_tiles  # slides are read ahead this far and batched by length

    def flush() -> None:
        for batch in _batches(pending, args.batch_tiles):
            try:
                embed(batch)
            except (RuntimeError, ValueError) as err:  # e.g. out of memory: retry one by one
                if len(batch) == 1:
                    fail(batch[0].name, batch[0].path, err)
                    continue
                for s in batch:
                    try:
                        embed([s])
                    except (RuntimeError, ValueError) as err_one:
                        fail(s.name, s.path, err_one)
        pending.clear()

    for name, path in todo:
        try:
            feats, coords = read_slide(path, model.config.in_dim)
            model.positions.cells(coords[None])  # bad coordinates are this file's error
            if compat is not None:
                check_torchscale_length(pattern, feats.shape[0] + 1)
        except Exception as err:  # noqa: BLE001 - whatever one file does, it is reported and skipped
            fail(name, path, err if isinstance(err, ValueError) else f"{path}: {type(err).__name__}: {err}")
            continue
        pending.append(_Slide(name, path, feats, coords))
        if sum(s.tiles for s in pending) >= window:
            flush()
    flush()
    bar.close()
    seconds = time.perf_counter() - started
    if args.table:
        _write_table(out, [n for n, _ in inputs])
    skipped = len(inputs) - len(todo)
    print(f"{'slides':>10}  {'embedded':>8}  {'already done':>12}  {'failed':>6}  {'seconds':>8}")
    print(f"{len(inputs):>10}  {done:>8}  {skipped:>12}  {len(failed):>6}  {seconds:>8.1f}")
    for name, why in failed.items():
        print(f"failed: {name}: {why}")
    print(f"embeddings in {out}")
    print_json_line({"out": str(out), "slides": len(inputs), "embedded": done, "already_done": skipped,
                     "failed": failed, "seconds": round(seconds, 3), "device": str(device),
                     "dtype": str(dtype).replace("torch.", "")})
    return 1 if failed else 0


def _write_table(out: Path, names: list[str]) -> None:
    import torch
    from safetensors.torch import load_file, save

    from longnet.utils.atomic import atomic_write_bytes, atomic_write_text

    rows, have = [], []
    for n in names:
        f = out / f"{n}.safetensors"
        if f.is_file():
            rows.append(load_file(str(f))["slide"])
            have.append(n)
    if not rows:
        return
    table = torch.stack(rows)
    atomic_write_bytes(out / "embeddings.safetensors",
                       save({"embeddings": table}, metadata={"names": json.dumps(have)}))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["slide", *(f"e{i}" for i in range(table.shape[1]))])
    writer.writerows([n, *(f"{v:.8g}" for v in row.tolist())] for n, row in zip(have, table))
    atomic_write_text(out / "embeddings.csv", text.getvalue())
