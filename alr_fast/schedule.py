"""Learning-rate schedule of docs/METHOD.md §7.2; the epoch index restarts at 0 in each phase."""
from __future__ import annotations

import math


def learning_rate(
    epoch: int,
    *,
    mode: str = "default",
    start: float = 2e-4,
    end: float = 2e-4,
    base: float = 2e-4,
    warmup_epochs: int = 10,
    steady_epochs: int = 30,
    drop_factor: float = 10.0,
    lower_bound: float = 2e-6,
    epoch_num: int = 200,
) -> float:
    """The learning rate for ``epoch`` (0-based, within its phase); constant within an epoch."""
    if mode == "constant":
        if start != end:
            raise ValueError(f"lr_mode constant needs lr_start == lr_end; got {start} and {end}")
        lr = start
    elif mode == "linear":
        lr = start + (end - start) * epoch / max(epoch_num - 1, 1)
    elif mode == "cosine":
        if not start > end:
            raise ValueError(f"lr_mode cosine needs lr_start > lr_end; got {start} and {end}")
        lr = (start - end) / 2 * math.cos(math.pi * epoch / max(epoch_num - 1, 1)) + (start + end) / 2
    elif mode == "warmup":
        # the seed: min(linear ramp, end) at every epoch, so with start > end the ramp keeps falling
        # below end (to the floor) instead of being held at end
        lr = min(start + (end - start) * epoch / max(warmup_epochs - 1, 1), end)
    elif mode == "default":
        if drop_factor == 0:
            drop_factor = math.exp(steady_epochs / (epoch_num - 2 * warmup_epochs) * math.log(base / lower_bound))
        if epoch < warmup_epochs:
            lr = lower_bound + epoch * (base - lower_bound) / max(warmup_epochs - 1, 1)
        else:
            lr = base / drop_factor ** ((epoch - warmup_epochs) // steady_epochs)
    else:
        raise ValueError(f"unknown lr_mode {mode!r}; use default, constant, linear, cosine or warmup")
    return max(lr, lower_bound)


def schedule_from_config(optim) -> dict:
    """Keyword arguments of ``learning_rate`` from an OptimConfig."""
    return dict(
        mode=optim.lr_mode,
        start=optim.lr_start,
        end=optim.lr_end,
        base=optim.lr_base,
        warmup_epochs=optim.lr_warmup_epochs,
        steady_epochs=optim.lr_steady_epochs,
        drop_factor=optim.lr_drop_factor,
        lower_bound=optim.lr_lower_bound,
        epoch_num=optim.epochs,
    )
