"""The numbers of the LongNet paper (Ding et al., 2023, "LongNet: Scaling Transformers to
1,000,000,000 Tokens"), defined once; presets, defaults, benchmarks and ``longnet plan`` import them.

- The dilated pattern of its language models (section 4): segment lengths ``w`` and dilation
  rates ``r``, trained on sequences of ``PAPER_TRAIN_LENGTH`` tokens and evaluated at
  ``PAPER_EVAL_LENGTHS``.
- The model sizes of its scaling study (GPT-3's shapes, ``layers x width``, ``heads``; the FFN
  is 4 x width).
- The training recipe: AdamW with ``PAPER_BETAS``, weight decay ``PAPER_WEIGHT_DECAY``, peak
  learning rate ``PAPER_LR`` after ``PAPER_WARMUP_STEPS`` warmup steps, batches of
  ``PAPER_BATCH_TOKENS`` tokens (0.5M).
- Its Table 2 (``PAPER_TABLE2``): perplexity at 2K, 8K and 32K of the models it compares, each
  trained at the length in its key.
- ``GPT2_VOCAB``: the paper trains on The Stack without naming its tokenizer; longnet assumes a
  GPT-2-style byte-level BPE of this size.

Pure constants: importing this module imports nothing.
"""

PAPER_SEGMENT_LENGTHS: tuple[int, ...] = (2048, 4096, 8192, 16384, 32768)
PAPER_DILATION_RATES: tuple[int, ...] = (1, 2, 4, 6, 12)
PAPER_TRAIN_LENGTH = 32768
PAPER_EVAL_LENGTHS: tuple[int, ...] = (2048, 8192, 32768)

PAPER_MODEL_SHAPES: dict[str, tuple[int, int, int]] = {
    # name: (layers, width, heads); parameter counts with the (tied) embedding
    "base": (12, 768, 12),  # ~124M
    "350m": (24, 1024, 16),  # ~354M
    "760m": (24, 1536, 16),  # ~757M
    "2.7b": (32, 2560, 32),  # ~2.65B
}

PAPER_LR = 6e-4
PAPER_WARMUP_STEPS = 750
PAPER_BATCH_TOKENS = 524_288
PAPER_BETAS: tuple[float, float] = (0.9, 0.98)
PAPER_WEIGHT_DECAY = 0.01

GPT2_VOCAB = 50257

PAPER_TABLE2: dict[str, dict[int, float]] = {
    "transformer-2048": {2048: 4.24, 8192: 5.07, 32768: 11.29},
    "sparse-8192": {2048: 4.39, 8192: 3.35, 32768: 8.79},
    "longnet-8192": {2048: 4.23, 8192: 3.24, 32768: 3.36},
    "sparse-32768": {2048: 5.15, 8192: 4.00, 32768: 3.64},
    "longnet-32768": {2048: 4.37, 8192: 3.33, 32768: 3.01},
}
