"""``longnet train``: train (or resume) a LongNet language model on a text corpus."""

from __future__ import annotations

import argparse
import os
import signal
import sys


def _description() -> str:
    from longnet.paper import PAPER_BATCH_TOKENS, PAPER_BETAS, PAPER_LR, PAPER_WARMUP_STEPS, PAPER_WEIGHT_DECAY

    return f"""\
Train a LongNet language model on a text corpus, or fine-tune a local Hugging Face causal LM with
dilated attention (--hf-model), with the paper's recipe: AdamW (betas {PAPER_BETAS[0]}/{PAPER_BETAS[1]}, weight
decay {PAPER_WEIGHT_DECAY} on the weight matrices only), peak learning rate {PAPER_LR:g} with linear warmup
({PAPER_WARMUP_STEPS} steps, at most 10% of the schedule) then cosine decay, gradient clipping, dropout 0,
{PAPER_BATCH_TOKENS:,}-token steps (the tiny and small presets use smaller steps and higher rates so a
few hundred CPU steps learn something). Each step uses --batch-tokens / --seq-len sequences, run
as micro-batches with gradient accumulation; bfloat16 autocast on GPUs.

Settings come from their defaults, then --config FILE.toml (sections as the groups below, e.g.
[optim] lr = 1e-3), then the command line. The run folder (--out) receives: run.json and
train.toml (the resolved settings; reuse with --config), metrics.jsonl (loss, lr, tokens/s per
step, validation loss per evaluation), loss.png, tensorboard/ (when tensorboard is installed),
checkpoints/ (model, optimizer, RNG and data position, written atomically: a crash never leaves
a torn checkpoint), and at its top the latest model (LongNetLM.from_pretrained(RUN), or a
transformers folder for --hf-model). Ctrl-C or SIGTERM saves a checkpoint before exiting
(SIGTERM: exit status 0, so a preempted job ends cleanly); --resume continues exactly where the
run stopped (bit for bit on CPU). Settings marked [run] fix the run's identity: with --resume
they keep the run's values and may not change."""


EPILOG = """\
examples:
  # a tiny LongNet on the Python standard library, on CPU, then its perplexity with 32 ... 2048
  # tokens of context (its segments reach 512, its training length)
  longnet train --preset tiny --max-steps 150 --out runs/tiny
  longnet eval --checkpoint runs/tiny --seq-len 32 128 512 2048

  # continue after an interruption, or train further (keep --decay-steps for a longer run)
  longnet train --out runs/tiny --resume

  # your own data (files, folders, globs, JSONL with a "text" field), dense baseline, on a GPU
  longnet train --preset base --data 'code/**/*.py' --attention dense --seq-len 8192 \\
      --device cuda --out runs/dense-8k

  # long-context fine-tuning of a local Hugging Face causal LM (config, weights, tokenizer.json)
  # with dilated attention (default pattern: its original context L, 2L, ... with rates 1, 2, ...)
  longnet train --hf-model ./my-llama --seq-len 32768 --batch-tokens 65536 --max-steps 200 \
      --out runs/llama-32k     # then from_pretrained('runs/llama-32k', attn_implementation='dilated')

  # 4 processes = 2 data parallel x 2 sequence parallel (each holds half of every sequence;
  # gloo on CPU, NCCL with one GPU per process); rank 0 writes the run folder
  torchrun --nproc-per-node 4 -m longnet train --sequence-parallel 2 --preset tiny \\
      --seq-len 4096 --batch-tokens 8192 --out runs/tiny-sp

  # the same with FSDP2: parameters, gradients and AdamW states sharded over the 4 processes;
  # sharded checkpoints resume on another number of processes (or on one, without torchrun)
  torchrun --nproc-per-node 4 -m longnet train --fsdp --sequence-parallel 2 --preset tiny \\
      --seq-len 4096 --batch-tokens 8192 --out runs/tiny-fsdp"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``longnet train``: ``--out``, ``--resume``, ``--config`` and one option per setting
    of :class:`longnet.train.config.TrainConfig`, generated from its declarations."""
    from longnet.train.config import TrainConfig
    from longnet.utils.config_tree import add_arguments as add_settings

    parser.description = _description()
    parser.epilog = EPILOG
    parser.formatter_class = _Formatter
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="run folder: new or empty, or an existing run with --resume")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its latest checkpoint (a new run when --out holds none)")
    parser.add_argument("--config", metavar="FILE",
                        help="TOML file of settings ([section] tables as the groups below, or top-level keys); "
                             "options given on the command line override it")
    add_settings(parser, TrainConfig)


def report_error(message: object) -> None:
    """Print ``error: MESSAGE`` on one line of stderr (``error: rank R: ...`` on torchrun ranks > 0)."""
    text = " ".join(str(message).split())
    rank = os.environ.get("RANK", "0") if "WORLD_SIZE" in os.environ else "0"
    print(f"error: {text}" if rank == "0" else f"error: rank {rank}: {text}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Train; 0 when done or stopped by SIGTERM (after saving), 2 on bad input, 1 on divergence,
    128 + signal when interrupted otherwise (Ctrl-C)."""
    from longnet.train import TrainingDiverged, TrainingInterrupted, train  # deferred: fast --help
    from longnet.train.config import TrainConfig
    from longnet.utils.config_tree import given_values, read_toml

    try:
        given = read_toml(args.config, TrainConfig) if args.config else {}
        given.update(given_values(args, TrainConfig))
        train(given, args.out, resume=args.resume, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except TrainingInterrupted as err:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank stops; rank 0 tells
            if err.signum == signal.SIGTERM:  # a scheduler's stop: saved, a clean exit
                print(f"stopped: {err}", file=sys.stderr)
            else:
                report_error(err)
        return 0 if err.signum == signal.SIGTERM else 128 + err.signum
    except TrainingDiverged as err:
        report_error(err)
        return 1
    except (ValueError, OSError) as err:  # bad input: data, options, folder, checkpoint
        from longnet.parallel.runtime import ParallelSettingsError

        if not isinstance(err, ParallelSettingsError) or os.environ.get("RANK", "0") == "0":
            report_error(err)  # every rank raises the same ParallelSettingsError: rank 0 tells
        return 2
    return 0
