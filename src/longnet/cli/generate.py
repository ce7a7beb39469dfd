"""``longnet generate``: continue a prompt with a trained model, streaming the text."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DESCRIPTION = """\
Continue a prompt with a LongNet language model, printing the text as it is generated. The
model decodes with a dilated KV cache: each layer keeps at most ceil(w/r) keys per head and
branch, so memory and time per token stay flat however long the context grows (a dense model's
cache grows with the context). Prompts longer than the largest segment are cheap: tokens no later
position can read are skipped. The generated text goes to stdout; a summary line (tokens,
tokens/s, cache size) to stderr."""

EPILOG = """\
examples:
  longnet generate --checkpoint runs/tiny --prompt 'def main(' --max-new-tokens 200
  longnet generate --checkpoint runs/tiny --prompt-file prompt.py --max-new-tokens 100 --greedy"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``longnet generate``."""
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="run folder of 'longnet train' (or any folder with model.safetensors, "
                             "config.json and tokenizer.json)")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", metavar="TEXT", help="the prompt text")
    prompt.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a UTF-8 file")
    parser.add_argument("--max-new-tokens", type=int, required=True, metavar="N",
                        help="most tokens to generate (stops earlier at the end-of-text token)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="sampling temperature, > 0 (default: 1.0)")
    parser.add_argument("--top-k", type=int, default=None, metavar="K",
                        help="sample among the K most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, metavar="P",
                        help="nucleus sampling: the fewest likely tokens reaching probability P")
    parser.add_argument("--greedy", action="store_true",
                        help="always take the most likely token (no sampling)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--prefill-chunk-size", type=int, default=None, metavar="N",
                        help="prompt tokens per prefill step (default: the largest segment "
                             "length for nested patterns, else 1024)")


def _fail(message: str) -> int:
    print(f"longnet generate: error: {message}", file=sys.stderr)
    return 2


class _TextStreamer:
    """Decodes the growing list of new ids and writes the new text, holding back an incomplete
    UTF-8 character (byte-level BPE tokens may split one)."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer = tokenizer
        self.out = sys.stdout if out is None else out
        self.ids: list[int] = []
        self.printed = 0
        self.done = False
        self.count = 0

    def put(self, token) -> None:
        if self.done:
            return
        tid = int(token.reshape(-1)[0])
        self.count += 1
        if tid == self.tokenizer.eos_id:
            self.done = True
            return
        self.ids.append(tid)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self.out.write(text[self.printed:])
            self.out.flush()
            self.printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids)
        self.out.write(text[self.printed:] + "\n")
        self.out.flush()
        self.printed = len(text)


def run(args: argparse.Namespace) -> int:
    """Load the model and tokenizer, generate, stream; 0 on success, 2 on a usage error."""
    import torch

    from longnet.data import Tokenizer
    from longnet.models import CheckpointError
    from longnet.train.families import family_of_folder

    folder = Path(args.checkpoint)
    if not folder.is_dir():
        return _fail(f"checkpoint folder {folder} not found")
    if args.max_new_tokens < 0:
        return _fail(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.prompt_file is not None:
        try:
            text = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            return _fail(f"cannot read --prompt-file {args.prompt_file}: {err}")
    else:
        text = args.prompt
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, ValueError) as err:
        return _fail(f"--device {args.device!r} is not usable: {str(err).splitlines()[0]}")
    try:
        tokenizer = Tokenizer.load(folder)
    except ValueError as err:
        return _fail(f"cannot load the tokenizer of {folder}: {err}")
    try:
        model = family_of_folder(folder).load(folder).to(device)  # a LongNet or a Hugging Face run
    except (CheckpointError, ValueError) as err:
        return _fail(str(err).splitlines()[0])
    if tokenizer.vocab_size > model.config.vocab_size:
        return _fail(f"the tokenizer has {tokenizer.vocab_size} ids but the model only "
                     f"{model.config.vocab_size}: they do not belong together")
    ids = tokenizer.encode(text)
    if not ids:
        return _fail("the prompt is empty (no tokens)")
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    streamer = _TextStreamer(tokenizer)
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    cache = model.make_cache(1)
    start = time.perf_counter()
    try:
        out = model.generate(input_ids, args.max_new_tokens, do_sample=not args.greedy,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             eos_token_id=tokenizer.eos_id, cache=cache, streamer=streamer,
                             prefill_chunk_size=args.prefill_chunk_size, generator=generator)
    except ValueError as err:
        return _fail(str(err).splitlines()[0])
    seconds = time.perf_counter() - start
    new = out.shape[1] - input_ids.shape[1]
    print(f"[{len(ids)} prompt tokens, {new} new in {seconds:.2f} s "
          f"({new / max(seconds, 1e-9):.1f} tokens/s), cache {cache.nbytes / 2**20:.2f} MiB]",
          file=sys.stderr)
    return 0
