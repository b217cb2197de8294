"""The review's defects and the seams: each test here failed before its fix.

- warmup_ratio is a ratio; resume=PATH refuses a half-written checkpoint; a resumed run keeps its precision;
- the per-step accounting follows the Trainer's steps when an epoch's last step has fewer micro-batches;
- methods come from one registry; train() runs in phases; one module owns the output folder;
- a plain (non-editable) install runs `chattune train lora` from any directory.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import TrainerCallback

import chattune
from chattune import hardware, outputs
from chattune.config import RunConfig, load_config
from chattune.errors import ConfigError
from chattune.methods import REGISTRY
from chattune.train.options import TrainOptions
from chattune.train.trainer import train
from tiny import make_tiny_llama, write_jsonl

WORDS = ["apple", "pear", "plum", "fig", "kiwi"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("seams")
    model = make_tiny_llama(root / "model")
    data = write_jsonl(root / "data.jsonl", [{"instruction": f"repeat {w}", "output": f"{w} {w}"} for w in WORDS])
    return model, data


def run(tiny, out, *overrides, options=None, log=None):
    model, data = tiny
    cfg = load_config(None, [f"model={model}", f"data.train={data}", f"output_dir={out}", "train.logging_steps=1",
                             "train.batch_size=1", "train.lr=1e-3", *overrides])
    return train(cfg, log=log or (lambda m: None), options=options)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- defects


def test_warmup_ratio_is_a_ratio_of_the_run(tiny, tmp_path):
    # linear schedule with warmup over the whole run: the lr rises by lr/4 per step (transformers alone would read
    # warmup_steps=1.0 as one step: 0, lr, 0.75 lr, ...)
    out = tmp_path / "run"
    run(tiny, out, "train.max_steps=4", "train.warmup_ratio=1.0", "train.scheduler=linear", "train.precision=fp32")
    assert [round(r["lr"], 12) for r in metrics(out)] == [0.0, 2.5e-4, 5e-4, 7.5e-4]


def test_resume_path_refuses_a_half_written_checkpoint(tiny, tmp_path):
    out = tmp_path / "run"
    run(tiny, out, "train.max_steps=4", "train.save_steps=2", "train.precision=fp32")
    half = out / "checkpoint-4"
    (half / outputs.MARKER).unlink()
    (half / "optimizer.pt").unlink()
    with pytest.raises(ConfigError) as e:
        run(tiny, out, "train.max_steps=4", f"resume={half}", "train.precision=fp32")
    message = str(e.value)
    assert "not a complete checkpoint (missing optimizer.pt" in message
    assert f"Complete checkpoints in {out}: {out / 'checkpoint-2'}" in message
    (half / "optimizer.pt").write_bytes(b"")  # all files there, but the marker never written: still refused
    with pytest.raises(ConfigError, match="completion marker chattune-complete.json was never written"):
        run(tiny, out, "train.max_steps=4", f"resume={half}", "train.precision=fp32")
    assert outputs.resolve_resume(out, str(out / "checkpoint-2")) == out / "checkpoint-2"


def test_resumed_run_keeps_its_recorded_precision(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("CHATTUNE_CPU_KIND", "other")  # a CPU without x86 bf16 flags, where the timed probe decides
    monkeypatch.setattr(hardware, "cpu_bf16_speedup", lambda: 5.0)  # a quiet machine with fast bf16
    logs: list[str] = []
    run(tiny, out, "train.max_steps=4", "train.save_steps=2", "train.stop_after=2", log=logs.append)
    assert "precision: bf16 (bf16 matmul measured 5.0x fp32 on this CPU)" in logs
    assert json.loads((out / "chattune.json").read_text())["precision"] == "bf16"
    monkeypatch.setattr(hardware, "cpu_bf16_speedup", lambda: 0.5)  # the same machine, busy: the probe says fp32
    logs.clear()
    result = run(tiny, out, "train.max_steps=4", "train.save_steps=2", "resume=auto", log=logs.append)
    assert "precision: bf16 (recorded by the run being resumed)" in logs
    assert result.run.precision == "bf16"
    assert json.loads((out / "run.json").read_text())["precision"] == "bf16"


def test_step_accounting_follows_trainer_steps_with_a_short_last_step(tiny, tmp_path):
    # 5 samples, batch 1, grad_accum 2: each epoch has steps of 2, 2 and 1 micro-batches. The per-step trained
    # tokens the NaN guard reads must equal the ones metrics.jsonl logs for that step (logging every step).
    seen: dict[int, int] = {}

    class Record(TrainerCallback):
        accounting = None

        def on_step_end(self, args, state, control, **kw):
            seen[state.global_step] = self.accounting.step_trained

    record = Record()
    out = tmp_path / "run"
    model, data = tiny
    cfg = load_config(None, [f"model={model}", f"data.train={data}", f"output_dir={out}", "train.logging_steps=1",
                             "train.batch_size=1", "train.grad_accum=2", "train.epochs=2", "train.precision=fp32",
                             "data.packing=false", "train.group_by_length=false"])
    from chattune.train import trainer as trainer_module

    run_ = trainer_module.prepare(cfg, log=lambda m: None)
    tr = trainer_module.build_trainer(run_, trainer_module.training_arguments(run_), TrainOptions(callbacks=(record,)))
    record.accounting = tr.accounting
    trainer_module.fit(run_, tr, log=lambda m: None)
    logged = {r["step"]: r["trained_tokens"] for r in metrics(out) if "trained_tokens" in r}
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    assert seen == logged


# ---------------------------------------------------------------- seams


def test_methods_and_their_sections_come_from_the_registry():
    assert set(REGISTRY) == {"lora", "qlora", "prefix", "freeze", "full"}
    fields = RunConfig.model_fields
    assert set(fields["method"].annotation.__args__) == set(REGISTRY)
    for method in REGISTRY.values():
        if method.section:
            assert fields[method.section].annotation is method.config_class
        assert isinstance(method.supports_packing, bool) and isinstance(method.saves_full_model, bool)
    assert [m for m in REGISTRY.values() if m.saves_full_model] == [REGISTRY["freeze"], REGISTRY["full"]]


def test_no_method_name_is_hard_coded_outside_the_methods():
    """train/, inference.py, export.py, estimate.py and the commands ask the Method object, never compare a
    method's name."""
    src = Path(chattune.__file__).parent
    files = [*sorted((src / "train").glob("*.py")), src / "inference.py", src / "export.py", src / "estimate.py",
             *sorted((src / "commands").glob("*.py"))]
    offenders = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in REGISTRY:
                offenders.append(f"{path.name}:{node.lineno}: {node.value!r}")
    assert offenders == []


