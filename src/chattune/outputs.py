"""The output folder: every file name a run writes, `chattune.json`, what kind of artefact a folder holds,
which checkpoints are complete, what `resume=` points at, and atomic writes.

Every command that reads or writes a run's folder (train, inference/chat, export, eval, serve, compare) goes
through here, so a file name or a rule about folders lives in one place.

transformers' Trainer writes `checkpoint-N/` file by file. A checkpoint counts as complete only once
chattune has written its marker file, last and atomically (temp file + fsync + rename); a crash mid-save leaves
a folder without the marker, which `resume=auto` skips and `resume=PATH` refuses.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path

from chattune.errors import ConfigError

# ---------------------------------------------------------------- file names

INFO_FILE = "chattune.json"  # how to load the folder: base model, method, template, precision
RUN_FILE = "run.json"  # what happened: versions, data hash, steps, loss, time, tokens/s, memory
CONFIG_FILE = "config.yaml"  # the resolved configuration
METRICS_FILE = "metrics.jsonl"  # one JSON line per logging step / evaluation
MARKER = "chattune-complete.json"  # written last into a checkpoint-N/ folder
ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")

# Files written by chattune or the Trainer into a run folder; `overwrite=true` removes exactly these.
RUN_FILES = (CONFIG_FILE, RUN_FILE, METRICS_FILE, INFO_FILE, "adapter_model.safetensors", ADAPTER_CONFIG,
             "model.safetensors", MODEL_CONFIG, "generation_config.json", "training_args.bin",
             "chat_template.jinja")
# Files of a run folder that describe the training, not the model (left out of an export).
TRAINING_ONLY_FILES = {"training_args.bin", METRICS_FILE, "trainer_state.json", "optimizer.pt", "scheduler.pt",
                       "rng_state.pth", MARKER}


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


# ---------------------------------------------------------------- chattune.json


def read_info(folder: str | Path) -> dict:
    """The folder's chattune.json, or its parent's (a checkpoint-N inside a run); {} for a plain model folder."""
    folder = Path(folder)
    for candidate in (folder / INFO_FILE, folder.parent / INFO_FILE):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text(encoding="utf-8"))
            except ValueError:
                raise ConfigError(f"{candidate}: not valid JSON; it describes how to load this run "
                                  "(base_model, method, template): restore it or re-run training") from None
    return {}


def write_info(folder: str | Path, info: dict) -> None:
    atomic_write_text(Path(folder) / INFO_FILE, json.dumps(info, indent=2) + "\n")


# ---------------------------------------------------------------- what a folder holds

ADAPTER, FULL_MODEL, NOT_A_MODEL = "adapter", "full model", "not a model"


def artefact_kind(folder: str | Path) -> str:
    """`adapter` (a peft adapter: LoRA/QLoRA/P-tuning v2 run, its checkpoints, a copied prefix export), `full model`
    (a Freeze/full run, an export, any HF model folder), or `not a model`."""
    folder = Path(folder)
    if (folder / ADAPTER_CONFIG).is_file():
        return ADAPTER
    if (folder / MODEL_CONFIG).is_file():
        return FULL_MODEL
    return NOT_A_MODEL


def is_checkpoint(folder: str | Path) -> bool:
    return bool(_CKPT.match(Path(folder).name))


def is_finished_run(folder: str | Path) -> bool:
    """A training run that ended (its run.json is written at the very end) and was not stopped early."""
    path = Path(folder) / RUN_FILE
    if not path.is_file() or artefact_kind(folder) == NOT_A_MODEL:
        return False
    try:
        return not json.loads(path.read_text(encoding="utf-8")).get("stopped_early", False)
    except ValueError:
        return False


@contextlib.contextmanager
def atomic_folder(out: str | Path, prefix: str = "tmp"):
    """Yield a new empty folder beside `out` to write into; on success it becomes `out` (which must be absent or an
    empty folder: the caller checks), on any error it is removed, so `out` is either complete or absent."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_folder(out.parent, f".{out.name}.{prefix}-")
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _new_folder(parent: Path, prefix: str) -> Path:
    """A new empty folder `parent/prefix<random>`, made as os.makedirs makes one (mode 0o777 less the umask; a
    tempfile.mkdtemp folder is 0o700, which the renamed output would keep)."""
    return _create_unique(parent, prefix, lambda path: path.mkdir())[0]


def _create_unique(parent: Path, prefix: str, create):
    """(path, create(path)) for the first free name `parent/prefix<random>` (`create` raises FileExistsError for a
    taken one)."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            return path, create(path)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name {prefix}* in {parent}")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, fsync it and rename it to `path`. The file gets the mode a
    plain open() gives (0o666 less the umask; a tempfile.mkstemp file is 0o600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd = _create_unique(path.parent, f".{path.name}.",
                             lambda p: os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
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
    """`auto` -> latest complete checkpoint (None if there is none), a step number, or a checkpoint path; anything
    that is not a complete checkpoint is refused with the reason and the complete checkpoints there are."""
    if resume in (None, "", False):
        return None
    done = complete_checkpoints(output_dir)
    if resume == "auto":
        return done[-1][1] if done else None
    have = ", ".join(str(p) for _, p in done) or "none"
    if isinstance(resume, int) or (isinstance(resume, str) and resume.isdigit()):
        step = int(resume)
        for s, path in done:
            if s == step:
                return path
        raise ConfigError(f"resume={step}: no complete {checkpoint_name(step)} in {output_dir} "
                          f"(complete checkpoints: {have})")
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(f"resume={resume}: no such checkpoint folder (complete checkpoints in {output_dir}: {have})")
    if not (path / MARKER).is_file():
        missing = [n for n in ("trainer_state.json", "optimizer.pt") if not (path / n).is_file()]
        why = f"missing {', '.join(missing)}" if missing else f"its completion marker {MARKER} was never written"
        raise ConfigError(f"resume={resume}: not a complete checkpoint ({why}: the save was interrupted, so its "
                          f"optimizer state cannot be trusted). Complete checkpoints in {output_dir}: {have}; "
                          "use resume=auto for the latest of them")
    return path


def rotate_checkpoints(output_dir: str | Path, limit: int | None, keep: str | Path | None = None) -> None:
    """`train.save_total_limit`: keep the newest `limit` complete checkpoints (and `keep`, the best one); remove
    older ones and incomplete leftovers older than the newest complete one. Never removes the newest complete
    checkpoint, so there is always one to resume from."""
    if not limit:
        return
    done = complete_checkpoints(output_dir)
    if not done:
        return
    keep_paths = {p for _, p in done[-limit:]} | ({Path(keep)} if keep else set())
    newest = done[-1][0]
    for child in Path(output_dir).iterdir():
        m = _CKPT.match(child.name)
        if not m or not child.is_dir() or child in keep_paths or int(m.group(1)) >= newest:
            continue
        shutil.rmtree(child, ignore_errors=True)


def holds_a_run(output_dir: str | Path) -> bool:
    root = Path(output_dir)
    return root.is_dir() and any((root / name).exists() for name in (CONFIG_FILE, RUN_FILE, METRICS_FILE)) or \
        bool(complete_checkpoints(output_dir))


def clear_run(output_dir: str | Path) -> None:
    """`overwrite=true`: remove a previous run's files (only the ones chattune writes)."""
    root = Path(output_dir)
    for child in root.iterdir() if root.is_dir() else []:
        if _CKPT.match(child.name) or child.name.startswith(".checkpoint"):
            shutil.rmtree(child, ignore_errors=True)
        elif child.name in RUN_FILES:
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
