"""How a training run stops short, as errors that say what happened, what was kept and what to change: out of memory
(with `chattune estimate`'s figure), a file that could not be written, a non-finite loss, a Ctrl-C."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from chattune import outputs
from chattune.errors import ChattuneError, DataError

if TYPE_CHECKING:
    from chattune.train.trainer import PreparedRun


def last_checkpoint_note(out: Path) -> str:
    done = outputs.complete_checkpoints(out)
    return f"the last complete checkpoint is {done[-1][1]}" if done else "there is no complete checkpoint yet"


class TrainingInterrupted(ChattuneError):
    """Ctrl-C: a checkpoint of the step reached was saved first; the exit status is the shell's for SIGINT."""

    exit_code = 130


class OutOfMemory(ChattuneError):
    """Out of GPU memory or CPU RAM, with the changes that need less (and what `chattune estimate` says)."""

    def __init__(self, run: PreparedRun, error: BaseException):
        t, d = run.cfg.train, run.cfg.data
        where = "GPU" if run.device == "cuda" else "CPU RAM"
        advice = [f"train.batch_size={max(1, t.batch_size // 2)} train.grad_accum={t.grad_accum * 2} (same "
                  "effective batch)", f"data.max_length={max(8, d.max_length // 2)}"]
        if not t.gradient_checkpointing and run.method.supports_packing:
            advice.append("train.gradient_checkpointing=true")
        if run.device == "cuda" and run.method.base_weight_bits(run.cfg) is None:
            advice.append("method=qlora (a 4-bit base)")
        super().__init__(f"training ran out of memory ({where}: {str(error).splitlines()[0][:200]}); "
                         f"{last_checkpoint_note(run.output_dir)}.{_estimate_note(run)}\nfix: try "
                         + ", or ".join(advice) + "; then resume=auto (`chattune estimate` with the same settings "
                         "shows what each change saves)")


def _estimate_note(run: PreparedRun) -> str:
    """`chattune estimate`'s figure for this run, for the out-of-memory message (empty if it cannot say)."""
    try:
        from chattune.estimate import estimate

        e = estimate(run.cfg, log=lambda m: None) if run.device == "cpu" else \
            estimate(run.cfg, gpus=max(1, torch.cuda.device_count()), log=lambda m: None)
        return f" chattune estimate puts this run at {e.total_bytes / 2**30:.1f} GiB per device."
    except Exception:  # noqa: BLE001 - the estimate is a hint; never let it hide the real error
        return ""


def write_failed(run: PreparedRun, e: OSError) -> ChattuneError:
    """A file of the run could not be written (disk full, permissions): the last complete checkpoint is intact."""
    return ChattuneError(f"training stopped: a file could not be written ({e.strerror or e}: "
                         f"{e.filename or 'in ' + str(run.output_dir)}); {last_checkpoint_note(run.output_dir)}, "
                         "and it is intact.\nfix: free disk space (or choose another output_dir=), then run "
                         "the same command with resume=auto")


def nonfinite_loss(run: PreparedRun, step: int, sources: list[str]) -> DataError:
    """The loss became NaN/inf at `step` (train.on_nan=stop), in the batch of records `sources`."""
    records = ", ".join(sources[:10]) + (" ..." if len(sources) > 10 else "")
    return DataError([f"training stopped: the loss became non-finite (NaN/inf) at step {step}"
                      + (f", in the batch of records {records}" if records else "")
                      + f"; this step was not saved and {last_checkpoint_note(run.output_dir)}"],
                     "fix: lower train.lr, use train.precision=fp32, check those records, or set "
                     "train.on_nan=skip to drop such batches; then resume=auto")
