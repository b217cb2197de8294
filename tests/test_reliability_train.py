"""Training survives failures: Ctrl-C, SIGKILL at random moments (during checkpoint writes too), NaN/inf losses,
out of memory, a full disk during a save, and checkpoint rotation. Each ends with a clear message, exit code and
a checkpoint that resumes exactly. Counts are printed (pytest -s shows them; docs/reliability.md quotes them)."""

from __future__ import annotations

import errno
import json
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from chattune import outputs
from chattune.config import load_config
from chattune.errors import ChattuneError, DataError
from chattune.train.options import TrainOptions
from chattune.train.trainer import train
from tiny import make_tiny_llama, write_jsonl

WORDS = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "nut"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliable")
    model = make_tiny_llama(root / "model")
    data = write_jsonl(root / "data.jsonl", [{"instruction": f"repeat {w}", "output": f"{w} {w}"} for w in WORDS])
    return model, data


def overrides(tiny, out, *extra):
    model, data = tiny
    return [f"model={model}", f"data.train={data}", f"output_dir={out}", "train.logging_steps=1",
            "train.batch_size=2", "train.lr=1e-3", "train.precision=fp32", "lora.dropout=0", *extra]


def run(tiny, out, *extra, callbacks=()):
    return train(load_config(None, overrides(tiny, out, *extra)), log=lambda m: None,
                 options=TrainOptions(callbacks=callbacks))


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r.get("loss") is not None}


def cli(tiny, out, *extra) -> list[str]:
    return [sys.executable, "-m", "chattune", "train", *overrides(tiny, out, *extra)]


class Sabotage(TrainerCallback):
    """From optimizer step `at` on (1-based), every forward pass of the base model's head does `action`."""

    def __init__(self, at: int, action):
        self.at, self.action, self.active, self.hooked = at, action, False, False

    def on_train_begin(self, args, state, control, model=None, **kw):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.lm_head.register_forward_hook(lambda module, inputs, output: self.action(output) if self.active else None)

    def on_step_begin(self, args, state, control, **kw):
        self.active = state.global_step + 1 == self.at


def make_nan(output):
    return output * float("nan")


# ---------------------------------------------------------------- NaN / inf


