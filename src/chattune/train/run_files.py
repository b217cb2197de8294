"""The files a training run writes into its output_dir (rank 0): config.yaml and chattune.json when it starts (with
metrics.jsonl cut back to a resumed step), then the final model, tokenizer and template files, and run.json."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import Trainer

from chattune import __version__, outputs
from chattune.train.setup import is_main_process

if TYPE_CHECKING:
    from chattune.data.sources import SourceReport
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
        run.method.finish_output(run.model, tmp)  # (LoRA from PiSSA/OLoRA: a plain adapter on the unchanged base)
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
               "data": {**data_sources(cfg.data.train, cfg.data.mix, run.data.sources), "samples": len(run.data.train),
                        "truncated": st.truncated, "dropped": st.dropped, "answers_cut": st.answers_cut,
                        "invalid_skipped": len(run.data.skipped)},
               "steps": result.steps, "final_loss": result.final_loss, "train_seconds": round(seconds, 3),
               "tokens_per_s": round(result.tokens_per_s, 2), "peak_memory_mb": round(result.peak_memory_mb, 1),
               "stopped_early": stopped_early, "model": run.model_path, "nonfinite_batches_skipped": summary_skips,
               "best": best}
    return summary


def data_sources(train, mix: list[float] | None, sources: list[SourceReport]) -> dict:
    """run.json's record of the training data: data.train and data.mix as given, and per source what was read, its
    sha256 (a file's bytes; a folder's: every file's relative path and bytes) or, for a cached dataset id, its
    `datasets` fingerprint, its valid records, weight and how many the mix took. `sha256` is the one source's
    hash, or for several the hash of their hashes in order (the same files give the same value)."""
    records = []
    for s in sources:
        rec = {"source": s.spec, "read": s.name, "kind": s.kind, "format": s.format, "rows": s.rows,
               "invalid": s.invalid, "weight": s.weight, "taken": s.taken}
        rec.update({"fingerprint": s.fingerprint} if s.path is None else {"sha256": hash_path(s.path)})
        records.append(rec)
    if len(records) == 1:
        combined = records[0].get("sha256")
    else:
        digests = [r.get("sha256") or r.get("fingerprint") or "" for r in records]
        combined = hashlib.sha256("\n".join(digests).encode()).hexdigest() if records else None
    return {"train": train, "mix": mix, "sha256": combined, "sources": records}


def hash_path(path: str | Path) -> str | None:
    """sha256 of a file's bytes; of a folder, over its files (sorted): each one's relative path and bytes."""
    p = Path(path)
    if p.is_file():
        return _hash_files([(b"", p)])
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        return _hash_files([(f.relative_to(p).as_posix().encode() + b"\0", f) for f in files])
    return None


def _hash_files(files: list[tuple[bytes, Path]]) -> str:
    h = hashlib.sha256()
    for name, file in files:
        h.update(name)
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _versions() -> dict:
    import peft
    import transformers

    return {"chattune": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "datasets": importlib.metadata.version("datasets"),  # it reads table data (not imported here: slow)
            "numpy": np.__version__}  # its generator draws data.mix
