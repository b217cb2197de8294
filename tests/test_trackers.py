"""Experiment trackers (`train.report_to`): real runs of the tiny model report to tensorboard and mlflow, read back
with their own readers (tensorboard's EventAccumulator, mlflow's client); chattune's figures (its exact loss, real
tokens/s, trained tokens) reach them with the Trainer's step numbers and equal metrics.jsonl. wandb and swanlab are
not installed here: their choice is passed to transformers, a missing package is refused before any work, and
wandb's offline rule is checked on the environment it leaves for wandb.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers.integrations import INTEGRATION_TO_CALLBACK, get_reporting_integration_callbacks

from chattune.config import TRACKERS, load_config
from chattune.errors import ConfigError
from chattune.train import trackers
from chattune.train.trainer import prepare, train, training_arguments
from tiny import make_tiny_llama, write_jsonl

WORDS = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "nut"]
FIGURES = ("loss", "tokens_per_s", "trained_tokens", "tokens")  # chattune's, as metrics.jsonl has them
TRACKER_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID",
               "TENSORBOARD_LOGGING_DIR", "WANDB_MODE", "WANDB_DIR", "WANDB_API_KEY", "WANDB_BASE_URL",
               "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "SWANLAB_MODE", "SWANLAB_LOG_DIR")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("trackers")
    model = make_tiny_llama(root / "model")
    data = write_jsonl(root / "data.jsonl", [{"instruction": f"repeat {w}", "output": f"{w} {w}"} for w in WORDS])
    return model, data


def overrides(tiny, out, *extra) -> list[str]:
    model, data = tiny
    return [f"model={model}", f"data.train={data}", f"output_dir={out}", "train.max_steps=3", "train.batch_size=2",
            "train.logging_steps=1", "train.lr=1e-3", "train.precision=fp32", "lora.dropout=0", *extra]


def metrics_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reported(tiny, tmp_path_factory):
    """One run reporting to tensorboard and mlflow (a YAML list), with no tracker variable set by the user."""
    out = tmp_path_factory.mktemp("reported") / "run-a"
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        for key in TRACKER_ENV:
            mp.delenv(key, raising=False)
        train(load_config(None, overrides(tiny, out, "train.report_to=[tensorboard, mlflow]")), log=lines.append)
        left = {key: os.environ.get(key) for key in TRACKER_ENV if key in os.environ}
    return out, lines, left


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("value, expected", [
    (None, []), ("none", []), ("tensorboard", ["tensorboard"]), ("tensorboard, mlflow", ["tensorboard", "mlflow"]),
    ("[wandb, swanlab, wandb]", ["wandb", "swanlab"]), ("null", []),
])
def test_report_to_values(value, expected):
    cfg = load_config(None, [] if value is None else [f"train.report_to={value}"])
    assert cfg.train.report_to == expected


def test_unknown_tracker_is_refused_with_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.report_to=tensorboard,comet"])
    assert "train.report_to: unknown tracker 'comet'; choose none or any of tensorboard, wandb, mlflow, swanlab" \
        in str(e.value)
    with pytest.raises(ConfigError, match="`none` cannot be combined with trackers"):
        load_config(None, ["train.report_to=none,wandb"])


def test_every_offered_tracker_is_a_transformers_integration():
    assert set(TRACKERS) <= set(INTEGRATION_TO_CALLBACK)
    assert set(trackers._PACKAGES) == set(trackers._LOCAL_DEFAULTS) == set(TRACKERS)


def test_choice_and_run_name_are_passed_to_transformers(tiny, tmp_path):
    """wandb and swanlab are not installed here: what chattune hands transformers is what picks their callbacks."""
    out = tmp_path / "my-run"
    run = prepare(load_config(None, overrides(tiny, out)), log=lambda m: None)
    assert training_arguments(run).report_to == []  # the default: none
    chosen = load_config(None, overrides(tiny, out, "train.report_to=wandb,swanlab"))
    args = training_arguments(dataclasses.replace(run, cfg=chosen))  # (prepare would refuse: not installed)
    assert args.report_to == ["wandb", "swanlab"] and args.run_name == "my-run"
    assert get_reporting_integration_callbacks(args.report_to) == [INTEGRATION_TO_CALLBACK["wandb"],
                                                                    INTEGRATION_TO_CALLBACK["swanlab"]]


# ---------------------------------------------------------------- missing packages


@pytest.mark.parametrize("name, modules", [("wandb", ["wandb"]), ("swanlab", ["swanlab"]), ("mlflow", ["mlflow"]),
                                           ("tensorboard", ["tensorboard", "tensorboardX"])])
def test_missing_package_is_refused_before_any_work(tiny, tmp_path, monkeypatch, name, modules):
    for module in modules:  # importlib.util.find_spec (transformers' check) then finds nothing
        monkeypatch.setitem(sys.modules, module, None)
    out = tmp_path / "out"
    cfg = load_config(None, overrides(tiny, out, f"model={tmp_path / 'no-model-here'}", f"train.report_to={name}"))
    with pytest.raises(ConfigError) as e:  # before the model is looked for
        train(cfg, log=lambda m: None)
    assert str(e.value) == (f"train.report_to={name} needs the {name} package, which is not installed: "
                            f"pip install {name} (or drop {name} from train.report_to)")
    assert not out.exists()


def test_mlflow_switched_off_by_its_variable_is_refused(monkeypatch):
    monkeypatch.setenv("DISABLE_MLFLOW_INTEGRATION", "true")
    with pytest.raises(ConfigError, match="DISABLE_MLFLOW_INTEGRATION=true switches transformers' mlflow"):
        trackers.preflight(["tensorboard", "mlflow"])


# ---------------------------------------------------------------- real runs


def test_tensorboard_holds_chattunes_figures_at_the_trainer_steps(reported):
    out, lines, _ = reported
    folders = [p.parent for p in (out / "runs").rglob("events.out.tfevents.*")]
    assert len(folders) == 1  # one writer, under output_dir/runs/<time>_<host>
    events = EventAccumulator(str(folders[0]))
    events.Reload()
    rows = metrics_lines(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for figure in FIGURES:
        scalars = events.Scalars(f"train/{figure}")
        assert [s.step for s in scalars] == [1, 2, 3]
        assert [s.value for s in scalars] == pytest.approx([r[figure] for r in rows], rel=1e-6)  # float32 there
    assert f"tensorboard: event files under {out.resolve() / 'runs'}" in "\n".join(lines)


def test_mlflow_store_under_output_dir_holds_metrics_and_params(reported, monkeypatch):
    out, lines, left = reported
    store = out.resolve() / "mlruns"
    assert any(line.startswith(f"mlflow: runs in {store} (a local file store") for line in lines)
    assert left == {}  # chattune's tracker variables were put back after training
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # reading a file store, as chattune's line says
    client = MlflowClient(tracking_uri=store.as_uri())
    experiments = client.search_experiments()
    found = client.search_runs([e.experiment_id for e in experiments])
    assert len(found) == 1
    run = found[0]
    assert run.info.run_name == "run-a" and run.info.status == "FINISHED"
    assert run.data.params["learning_rate"] == "0.001" and run.data.params["max_steps"] == "3"
    rows = metrics_lines(out)
    for figure in FIGURES:
        history = sorted(client.get_metric_history(run.info.run_id, figure), key=lambda m: m.step)
        assert [m.step for m in history] == [1, 2, 3]
        assert [m.value for m in history] == pytest.approx([r[figure] for r in rows], rel=1e-12)


def test_only_rank_zero_reports_under_ddp(tiny, tmp_path, monkeypatch):
    out = tmp_path / "ddp"
    env = {k: v for k, v in os.environ.items() if k not in TRACKER_ENV}
    cmd = [sys.executable, "-m", "chattune", "train", "--nproc", "2",
           *overrides(tiny, out, "train.report_to=tensorboard,mlflow")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("mlflow: runs in") + r.stdout.count("mlflow: runs in") == 1  # rank 0 speaks
    events = list((out / "runs").rglob("events.out.tfevents.*"))
    assert len(events) == 1
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    rows = metrics_lines(out)
    assert [s.step for s in accumulator.Scalars("train/tokens")] == [r["step"] for r in rows] == [1, 2, 3]
    assert [s.value for s in accumulator.Scalars("train/tokens")] == [r["tokens"] for r in rows]  # both ranks'
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(out.resolve() / "mlruns").as_uri())
    found = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(found) == 1
    assert [m.step for m in client.get_metric_history(found[0].info.run_id, "loss")] == [1, 2, 3]


# ---------------------------------------------------------------- local defaults (the environment left for each)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for key in TRACKER_ENV:
        monkeypatch.delenv(key, raising=False)
    empty = tmp_path / "netrc"
    empty.write_text("")
    monkeypatch.setenv("NETRC", str(empty))  # no `wandb login` entry
    return monkeypatch


def test_wandb_goes_offline_without_a_key(clean_env, tmp_path):
    lines: list[str] = []
    with trackers.tracker_environment(["wandb"], tmp_path / "out", lines.append):
        assert os.environ["WANDB_MODE"] == "offline"
        assert os.environ["WANDB_DIR"] == str((tmp_path / "out").resolve())
    assert lines == [f"wandb: no API key found (WANDB_API_KEY or `wandb login`), so logging offline to "
                     f"{(tmp_path / 'out').resolve() / 'wandb'}; upload later with `wandb sync`, or set "
                     "WANDB_MODE=online"]
    assert "WANDB_MODE" not in os.environ and "WANDB_DIR" not in os.environ  # put back


@pytest.mark.parametrize("how", ["api-key", "netrc", "netrc-own-server", "mode-set"])
def test_wandb_stays_as_the_user_set_it(clean_env, tmp_path, how):
    netrc = tmp_path / "netrc"
    if how == "api-key":
        clean_env.setenv("WANDB_API_KEY", "k" * 40)
    elif how == "netrc":  # what `wandb login` writes
        netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    elif how == "netrc-own-server":
        clean_env.setenv("WANDB_BASE_URL", "https://wandb.example.org")
        netrc.write_text("machine wandb.example.org\n  login user\n  password " + "k" * 40 + "\n")
    else:
        clean_env.setenv("WANDB_MODE", "disabled")
    netrc.chmod(0o600)
    lines: list[str] = []
    with trackers.tracker_environment(["wandb"], tmp_path / "out", lines.append):
        assert os.environ.get("WANDB_MODE") == ("disabled" if how == "mode-set" else None)
    assert lines[0].startswith(f"wandb: mode {'disabled' if how == 'mode-set' else 'online'}, local files in")


def test_mlflow_keeps_the_users_tracking_uri(clean_env, tmp_path):
    uri = (tmp_path / "elsewhere").as_uri()
    clean_env.setenv("MLFLOW_TRACKING_URI", uri)
    lines: list[str] = []
    with trackers.tracker_environment(["mlflow"], tmp_path / "out", lines.append):
        assert os.environ["MLFLOW_TRACKING_URI"] == uri and "MLFLOW_ALLOW_FILE_STORE" not in os.environ
    assert lines == [f"mlflow: runs go to {uri} (MLFLOW_TRACKING_URI)"]


def test_swanlab_logs_under_output_dir_unless_set(clean_env, tmp_path):
    with trackers.tracker_environment(["swanlab"], tmp_path / "out", lambda m: None):
        assert os.environ["SWANLAB_LOG_DIR"] == str((tmp_path / "out").resolve() / "swanlog")
        assert "SWANLAB_MODE" not in os.environ  # swanlab's own mode rules stand
    clean_env.setenv("SWANLAB_LOG_DIR", str(tmp_path / "mine"))
    with trackers.tracker_environment(["swanlab"], tmp_path / "out", lambda m: None):
        assert os.environ["SWANLAB_LOG_DIR"] == str(tmp_path / "mine")
