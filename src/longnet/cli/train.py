"""``longnet train``: train (or resume) a LongNet language model on a text corpus."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from longnet.cli.options import int_list

DESCRIPTION = """\
Train a LongNet language model on a text corpus, with the paper's recipe: AdamW (betas 0.9/0.98,
weight decay 0.01 on the weight matrices only: not on biases, norms or embeddings), peak learning
rate 6e-4 (the tiny preset uses 2e-3 and 4,096-token steps so a few hundred CPU steps learn
something), linear warmup (750 steps, at most 10% of the schedule) then cosine decay to 10% of
the peak, gradient clipping at 2.0, dropout 0. Each step uses --batch-tokens / --seq-len
sequences, run as micro-batches with gradient accumulation; bfloat16 autocast on GPUs.

The run folder (--out) receives: run.json (settings), metrics.jsonl (loss, lr, tokens/s per step,
validation loss per evaluation), loss.png (training and validation loss, refreshed at each
evaluation), tensorboard/ (when tensorboard is installed), checkpoints/ (model, optimizer, RNG
and data position, written atomically: a crash never leaves a torn checkpoint), and at its top
model.safetensors + config.json + tokenizer.json, so LongNetLM.from_pretrained(RUN) loads it.
Ctrl-C or SIGTERM saves a checkpoint before exiting (SIGTERM: exit status 0, so a preempted
job ends cleanly); --resume continues exactly where the run stopped (bit for bit on CPU), from the
previous checkpoint if the latest one is torn or corrupt on disk. Options marked [run] are fixed
when a run starts: with --resume they default to the run's values and may not change."""

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


