"""The order the Trainer feeds the training samples in: length-grouped batches whose order depends on (seed, epoch)
only, so a resumed run trains on the same batches, and the fixed order `chattune bench` gives every recipe."""

from __future__ import annotations

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler

from chattune.errors import DataError


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """transformers' length-grouped sampler draws each epoch's order from the global RNG, whose state at an epoch
    start differs between an uninterrupted run and a resumed one, so `resume=` would train on other batches.
    Here the order depends on (seed, epoch) only; accelerate calls `set_epoch` at every epoch start."""

    def __init__(self, base: LengthGroupedSampler, seed: int):
        self.__dict__.update(base.__dict__)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return super().__iter__()


class FixedOrderSampler(torch.utils.data.Sampler):
    """Yields the given dataset indices in the given order (`chattune bench`: every recipe sees the same samples in
    the same steps, so their losses and real-token counts are comparable step by step)."""

    def __init__(self, order: list[int]):
        self.order = list(order)

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def fixed_order_sampler(order: list[int], n: int) -> FixedOrderSampler:
    """The fixed order over a dataset of `n` samples; refused where it names a sample the data does not hold."""
    if max(order) >= n:
        raise DataError([f"the fixed sample order needs {max(order) + 1} samples, the data "
                         f"holds {n} after encoding"], "fix: raise data.max_length so no sample is dropped")
    return FixedOrderSampler(order)


def train_sampler(sampler, seed: int):
    """The Trainer's own sampler, with a length-grouped one made to depend on (seed, epoch) only."""
    if isinstance(sampler, LengthGroupedSampler):
        sampler = EpochSeededLengthGroupedSampler(sampler, seed)
    return sampler
