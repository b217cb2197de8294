"""The per-step numbers of a run: `StepAccounting` (loss and token counts of the training steps, kept by the trainer
and read by the metrics and NaN callbacks) and the number of optimizer steps a run plans."""

from __future__ import annotations

import math
import os

import torch


def planned_steps(train, samples: int) -> int:
    """Optimizer steps of the run: train.max_steps, else the epochs over `samples` at the effective batch (batch x
    accumulation x processes)."""
    per_step = train.batch_size * train.grad_accum * int(os.environ.get("WORLD_SIZE", "1"))
    return train.max_steps if train.max_steps > 0 else math.ceil(math.ceil(samples / per_step) * train.epochs)


class StepAccounting:
    """Loss and token counts of the training steps, kept by the trainer and read by the metrics and NaN callbacks.

    - the window: loss sum, trained and real (non-pad) tokens since the metrics callback last took them;
    - the step: the same for the current optimizer step only, keyed by the Trainer's `global_step` (every
      micro-batch of one optimizer step sees the same value), so it stays right when an epoch's last step has
      fewer micro-batches than `train.grad_accum`;
    - totals over the whole run in this process, and the last window loss that was logged.
    """

    def __init__(self) -> None:
        self.window_loss_sum, self.window_trained, self.window_tokens = 0.0, 0, 0
        self.step_key: int | None = None
        self.step_loss_sum, self.step_trained = 0.0, 0
        self.step_bad_sources: list[str] = []  # records of this step's batches whose loss was not finite
        self.step_nonfinite = False  # a batch of this step had a non-finite loss that was kept (train.on_nan=stop)
        self.total_tokens = self.total_trained = 0
        self.last_logged_loss: float | None = None
        self.skipped_batches: list[tuple[int, list[str]]] = []  # (step, records) dropped by train.on_nan=skip

    def _enter_step(self, global_step: int) -> None:
        if global_step != self.step_key:
            self.step_key, self.step_loss_sum, self.step_trained, self.step_bad_sources = global_step, 0.0, 0, []
            self.step_nonfinite = False

    def add_nonfinite(self, global_step: int, sources: list[str], skipped: bool) -> None:
        """A micro-batch whose loss was NaN/inf; with `skipped` it contributed nothing to the step."""
        self._enter_step(global_step)
        self.step_bad_sources.extend(sources)
        if skipped:
            self.skipped_batches.append((global_step + 1, list(sources)))
        else:
            self.step_nonfinite = True

    def add(self, global_step: int, loss_sum: float, trained: int, real_tokens: int) -> None:
        self._enter_step(global_step)
        self.step_loss_sum += loss_sum
        self.step_trained += trained
        self.window_loss_sum += loss_sum
        self.window_trained += trained
        self.window_tokens += real_tokens
        self.total_tokens += real_tokens
        self.total_trained += trained

    @property
    def step_loss(self) -> float | None:
        """Mean loss per trained token of the optimizer step that ran last (None before the first; NaN when one of
        its batches had a non-finite loss that was not skipped)."""
        if self.step_nonfinite:
            return math.nan
        return self.step_loss_sum / self.step_trained if self.step_trained else None

    def take_window(self, across_ranks: bool = False) -> tuple[float | None, int, int]:
        """(mean loss, real tokens, trained tokens) since the last call, and start a new window. With
        `across_ranks` in a multi-process run, the sums of every rank (a collective: every rank must call it)."""
        loss_sum, trained, tokens = self.window_loss_sum, self.window_trained, self.window_tokens
        if across_ranks and torch.distributed.is_available() and torch.distributed.is_initialized():
            both = torch.tensor([loss_sum, trained, tokens], dtype=torch.float64)
            torch.distributed.all_reduce(both)
            loss_sum, trained, tokens = float(both[0]), int(both[1]), int(both[2])
            self.total_tokens += tokens - self.window_tokens  # totals count every rank's tokens too
        loss = loss_sum / trained if trained else None
        taken = (loss, tokens, trained)
        self.window_loss_sum, self.window_trained, self.window_tokens = 0.0, 0, 0
        if loss is not None:
            self.last_logged_loss = loss
        return taken
