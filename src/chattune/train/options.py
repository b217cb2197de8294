"""`TrainOptions`: the switches `chattune bench` and `compare` set on a run that are not run configuration (a fixed
sample order, padded batches, extra callbacks, the stock-kernel baseline). The recipe (trainer.py) reads them only
where it must, each place marked."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainOptions:
    """Seams for `chattune bench` and `compare`: a fixed sample order, padding of every (unpacked) batch to
    `pad_to` tokens, extra Trainer callbacks, and `baseline=True` for the stock transformers + peft kernels (no
    per-sample packed attention, fast adapter dropout, chunked loss or allocator setting)."""

    sample_order: list[int] | None = None
    pad_to: int | None = None
    callbacks: tuple = ()
    baseline: bool = False