def test_nan_stops_naming_step_and_records_and_keeps_the_last_good_checkpoint(tiny, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(DataError) as e:
        run(tiny, out, "train.max_steps=6", "train.save_steps=2", callbacks=(Sabotage(3, make_nan),))
    message = str(e.value)
    assert "loss became non-finite (NaN/inf) at step 3, in the batch of records" in message
    assert message.count(f"{tiny[1]}:") == 2  # batch_size=2: both records named as file:line
    assert f"the last complete checkpoint is {out / 'checkpoint-2'}" in message and "train.on_nan=skip" in message
    assert [s for s, _ in outputs.complete_checkpoints(out)] == [2]
    print(f"\nreliability: NaN at step 3 stopped the run; records named: {message.count(f'{tiny[1]}:')}")


def test_nan_skip_drops_the_batch_and_finishes(tiny, tmp_path):
    out, logs = tmp_path / "run", []
    cfg = load_config(None, overrides(tiny, out, "train.max_steps=5", "train.on_nan=skip"))
    result = train(cfg, log=logs.append, options=TrainOptions(callbacks=(Sabotage(3, make_nan),)))
    assert result.steps == 5
    skipped = json.loads((out / "run.json").read_text())["nonfinite_batches_skipped"]
    assert [s["step"] for s in skipped] == [3] and len(skipped[0]["records"]) == 2
    assert any(line.startswith("step 3: non-finite loss in the batch of records") for line in logs)
    weights = result.run.model.get_base_model().state_dict()
    assert all(torch.isfinite(w).all() for w in weights.values())  # no NaN reached the weights
    assert all(v == v for v in losses(out).values() if v is not None)


# ---------------------------------------------------------------- out of memory, full disk


def test_out_of_memory_says_what_to_change(tiny, tmp_path):
    def oom(output):
        raise MemoryError("cannot allocate 17179869184 bytes")

    out = tmp_path / "run"
    with pytest.raises(ChattuneError) as e:
        run(tiny, out, "train.max_steps=6", "train.save_steps=2", callbacks=(Sabotage(4, oom),))
    message = str(e.value)
    assert message.startswith("training ran out of memory (CPU RAM: cannot allocate 17179869184 bytes)")
    assert "train.batch_size=1 train.grad_accum=2" in message and "data.max_length=512" in message
    assert "train.gradient_checkpointing=true" in message and f"{out / 'checkpoint-2'}" in message
    assert "chattune estimate puts this run at " in message and " GiB per device" in message


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save

    def save(obj, f, *a, **k):
        if "checkpoint-4" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(ChattuneError) as e:
        run(tiny, out, "train.max_steps=6", "train.save_steps=2")
    message = str(e.value)
    assert "a file could not be written (No space left on device" in message
    assert f"the last complete checkpoint is {out / 'checkpoint-2'}, and it is intact" in message
    monkeypatch.setattr(torch, "save", real_save)
    assert outputs.resolve_resume(out, "auto") == out / "checkpoint-2"
    resumed = run(tiny, out, "train.max_steps=6", "train.save_steps=2", "resume=auto")
    assert resumed.steps == 6


def test_rotation_never_removes_the_only_complete_checkpoint(tiny, tmp_path):
    out = tmp_path / "run"
    run(tiny, out, "train.max_steps=6", "train.save_steps=1", "train.save_total_limit=2")
    assert [s for s, _ in outputs.complete_checkpoints(out)] == [5, 6]
    # a save of step 8 cut off (no marker) after step 7's: rotation keeps the newest complete one
    root = tmp_path / "rot"
    for step, complete in ((3, True), (7, True), (8, False)):
        (root / f"checkpoint-{step}").mkdir(parents=True)
        if complete:
            outputs.mark_complete(root / f"checkpoint-{step}", step)
    outputs.rotate_checkpoints(root, 1)
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-7", "checkpoint-8"]


# ---------------------------------------------------------------- Ctrl-C


def _wait_for_training(proc, out: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().count("\n") >= 3:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("training did not start in time")


def test_ctrl_c_saves_a_checkpoint_exits_130_and_resumes_exactly(tiny, tmp_path):
    steps = ["train.max_steps=300", "train.save_steps=1000"]
    full = tmp_path / "full"
    assert subprocess.run(cli(tiny, full, *steps), capture_output=True, timeout=600).returncode == 0
    out = tmp_path / "run"
    proc = subprocess.Popen(cli(tiny, out, *steps), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_training(proc, out)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "to continue: run the same command with resume=auto" in stderr
    (step, ckpt), = outputs.complete_checkpoints(out)
    assert f"interrupted at step {step}; saved {ckpt}" in stderr and 3 <= step < 300
    r = subprocess.run(cli(tiny, out, *steps, "resume=auto"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = losses(full), losses(out)
    assert sorted(b) == list(range(1, 301))
    assert all(b[s] == pytest.approx(a[s], abs=1e-6) for s in a), "resumed losses differ"
    print(f"\nreliability: Ctrl-C at step {step}: checkpoint saved, exit 130, resumed run equals uninterrupted")


def test_second_ctrl_c_exits_at_once_without_a_pickable_half_checkpoint(tiny, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(cli(tiny, out, "train.max_steps=100000", "train.save_steps=1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_training(proc, out)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr
    picked = outputs.resolve_resume(out, "auto")
    assert picked is None or (picked / outputs.MARKER).is_file() and (picked / "optimizer.pt").is_file()


# ---------------------------------------------------------------- SIGKILL at random moments


RESUMED = re.compile(r"^resuming from (.+) \(step (\d+)\)$", re.M)


def _resumed_step(log: Path) -> int | None:
    """The step this attempt resumed from, once its stderr says so (0: no complete checkpoint, a fresh start)."""
    text = log.read_text(errors="replace")
    if m := RESUMED.search(text):
        assert Path(m.group(1)).name == outputs.checkpoint_name(int(m.group(2))), m.group(0)
        return int(m.group(2))
    return 0 if "resume=auto: no complete checkpoint in" in text else None


def _new_steps(out: Path, after: int, since_ns: int) -> list[int]:
    """Steps past `after` in metrics.jsonl, counted only once this attempt wrote the file (a killed attempt leaves
    lines that the next one cuts back or removes at its start)."""
    path = out / outputs.METRICS_FILE
    try:
        if path.stat().st_mtime_ns < since_ns:
            return []
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    steps = []
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue  # a line being written
    return [s for s in steps if s > after]


def _being_written(out: Path, after: int, since_ns: int) -> Path | None:
    """A checkpoint folder past step `after` without its completion marker, holding a file written since
    `since_ns` (by this attempt: a half-written folder left by an earlier kill is only counted once rewritten)."""
    for folder in out.glob("checkpoint-*"):
        try:
            if int(folder.name.rsplit("-", 1)[1]) > after and not (folder / outputs.MARKER).exists() and \
                    any(f.stat().st_mtime_ns >= since_ns for f in folder.iterdir()):
                return folder
        except (ValueError, OSError):  # rotation removed it meanwhile
            continue
    return None


def _poll(proc, log: Path, found, what: str, every: float = 0.01, timeout: float = 180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (value := found()) is not None:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"training ended (code {proc.returncode}) before {what}: "
                                 f"{log.read_text(errors='replace')[-2000:]}")
        time.sleep(every)
    raise AssertionError(f"no {what} within {timeout}s")


def test_random_kills_resume_from_the_last_complete_checkpoint_exactly(tiny, tmp_path):
    """SIGKILLs at seeded-random moments of a run that checkpoints every step, until at least 10 have landed while
    the killed process was training and at least 1 while it was writing a checkpoint. Each attempt is killed only
    once it has resumed and logged a step of its own; about a third of the kills wait for a checkpoint folder that
    has no completion marker yet, the rest land at a random moment within the next step and its save. After each
    kill the newest complete checkpoint is noted, and the next `resume=auto` must resume from exactly it; the
    finished run's per-step losses equal an uninterrupted run's. Bounded: at most 20 attempts, 10 minutes."""
    total = 20
    steps = [f"train.max_steps={total}", "train.save_steps=1", "train.save_total_limit=3"]
    full = tmp_path / "full"
    ref = subprocess.run(cli(tiny, full, *steps), capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    done = re.search(r"done: (\d+) steps in ([\d.]+)s", ref.stderr)
    cycle = float(done.group(2)) / int(done.group(1))  # seconds per step with its checkpoint save
    out = tmp_path / "run"
    rng = random.Random(1234)
    newest = 0  # the newest complete checkpoint when the next attempt starts (0: none yet)
    kills: list[dict] = []
    resumed_from: list[int] = []
    finished = False
    deadline = time.time() + 600
    for attempt in range(1, 21):
        log = tmp_path / f"attempt-{attempt}.log"
        started = time.time_ns()
        with log.open("w") as err:
            proc = subprocess.Popen(cli(tiny, out, *steps, "resume=auto"), stdout=subprocess.DEVNULL, stderr=err)
        try:
            resumed = _poll(proc, log, lambda: _resumed_step(log), "a resume line")
            assert resumed == newest, (f"attempt {attempt} resumed from step {resumed}; the newest complete "
                                       f"checkpoint after the kill was {newest}")
            resumed_from.append(resumed)
            landed = [k for k in kills if k["training"]]
            if len(landed) >= 10 and any(k["write"] for k in landed) or time.time() > deadline:
                assert proc.wait(timeout=600) == 0, log.read_text(errors="replace")[-2000:]
                finished = True
                break
            assert resumed <= total - 3, "the run came too close to its end before enough kills"
            # this process is training: it has logged a step past the one it resumed from
            _poll(proc, log, lambda: _new_steps(out, resumed, started) or None, "a step of this attempt")
            at_write = rng.random() < 0.3 or (len(landed) >= 9 and not any(k["write"] for k in landed))
            if at_write:  # kill as soon as a checkpoint folder of this attempt is there without its marker
                past = resumed + rng.randint(0, 1)
                _poll(proc, log, lambda: _being_written(out, past, started), "a checkpoint write", every=0.002)
            else:  # a random moment of the next step and its save (at the latest when it is logged)
                t0, delay = time.time(), rng.uniform(0.0, 1.5 * cycle)
                _poll(proc, log, lambda: time.time() - t0 >= delay or
                      max(_new_steps(out, resumed, started), default=0) >= resumed + 2 or None, "the kill moment")
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            newest = max((s for s, _ in outputs.complete_checkpoints(out)), default=0)
            kills.append({"aimed_at_write": at_write, "resumed": resumed, "newest": newest,
                          "training": proc.returncode == -signal.SIGKILL and newest < total,
                          "write": _being_written(out, resumed, started) is not None})
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    landed = [k for k in kills if k["training"]]
    writes = sum(k["write"] for k in landed)
    print(f"\nreliability: {len(kills)} SIGKILLs in {attempt} attempts; {len(landed)} landed while training, "
          f"{writes} of them during a checkpoint write (a checkpoint folder without its marker left behind) and "
          f"{len(landed) - writes} outside one; each resume=auto continued from the newest complete checkpoint "
          f"(steps {resumed_from})")
    assert finished and len(landed) >= 10 and writes >= 1, kills
    a, b = losses(full), losses(out)
    assert sorted(b) == sorted(a) == list(range(1, total + 1))
    assert all(b[s] == pytest.approx(a[s], abs=1e-6) for s in a), "losses after kills differ"
    print(f"reliability: after {len(landed)} kills the finished run's {total} losses equal the uninterrupted run's")


# ---------------------------------------------------------------- contradictions refused before any work


def test_resume_with_another_model_or_method_is_refused(tiny, tmp_path):
    out = tmp_path / "run"
    run(tiny, out, "train.max_steps=4", "train.save_steps=2", "train.stop_after=2")
    other = make_tiny_llama(tmp_path / "other", seed=1)
    with pytest.raises(ChattuneError, match=r"holds a run with another setup \(model_spec was .*, now .*other"):
        train(load_config(None, overrides(tiny, out, "train.max_steps=4", "resume=auto") + [f"model={other}"]),
              log=lambda m: None)
    with pytest.raises(ChattuneError, match="method was 'lora', now 'freeze'"):
        run(tiny, out, "train.max_steps=4", "resume=auto", "method=freeze")


def test_prefix_with_packing_asked_for_is_refused(tiny, tmp_path):
    from chattune.errors import MethodError

    with pytest.raises(MethodError, match="method=prefix cannot pack samples"):
        run(tiny, tmp_path / "run", "method=prefix", "data.packing=true")
    assert not (tmp_path / "run").exists()
    assert run(tiny, tmp_path / "ok", "method=prefix", "train.max_steps=1").steps == 1  # the default pads
