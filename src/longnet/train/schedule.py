"""Learning-rate schedule: linear warmup, then cosine or linear decay to a floor.

A pure function of the step, so a resumed run sees exactly the rates of an uninterrupted one.
"""

from __future__ import annotations

import math

DECAYS = ("cosine", "linear", "constant")


def learning_rate(
    step: int,
    *,
    peak_lr: float,
    warmup_steps: int,
    decay_steps: int,
    decay: str = "cosine",
    min_lr_ratio: float = 0.1,
) -> float:
    """The learning rate of optimizer step ``step`` (0-based).

    Steps ``0 .. warmup_steps - 1`` ramp linearly from ``peak_lr / warmup_steps`` to ``peak_lr``;
    then the rate decays (``"cosine"`` or ``"linear"``) from ``peak_lr`` to
    ``min_lr_ratio * peak_lr`` at step ``decay_steps`` and stays there (``"constant"`` keeps
    ``peak_lr``).
    """
    if decay not in DECAYS:
        raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps < 0 or decay_steps < 1:
        raise ValueError(f"need warmup_steps >= 0 and decay_steps >= 1, got {warmup_steps}, {decay_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if decay == "constant":
        return peak_lr
    span = max(1, decay_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if decay == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        factor = 1.0 - progress
    return peak_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * factor)
