"""Checkpoint bookkeeping: which checkpoints are complete, what `resume=` points at, atomic file writes.

transformers' Trainer writes `checkpoint-N/` file by file. A checkpoint counts as complete only once
chattune has written its marker file, last and atomically (temp file + fsync + rename); a crash mid-save leaves
a folder without the marker, which `resume=auto` skips.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from chattune.errors import ConfigError

MARKER = "chattune-complete.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def mark_complete(checkpoint: str | Path, step: int) -> None:
    atomic_write_text(Path(checkpoint) / MARKER, json.dumps({"step": step}) + "\n")


def complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    out = []
    root = Path(output_dir)
    if not root.is_dir():
        return out
    for child in root.iterdir():
        m = _CKPT.match(child.name)
        if m and child.is_dir() and (child / MARKER).exists():
            out.append((int(m.group(1)), child))
    return sorted(out)


def resolve_resume(output_dir: str | Path, resume) -> Path | None:
    """`auto` -> latest complete checkpoint (None if there is none), a step number, or a checkpoint path."""
    if resume in (None, "", False):
        return None
    done = complete_checkpoints(output_dir)
    if resume == "auto":
        return done[-1][1] if done else None
    if isinstance(resume, int) or (isinstance(resume, str) and resume.isdigit()):
        step = int(resume)
        for s, path in done:
            if s == step:
                return path
        have = ", ".join(str(s) for s, _ in done) or "none"
        raise ConfigError(f"resume={step}: no complete checkpoint-{step} in {output_dir} (complete checkpoints: {have})")
    path = Path(resume)
    if not (path / MARKER).exists() and not (path / "trainer_state.json").exists():
        raise ConfigError(f"resume={resume}: not a complete checkpoint folder (no {MARKER})")
    return path


def holds_a_run(output_dir: str | Path) -> bool:
    root = Path(output_dir)
    return root.is_dir() and any((root / name).exists() for name in ("config.yaml", "run.json", "metrics.jsonl")) or \
        bool(complete_checkpoints(output_dir))


def clear_run(output_dir: str | Path) -> None:
    """`overwrite=true`: remove a previous run's files (only the ones chattune writes)."""
    root = Path(output_dir)
    for child in root.iterdir() if root.is_dir() else []:
        if _CKPT.match(child.name) or child.name.startswith(".checkpoint"):
            shutil.rmtree(child, ignore_errors=True)
        elif child.name in ("config.yaml", "run.json", "metrics.jsonl", "adapter_model.safetensors", "adapter_config.json",
                            "model.safetensors", "config.json", "chattune.json", "training_args.bin"):
            child.unlink()


def truncate_metrics(path: str | Path, step: int) -> None:
    """Keep the lines of metrics.jsonl up to `step` (a resumed run rewrites what came after its checkpoint)."""
    path = Path(path)
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:
            continue
    atomic_write_text(path, "".join(k + "\n" for k in keep))