def _flag(parser: argparse.ArgumentParser, *names: str, **kwargs) -> None:
    parser.add_argument(*names, default=argparse.SUPPRESS, **kwargs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``longnet train`` (defaults are resolved in ``longnet.train.TrainSettings``)."""
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.formatter_class = _Formatter
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="run folder: new or empty, or an existing run with --resume")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its latest checkpoint (a new run when --out holds none)")
    model = parser.add_argument_group("model")
    _flag(model, "--preset", metavar="NAME",
          help="[run] model preset: tiny (CPU minutes), small, base (125M), 350m, 760m, 2.7b (default: tiny)")
    _flag(model, "--attention", choices=("dilated", "dense", "sparse"),
          help="[run] attention kind: dilated (LongNet), dense (Transformer baseline), sparse "
               "(default: the preset's, dilated)")
    _flag(model, "--model-overrides", metavar="JSON", type=_json_object,
          help='[run] LongNetConfig fields overriding the preset, e.g. \'{"num_layers": 2}\'')
    _flag(model, "--hf-model", metavar="DIR",
          help="[run] fine-tune this local transformers causal LM folder (config.json, weights, tokenizer.json) "
               "with dilated attention instead of a LongNet preset; it keeps its tokenizer, the run folder "
               "is a transformers folder (--model-overrides then sets its config fields)")
    _flag(model, "--segment-lengths", metavar="W,...", type=int_list,
          help="[run] with --hf-model: the dilated pattern's segment lengths, e.g. 2048,4096,8192 (default: "
               "the model's original context L, 2L, 4L, ... up to --seq-len)")
    _flag(model, "--dilation-rates", metavar="R,...", type=int_list,
          help="[run] with --hf-model: the dilation rate of each segment length, e.g. 1,2,4 (default: 1, 2, 4, ...)")
    _flag(model, "--grad-checkpointing", action=argparse.BooleanOptionalAction,
          help="recompute each block in backward to save memory (default: off)")
    data = parser.add_argument_group("data")
    _flag(data, "--data", metavar="SPEC",
          help="[run] corpus: 'stdlib' (the Python standard library), files, folders, globs or .jsonl, "
               "comma-separated (default: stdlib)")
    _flag(data, "--vocab-size", type=int, metavar="N", help="[run] BPE vocabulary to train (default: the preset's)")
    _flag(data, "--seq-len", type=int, metavar="N",
          help="[run] training sequence length (default: the preset's max_train_length)")
    _flag(data, "--cache-dir", metavar="DIR", help="token-file cache (default: $LONGNET_CACHE or ~/.cache/longnet)")
    opt = parser.add_argument_group("optimization")
    _flag(opt, "--batch-tokens", type=int, metavar="N",
          help="[run] tokens per optimizer step (default: 524288 as the paper; tiny 4096, small 65536)")
    _flag(opt, "--micro-batch", type=int, metavar="SEQS",
          help="sequences per forward/backward, dividing the step's (default: as many as fit in 16384 tokens)")
    _flag(opt, "--max-steps", type=int, metavar="N", help="stop after this many optimizer steps (default: 1000)")
    _flag(opt, "--lr", type=float, help="[run] peak learning rate (default: 6e-4; tiny 2e-3, small 1e-3)")
    _flag(opt, "--warmup-steps", type=int, metavar="N",
          help="[run] linear warmup steps (default: 750, at most 10%% of --decay-steps)")
    _flag(opt, "--decay", choices=("cosine", "linear", "constant"), help="[run] decay after warmup (default: cosine)")
    _flag(opt, "--decay-steps", type=int, metavar="N",
          help="[run] step where the decay reaches 10%% of the peak (default: --max-steps); set it to the final "
               "length when training in several pieces")
    _flag(opt, "--min-lr-ratio", type=float, metavar="R", help="[run] final rate / peak rate (default: 0.1)")
    _flag(opt, "--weight-decay", type=float, help="[run] AdamW weight decay on weight matrices (default: 0.01)")
    _flag(opt, "--grad-clip", type=float, help="[run] gradient-norm clipping (default: 2.0)")
    _flag(opt, "--seed", type=int, help="[run] seed of initialization and data order (default: 0)")
    run = parser.add_argument_group("running")
    _flag(run, "--device", help="auto (CUDA if available), cpu, cuda, cuda:1 ... (default: auto)")
    _flag(run, "--dtype", choices=("auto", "float32", "bfloat16"),
          help="compute precision: auto = bfloat16 autocast on GPU, float32 on CPU (default: auto)")
    _flag(run, "--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model (default: off)")
    _flag(run, "--eval-every", type=int, metavar="N", help="validate every N steps and at the end (default: 100)")
    _flag(run, "--eval-tokens", type=int, metavar="N",
          help="validation tokens per evaluation: the first N of the validation split in windows of --seq-len; "
               "longnet eval --seq-len SEQ_LEN --max-tokens N scores the same ones (default: 65536)")
    _flag(run, "--save-every", type=int, metavar="N", help="checkpoint every N steps and at the end (default: 500)")
    _flag(run, "--sequence-parallel", type=int, metavar="P",
          help="under torchrun: P processes share each sequence (each holds seq-len / P tokens), the "
               "others split the batch (data parallel = processes / P); e.g. torchrun --nproc-per-node 4 "
               "-m longnet train --sequence-parallel 2 ... (default: 1)")
    _flag(run, "--fsdp", action=argparse.BooleanOptionalAction,
          help="under torchrun: shard parameters, gradients and AdamW states over all processes with FSDP2 "
               "(combines with --sequence-parallel; bf16 compute on GPU); checkpoints are sharded "
               "(torch.distributed.checkpoint) and resume in any layout (default: off, DDP)")
    _flag(run, "--fsdp-shard", choices=("mesh", "data"),
          help="with --fsdp: shard over every process (mesh) or over the data-parallel axis only, replicated "
               "over the sequence-parallel one (data: HSDP) (default: mesh)")
    _flag(run, "--dist-timeout", type=float, metavar="S",
          help="under torchrun: seconds a collective waits for its peers; a rank whose peer died exits "
               "non-zero within it (default: 120)")
    _flag(run, "--progress", action=argparse.BooleanOptionalAction,
          help="show progress bars (default: when stderr is a terminal)")



def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


SETTING_ARGS = ("preset", "model_overrides", "grad_checkpointing", "data", "vocab_size", "seq_len", "cache_dir",
                "batch_tokens", "micro_batch", "max_steps", "lr", "warmup_steps", "decay", "decay_steps",
                "min_lr_ratio", "weight_decay", "grad_clip", "seed", "device", "dtype", "compile", "eval_every",
                "eval_tokens", "save_every", "progress", "sequence_parallel", "hf_model", "segment_lengths",
                "dilation_rates", "fsdp", "fsdp_shard", "dist_timeout")


def report_error(message: object) -> None:
    """Print ``error: MESSAGE`` on one line of stderr (``error: rank R: ...`` on torchrun ranks > 0)."""
    text = " ".join(str(message).split())
    rank = os.environ.get("RANK", "0") if "WORLD_SIZE" in os.environ else "0"
    print(f"error: {text}" if rank == "0" else f"error: rank {rank}: {text}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Train; 0 when done or stopped by SIGTERM (after saving), 2 on bad input, 1 on divergence,
    128 + signal when interrupted otherwise (Ctrl-C)."""
    from longnet.train import TrainingDiverged, TrainingInterrupted, train  # deferred: fast --help

    given = {name: getattr(args, name) for name in SETTING_ARGS if hasattr(args, name)}
    if hasattr(args, "attention"):
        given["model_overrides"] = {**given.get("model_overrides", {}), "attention": args.attention}
    try:
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
        from longnet.train.distributed import ParallelSettingsError

        if not isinstance(err, ParallelSettingsError) or os.environ.get("RANK", "0") == "0":
            report_error(err)  # every rank raises the same ParallelSettingsError: rank 0 tells
        return 2
    return 0
