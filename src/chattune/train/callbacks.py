"""Trainer callbacks: metrics.jsonl, stop-after-step, NaN guard, Ctrl-C, progress bar."""

from __future__ import annotations

import json
import math
import signal
import threading
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback


class MetricsCallback(TrainerCallback):
    """One JSON line per logging step: exact token-weighted loss of the steps since the last line, the learning
    rate used for the last step, real (non-pad) tokens per second, grad norm. Eval results get their own lines.
    The figures come from the log dict, where ChattuneTrainer.log put them for every callback and tracker."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lr = None
        self.last: dict = {}  # the latest training line, for the progress bar

    def on_step_begin(self, args, state, control, lr_scheduler=None, **kw):
        if lr_scheduler is not None:
            self.lr = lr_scheduler.get_last_lr()[0]

    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= state.max_steps:
            control.should_log = True  # the last step always gets a line, whatever logging_steps is
        return control

    def on_log(self, args, state, control, logs=None, **kw):
        if not logs or not args.should_save:  # only the main process writes
            return
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        if "tokens_per_s" in logs:  # a training line
            record.update(loss=logs["loss"], lr=self.lr, tokens=logs["tokens"], tokens_per_s=logs["tokens_per_s"],
                          trained_tokens=logs["trained_tokens"], grad_norm=logs.get("grad_norm"))
            self.last = record
        elif any(k.startswith("eval_") for k in logs):
            record.update({k: v for k, v in logs.items() if k.startswith("eval_")})
        else:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


class StopAfterCallback(TrainerCallback):
    """`train.stop_after=N`: save a checkpoint at step N and stop (the schedule stays that of the full run)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= self.step:
            control.should_save = True
            control.should_log = True
            control.should_training_stop = True
        return control


class NanGuardCallback(TrainerCallback):
    """A non-finite loss: with train.on_nan=stop (the trainer kept the NaN in the step's loss) stop before saving,
    so the last good checkpoint stays the last one; with skip (the trainer dropped the batch) say which records."""

    def __init__(self, accounting, log=print):
        self.accounting = accounting  # the trainer's StepAccounting
        self.log = log
        self.bad_step = None
        self.bad_sources: list[str] = []
        self._reported = 0

    def on_step_end(self, args, state, control, **kw):
        last = self.accounting.step_loss
        if last is not None and not math.isfinite(last):
            self.bad_step = state.global_step
            self.bad_sources = list(self.accounting.step_bad_sources)
            control.should_training_stop = True
            control.should_save = False
        for step, records in self.accounting.skipped_batches[self._reported:]:
            self.log(f"step {step}: non-finite loss in the batch of records {', '.join(records) or '?'}; batch "
                     "skipped (train.on_nan=skip)")
        self._reported = len(self.accounting.skipped_batches)
        return control


class InterruptCallback(TrainerCallback):
    """Ctrl-C (SIGINT): the first one finishes the current optimizer step, saves a checkpoint and stops (the caller
    then exits with 130 and says how to resume); a second one exits at once. A checkpoint cut off that way never
    gets its completion marker, so `resume=auto` cannot pick it."""

    def __init__(self):
        self.interrupted = False
        self._previous = None

    def _handle(self, signum, frame):
        if self.interrupted:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.interrupted = True
        print("\ninterrupt: finishing this step and saving a checkpoint (Ctrl-C again to quit at once)", flush=True)

    def on_train_begin(self, args, state, control, **kw):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def on_step_end(self, args, state, control, **kw):
        if self.interrupted:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kw):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


class QuietProgressCallback(ProgressCallback):
    """transformers' progress bar (step, elapsed, time left), with the latest loss and real tokens/s in the bar
    instead of a printed dict per log step; nothing else reaches the terminal per step (metrics.jsonl has it all)."""

    def __init__(self, metrics: MetricsCallback | None = None):
        super().__init__()
        self.metrics = metrics

    def on_log(self, args, state, control, logs=None, **kw):
        if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
            shown = {"loss": f"{float(logs['loss']):.4f}"}
            rate = (self.metrics.last if self.metrics is not None else {}).get("tokens_per_s")
            if rate is not None:
                shown["tok/s"] = f"{rate:.0f}"
            self.training_bar.set_postfix(shown, refresh=False)
