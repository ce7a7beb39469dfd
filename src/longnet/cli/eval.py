"""``longnet eval``: perplexity of a trained model at several context lengths."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from longnet.cli.train import report_error
from longnet.paper import PAPER_EVAL_LENGTHS
from longnet.utils.strict_json import print_json_line

DESCRIPTION = """\
Perplexity of a trained LongNet on a held-out split at several context lengths, as in the paper
(2K, 8K and 32K tokens). The split is cut into non-overlapping windows of each length; every
position of a window is scored and the loss is averaged over all scored tokens. Every length
scores the same first tokens of the split (--max-tokens, rounded down to a multiple of the
longest length), so the figures compare the same text. Lengths the split cannot fill are skipped
with a note.

Beyond the training length LongNet keeps its dilated pattern (it runs at any length); a dense
baseline (--attention dense) switches to blockwise causal attention over windows of its
training length, as the paper evaluates it. Each row says how many tokens it scored; the last
line of the output is one strict JSON object with the figures ({"split": "validation",
"perplexity@2048": ..., "tokens@2048": ..., ...}). A NaN or infinite loss is an error (exit 1),
never a figure.

Which tokens: the validation figure longnet train prints scores the first --eval-tokens (65,536)
tokens of the validation split in windows of the training length; this command scores the first
--max-tokens (131,072, capped by the split and rounded down to a multiple of the longest
--seq-len) at each --seq-len. Different tokens give different perplexities. To reproduce the
trainer's figure, ask for its tokens: --split validation --seq-len TRAIN_LEN --max-tokens
EVAL_TOKENS (docs/evaluation.md)."""

EPILOG = """\
examples:
  longnet eval --checkpoint runs/tiny
  longnet eval --checkpoint runs/tiny --seq-len 512 --max-tokens 65536   # the trainer's validation figure
  longnet eval --checkpoint runs/tiny --seq-len 2048 8192 --split test --max-tokens 0
  longnet eval --checkpoint runs/tiny/checkpoints/step-00000100 --device cuda"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``longnet eval``."""
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a run folder (longnet train --out) or one of its checkpoints/step-* folders")
    parser.add_argument("--seq-len", type=int, nargs="+", default=list(PAPER_EVAL_LENGTHS), metavar="N",
                        help="context lengths to evaluate (default: the paper's "
                             + " ".join(map(str, PAPER_EVAL_LENGTHS)) + ")")
    parser.add_argument("--split", choices=("validation", "test"), default="validation",
                        help="held-out split (default: validation)")
    parser.add_argument("--max-tokens", type=int, default=131072, metavar="N",
                        help="tokens scored per length (rounded down to a multiple of the longest length), "
                             "0 = the whole split (default: 131072)")
    parser.add_argument("--batch-size", type=int, default=None, metavar="WINDOWS",
                        help="windows per forward pass (default: as many as fit in "
                             "longnet.train.evaluate.EVAL_BATCH_TOKENS tokens, at least 1; the figures do not "
                             "depend on it beyond float rounding)")
    parser.add_argument("--data", metavar="SPEC", default=None,
                        help="corpus to evaluate on (default: the run's --data)")
    parser.add_argument("--cache-dir", metavar="DIR", default=None,
                        help="token-file cache (default: the run's)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default: auto)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="auto = bfloat16 autocast on GPU, float32 on CPU (default: auto)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show progress bars (default: when stderr is a terminal)")


def _model_folder(path: Path) -> Path:
    from longnet.train import latest_checkpoint

    if not path.is_dir():
        raise ValueError(f"--checkpoint {path} is not a folder; give a run folder from longnet train --out")
    if (path / "model.safetensors").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise ValueError(f"--checkpoint {path} holds no model.safetensors and no checkpoint; "
                         "give a run folder of longnet train that saved at least one checkpoint")
    return latest


def run(args: argparse.Namespace) -> int:
    """Evaluate; 0 when done, 1 when the loss is NaN or infinite, 2 on bad input."""
    from longnet.train.evaluate import NonFiniteLoss

    try:
        return _run(args)
    except NonFiniteLoss as err:  # broken weights or an overflow: no figure to report
        report_error(err)
        return 1
    except (ValueError, OSError) as err:  # bad input: checkpoint, data, lengths
        report_error(err)
        return 2


def _run(args: argparse.Namespace) -> int:
    from longnet.data import Tokenizer, prepare_data
    from longnet.train import default_cache_dir, perplexities
    from longnet.train.config import stored_settings
    from longnet.train.families import family_of_folder
    from longnet.train.rundir import find_run_file
    from longnet.train.runtime import resolve_device, resolve_dtype

    if any(n < 1 for n in args.seq_len):
        raise ValueError(f"--seq-len values must be positive, got {args.seq_len}")
    if args.max_tokens < 0 or (args.batch_size is not None and args.batch_size < 1):
        raise ValueError("--max-tokens must be >= 0 and --batch-size >= 1")
    folder = _model_folder(Path(args.checkpoint).expanduser())
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    family = family_of_folder(folder)  # a LongNet or a Hugging Face (--hf-model) run
    model = family.load(folder).to(device)
    if not (folder / "tokenizer.json").is_file():
        raise ValueError(f"{folder} has no tokenizer.json; it is not a longnet train checkpoint")
    tokenizer = Tokenizer.load(folder)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"{folder}: tokenizer has {tokenizer.vocab_size} ids, the model only "
                         f"{model.config.vocab_size}; the checkpoint is inconsistent")
    run_doc = find_run_file(folder)
    settings = stored_settings(run_doc) if isinstance(run_doc, dict) else {}
    spec = args.data or settings.get("data")
    if spec is None:
        raise ValueError(f"{folder} has no run.json naming its data; pass --data")
    cache_dir = args.cache_dir or settings.get("cache_dir") or default_cache_dir()
    prepared = None
    if spec == settings.get("data") and settings.get("vocab_size") and settings.get("hf_model") is None:
        # the run's own cache entry (a Hugging Face run's tokenizer is the model's: below)
        prepared = prepare_data(spec, cache_dir, settings["vocab_size"], progress=args.progress)
    if prepared is None or prepared.tokenizer.sha256() != tokenizer.sha256():
        prepared = prepare_data(spec, cache_dir, tokenizer=tokenizer, progress=args.progress)
    tokens = prepared.tokens(args.split)
    max_tokens = None if args.max_tokens == 0 else args.max_tokens
    results = perplexities(model, tokens, list(args.seq_len), max_tokens=max_tokens, device=device,
                           dtype=dtype, batch_size=args.batch_size, progress=args.progress,
                           for_length=family.for_length)
    if all(r.skipped for r in results):
        raise ValueError(f"the {args.split} split of --data {spec!r} has {len(tokens):,} tokens, too few for "
                         f"any --seq-len in {list(args.seq_len)}; evaluate shorter lengths")

    trained = settings.get("seq_len") or getattr(model.config, "max_train_length", "?")  # the run's length
    step = _step_of(folder)
    scored = max(r.tokens for r in results)
    print(f"perplexity of {folder} (step {step if step is not None else '?'}, {model.config.attention} "
          f"attention, trained at {trained} tokens) on the first {scored:,} tokens of the {args.split} split "
          f"({len(tokens):,} tokens) of {spec!r}")
    print(f"{'context':>8}  {'windows':>7}  {'tokens':>9}  {'split':>10}  {'loss':>7}  {'perplexity':>10}")
    summary: dict[str, object] = {"checkpoint": str(folder), "step": step, "split": args.split,
                                  "split_tokens": len(tokens), "train_seq_len": trained}
    skipped = {}
    for r in results:
        if r.skipped:
            print(f"{r.seq_len:>8}  skipped: {r.skipped}")
            skipped[str(r.seq_len)] = r.skipped
            continue
        print(f"{r.seq_len:>8}  {r.windows:>7}  {r.tokens:>9,}  {r.split:>10}  {r.loss:>7.4f}  {r.perplexity:>10.3f}")
        summary[f"perplexity@{r.seq_len}"] = round(r.perplexity, 6) if math.isfinite(r.perplexity) else None
        summary[f"loss@{r.seq_len}"] = round(r.loss, 6)
        summary[f"tokens@{r.seq_len}"] = r.tokens
    if skipped:
        summary["skipped"] = skipped
    for run_folder in (folder, folder.parent.parent):
        if (run_folder / "loss.png").is_file():
            print(f"training curves: {run_folder / 'loss.png'}")
            break
    print_json_line(summary)
    return 0


def _step_of(folder: Path) -> int | None:
    """The step of a checkpoint folder (``step-N``) or of a run folder's latest checkpoint."""
    if folder.name.startswith("step-") and folder.name[5:].isdigit():
        return int(folder.name[5:])
    latest = folder / "latest.json"
    if latest.is_file():
        try:
            return int(json.loads(latest.read_text(encoding="utf-8"))["step"])
        except (ValueError, KeyError, TypeError):
            return None
    return None
