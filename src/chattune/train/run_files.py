"""The files a training run writes into its output_dir (rank 0): config.yaml and chattune.json when it starts (with
metrics.jsonl cut back to a resumed step), then the final model, tokenizer and template files, and run.json."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import Trainer

from chattune import __version__, outputs
from chattune.train.setup import is_main_process

if TYPE_CHECKING:
    from chattune.train.hf_trainer import ChattuneTrainer
    from chattune.train.trainer import PreparedRun, TrainResult


def start_output_dir(run: PreparedRun, log=print) -> None:
    """Write the run's config and chattune.json, and cut metrics.jsonl back to the resumed step (rank 0 only)."""
    if not is_main_process():
        return
    out = run.output_dir
    out.mkdir(parents=True, exist_ok=True)
    outputs.atomic_write_text(out / outputs.CONFIG_FILE, run.cfg.to_yaml())
    metrics_path = out / outputs.METRICS_FILE
    if run.resume_from is not None:
        step = json.loads((run.resume_from / "trainer_state.json").read_text())["global_step"]
        outputs.truncate_metrics(metrics_path, step)
        log(f"resuming from {run.resume_from} (step {step})")
    else:
        if run.cfg.resume == "auto":
            log(f"resume=auto: no complete checkpoint in {out}, starting from step 0")
        metrics_path.unlink(missing_ok=True)
    outputs.write_info(out, {"chattune_version": __version__, "base_model": run.model_path,
                             "model_spec": run.cfg.model.path, "trust_remote_code": run.cfg.model.trust_remote_code,
                             "revision": run.cfg.model.revision,
                             "method": run.cfg.method, "template": run.cfg.template,
                             "full_model": run.method.saves_full_model, "precision": run.precision})


def save_final(trainer: Trainer, run: PreparedRun) -> None:
    """Write the final adapter/model, the tokenizer and the files that make other tools prompt and stop as chattune
    does (chat_template.jinja; generation_config.json's eos for a full model) into a temp folder, then move the
    files into place."""
    from chattune.data.template_files import write_generation_config, write_template_files

    if not trainer.args.should_save:
        if trainer.is_deepspeed_enabled:  # ZeRO-3 gathers the weights on save: every rank must take part
            trainer.save_model(None)  # (only rank 0 writes; the Trainer's default output_dir is never used here)
        return
    out = run.output_dir
    tmp = Path(tempfile.mkdtemp(prefix=".final-", dir=out))
    try:
        trainer.save_model(str(tmp))
        run.tokenizer.save_pretrained(str(tmp))
        write_template_files(tmp, run.template, run.tokenizer)
        if run.method.saves_full_model:
            write_generation_config(tmp, run.template, run.tokenizer)
        for f in tmp.iterdir():
            target = out / f.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(f, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def best_checkpoint(run: PreparedRun, trainer: ChattuneTrainer) -> dict | None:
    """With train.load_best: which evaluated checkpoint won (the Trainer has loaded it back at the end)."""
    state = trainer.state
    if not run.cfg.train.load_best or not state.best_model_checkpoint:
        return None
    step = int(Path(state.best_model_checkpoint).name.rsplit("-", 1)[1])
    return {"step": step, "metric": run.cfg.train.best_metric, "value": state.best_metric,
            "checkpoint": state.best_model_checkpoint}


def run_summary(run: PreparedRun, result: TrainResult, best: dict | None, skipped_batches: list) -> dict:
    """run.json: what happened (versions, seed, device and precision, packing, parameters, the data and its hash,
    steps, loss, time, tokens/s, peak memory, skipped batches, the best checkpoint)."""
    cfg, seconds, stopped_early = run.cfg, result.train_seconds, result.stopped_early
    st = run.data.stats
    if skipped_batches:
        summary_skips = [{"step": step, "records": records} for step, records in skipped_batches]
    else:
        summary_skips = []
    summary = {"versions": _versions(), "seed": cfg.train.seed, "device": run.device, "precision": run.precision,
               "precision_reason": run.precision_reason, "packing": run.packing, "method": cfg.method,
               "trainable_params": run.trainable_params, "total_params": run.total_params,
               "trainable_percent": 100 * run.trainable_params / run.total_params,
               "data": {"train": cfg.data.train, "sha256": _hash_file(cfg.data.train), "samples": len(run.data.train),
                        "truncated": st.truncated, "dropped": st.dropped, "answers_cut": st.answers_cut,
                        "invalid_skipped": len(run.data.skipped)},
               "steps": result.steps, "final_loss": result.final_loss, "train_seconds": round(seconds, 3),
               "tokens_per_s": round(result.tokens_per_s, 2), "peak_memory_mb": round(result.peak_memory_mb, 1),
               "stopped_early": stopped_early, "model": run.model_path, "nonfinite_batches_skipped": summary_skips,
               "best": best}
    return summary


def _hash_file(path: str) -> str | None:
    p = Path(path)
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict:
    import peft
    import transformers

    return {"chattune": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}
