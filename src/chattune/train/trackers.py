"""Experiment trackers (`train.report_to`): transformers' own integrations (TensorBoardCallback, WandbCallback,
MLflowCallback, SwanLabCallback) do all the reporting; chattune's figures reach them through the Trainer's log dict
(ChattuneTrainer.log). This module only does what those integrations leave to the caller:
- refuse a tracker whose package is missing before any work (its callback would raise when the Trainer is built);
- keep a run's tracker files on this machine and in its output folder unless the user chose otherwise through the
  tracker's own environment variables: wandb logs offline when no API key is found, mlflow writes a local store
  under output_dir. Each choice is printed, and the environment is restored after training.
"""

from __future__ import annotations

import netrc
import os
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from transformers.integrations import is_mlflow_available, is_swanlab_available, is_tensorboard_available, \
    is_wandb_available

from chattune.errors import ConfigError

# tracker: (transformers' own check that its integration can run, the package to install)
_PACKAGES = {
    "tensorboard": (is_tensorboard_available, "tensorboard"),
    "wandb": (is_wandb_available, "wandb"),
    "mlflow": (is_mlflow_available, "mlflow"),
    "swanlab": (is_swanlab_available, "swanlab"),
}


def preflight(report_to: list[str]) -> None:
    """Refuse, before any work, a tracker of `train.report_to` that cannot run here, saying what to install."""
    for name in report_to:
        available, package = _PACKAGES[name]
        if name == "mlflow" and os.environ.get("DISABLE_MLFLOW_INTEGRATION", "").upper() == "TRUE":
            raise ConfigError("train.report_to=mlflow, but DISABLE_MLFLOW_INTEGRATION=true switches transformers' "
                              "mlflow integration off; unset it, or drop mlflow from train.report_to")
        if not available():
            raise ConfigError(f"train.report_to={name} needs the {package} package, which is not installed: "
                              f"pip install {package} (or drop {name} from train.report_to)")


@contextmanager
def tracker_environment(report_to: list[str], output_dir: str | Path, log=print):
    """Set the environment variables of the trackers' local defaults (only those the user has not set) for the
    duration of training, and put the environment back afterwards."""
    out = Path(output_dir).resolve()
    changes: dict[str, str] = {}
    for name in report_to:
        if name in _LOCAL_DEFAULTS:  # transformers may add its own (kubeflow, inside a Kubeflow job)
            changes.update(_LOCAL_DEFAULTS[name](out, log))
    saved = {key: os.environ.get(key) for key in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _tensorboard(out: Path, log) -> dict[str, str]:
    # transformers' TensorBoardCallback writes under output_dir/runs/<time>_<host>, or TENSORBOARD_LOGGING_DIR
    folder = os.environ.get("TENSORBOARD_LOGGING_DIR") or out / "runs"
    log(f"tensorboard: event files under {folder} (view: tensorboard --logdir {folder})")
    return {}


def _mlflow(out: Path, log) -> dict[str, str]:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        log(f"mlflow: runs go to {uri} (MLFLOW_TRACKING_URI)")
        return {}
    # mlflow's own default is a store in the working directory; a run's tracking data belongs with the run.
    # A file store needs no database package, so mlflow-skinny suffices; MLflow 3 keeps file stores only behind
    # MLFLOW_ALLOW_FILE_STORE, which chattune sets because it chose the store.
    store = out / "mlruns"
    log(f"mlflow: runs in {store} (a local file store; set MLFLOW_TRACKING_URI for a server or a database; view: "
        f"MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri {store})")
    env = {"MLFLOW_TRACKING_URI": store.as_uri()}
    if "MLFLOW_ALLOW_FILE_STORE" not in os.environ:
        env["MLFLOW_ALLOW_FILE_STORE"] = "true"
    return env


def wandb_key_found() -> bool:
    """Whether wandb will find credentials: WANDB_API_KEY, an identity token file, or the netrc entry `wandb
    login` writes for the server (WANDB_BASE_URL's host). Read here with the standard library because wandb's own
    lookup is internal API and the package is optional."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _wandb(out: Path, log) -> dict[str, str]:
    env = {} if os.environ.get("WANDB_DIR") else {"WANDB_DIR": str(out)}
    folder = Path(env.get("WANDB_DIR") or os.environ["WANDB_DIR"]) / "wandb"
    if os.environ.get("WANDB_MODE") is None and not wandb_key_found():
        env["WANDB_MODE"] = "offline"
        log(f"wandb: no API key found (WANDB_API_KEY or `wandb login`), so logging offline to {folder}; upload "
            "later with `wandb sync`, or set WANDB_MODE=online")
    else:
        log(f"wandb: mode {os.environ.get('WANDB_MODE', 'online')}, local files in {folder}")
    return env


def _swanlab(out: Path, log) -> dict[str, str]:
    env = {} if os.environ.get("SWANLAB_LOG_DIR") else {"SWANLAB_LOG_DIR": str(out / "swanlog")}
    folder = env.get("SWANLAB_LOG_DIR") or os.environ["SWANLAB_LOG_DIR"]
    mode = os.environ.get("SWANLAB_MODE")
    log(f"swanlab: mode {mode or 'as swanlab decides (SWANLAB_MODE=offline keeps the run on this machine)'}, "
        f"local logs in {folder}")
    return env


_LOCAL_DEFAULTS = {"tensorboard": _tensorboard, "mlflow": _mlflow, "wandb": _wandb, "swanlab": _swanlab}