def test_train_returns_the_prepared_run(tiny, tmp_path):
    result = run(tiny, tmp_path / "run", "train.max_steps=1", "train.precision=fp32")
    prepared = result.run
    assert prepared.method is REGISTRY["lora"] and prepared.packing is True
    assert prepared.model.peft_config["default"].r == 8  # the trained model itself, not a reload
    assert result.steps == 1 and result.final_loss == metrics(tmp_path / "run")[-1]["loss"]
    assert result.tokens_per_s > 0


def test_output_folder_kinds(tiny, tmp_path):
    out = tmp_path / "run"
    run(tiny, out, "train.max_steps=2", "train.save_steps=1", "train.precision=fp32")
    assert outputs.artefact_kind(out) == outputs.ADAPTER and outputs.is_finished_run(out)
    assert outputs.artefact_kind(out / "checkpoint-1") == outputs.ADAPTER and outputs.is_checkpoint(out / "checkpoint-1")
    assert outputs.read_info(out / "checkpoint-1")["method"] == "lora"  # a checkpoint reads its run's info
    assert outputs.artefact_kind(tiny[0]) == outputs.FULL_MODEL and outputs.read_info(tiny[0]) == {}
    assert outputs.artefact_kind(tmp_path) == outputs.NOT_A_MODEL and not outputs.is_finished_run(tmp_path)


def test_help_lists_every_command_module():
    from chattune.commands import COMMANDS

    r = subprocess.run([sys.executable, "-m", "chattune", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for name in COMMANDS:
        module = __import__(f"chattune.commands.{name}", fromlist=["HELP"])
        assert name in r.stdout and module.HELP.split()[0] in r.stdout


def test_shipped_yaml_files_hold_only_what_differs_from_the_defaults():
    from chattune.config import read_yaml_config
    from chattune.shipped import SHIPPED_CONFIGS

    defaults = RunConfig().model_dump(mode="json")

    def same_as_default(raw: dict, base: dict, path: str = "") -> list[str]:
        found = []
        for key, value in raw.items():
            if isinstance(value, dict):
                found += same_as_default(value, base.get(key, {}), f"{path}{key}.")
            elif key in base and base[key] == value and key not in ("trainable_layers", "num_virtual_tokens",
                                                                   "trainable_modules"):
                found.append(path + key)  # (a few defaults are spelled out on purpose, with a comment)
        return found

    for path in sorted(SHIPPED_CONFIGS.glob("*.yaml")):
        if path.stem.startswith("compare"):
            continue
        assert same_as_default(read_yaml_config(path), defaults) == [], path.name


@pytest.mark.slow
def test_plain_install_runs_from_any_directory(tiny, tmp_path):
    """Build the wheel, install it (not editable) into a fresh virtual environment, and train from elsewhere."""
    repo = Path(__file__).resolve().parents[1]
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(repo)], check=True, timeout=600)
    wheel = next(dist.glob("chattune-*.whl"))
    # The venv gets its own chattune and sees this environment's packages (torch, transformers, ...) through a .pth
    # file that lists this interpreter's site-packages folders, after its own. Not `--system-site-packages`: when
    # the tests themselves run in a venv, that would show the base interpreter's packages, not this venv's.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    own = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True, timeout=120).stdout.strip()
    ours = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    assert ours, sys.path
    (Path(own) / "parent_environment.pth").write_text("".join(p + "\n" for p in ours))
    # --ignore-installed: a chattune installed in the parent environment (e.g. editable) is visible through the .pth
    # and would otherwise count as "already satisfied", leaving the venv without its own copy
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", str(wheel)], check=True,
                   timeout=600)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(py), "-c", "import chattune; print(chattune.__file__)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, timeout=120)
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr
    model, data = tiny
    r = subprocess.run([str(venv / "bin" / "chattune"), "train", "lora", f"model={model}", f"data.train={data}",
                        "train.max_steps=1", "output_dir=out"], cwd=elsewhere, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (elsewhere / "out" / "adapter_model.safetensors").is_file()
    assert json.loads((elsewhere / "out" / "run.json").read_text())["steps"] == 1
