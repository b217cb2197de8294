"""`key=value` overrides on `eval` and `serve`: the same machinery and errors as `train` (did-you-mean, type and
range errors, exit 2, no traceback); keys that do nothing for the command are refused with the ones that apply;
overrides start from the run's recorded config and reach the loaded model. And `bench`'s default data path is
looked up from the current directory, never from the checkout."""

from __future__ import annotations

import json

import pytest
import torch

from chattune.cli import build_parser, main
from chattune.commands import serve as serve_command
from chattune.hardware import resolve_precision, torch_dtype
from tiny import make_tiny_llama, write_jsonl

# Encoded with the tiny model's own (jinja, "You are tiny.") template: 52, 68 and 108 tokens.
RECORDS = [{"instruction": "say " + "x" * n, "output": "y" * n} for n in (2, 10, 30)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("overrides")
    return root, make_tiny_llama(root / "model"), write_jsonl(root / "test.jsonl", RECORDS)


@pytest.fixture(scope="module")
def run(tiny):
    """A one-step LoRA run that recorded data.max_length=80 and data.truncation=drop in its config.yaml."""
    root, model, data = tiny
    out = root / "run"
    assert main(["train", f"model={model}", f"data.train={data}", f"output_dir={out}", "train.max_steps=1",
                 "data.max_length=80", "data.truncation=drop", "train.precision=fp32"]) == 0
    return out


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ")
    return err


def _eval(argv, out) -> dict:
    assert main(["eval", *argv, "--out", str(out)]) == 0
    return json.loads((out / "metrics.json").read_text())


# ---------------------------------------------------------------- errors: the same as train's


@pytest.mark.parametrize("command", ["eval", "serve"])
def test_an_unknown_key_gets_trains_did_you_mean_error(tiny, capsys, command):
    _, model, data = tiny
    extra = ["--data", str(data)] if command == "eval" else []
    err = _error(capsys, [command, "--model", str(model), *extra, "train.lrate=1"])
    assert "unknown config key `train.lrate`; did you mean `train.lr`?" in err
    err = _error(capsys, [command, "--model", str(model), *extra, "data.max_lenght=64"])
    assert "unknown config key `data.max_lenght`; did you mean `data.max_length`?" in err
    assert _error(capsys, ["train", "train.lrate=1"]).splitlines()[0] == \
        "error: unknown config key `train.lrate`; did you mean `train.lr`?"  # word for word the same


def test_wrong_types_and_ranges_name_the_key(tiny, capsys):
    _, model, data = tiny
    err = _error(capsys, ["eval", "--model", str(model), "--data", str(data), "--metrics", "loss", "data.max_length=4"])
    assert "config key `data.max_length`: Input should be greater than or equal to 8 (got 4)" in err
    err = _error(capsys, ["eval", "--model", str(model), "--data", str(data), "data.truncation=middle"])
    assert "config key `data.truncation`" in err and "'prompt', 'right', 'drop' or 'error'" in err
    err = _error(capsys, ["serve", "--model", str(model), "train.precision=fp64"])
    assert "config key `train.precision`: Input should be 'auto', 'fp32', 'bf16' or 'fp16' (got 'fp64')" in err


def test_keys_that_do_nothing_for_the_command_are_refused_with_the_ones_that_apply(tiny, capsys):
    _, model, data = tiny
    err = _error(capsys, ["eval", "--model", str(model), "--data", str(data), "train.lr=1e-4"])
    assert "`train.lr` has no effect on `chattune eval`; the keys that apply: template, model.trust_remote_code, " \
           "train.precision, data.format, data.skip_invalid, data.system, data.columns, data.max_length, " \
           "data.truncation, data.train_on" in err
    err = _error(capsys, ["eval", "--model", str(model), "--data", str(data), f"data.train={data}"])
    assert "`data.train` has no effect on `chattune eval`; give the file with --data" in err
    err = _error(capsys, ["serve", "--model", str(model), "data.max_length=512"])
    assert "`data.max_length` has no effect on `chattune serve`; the keys that apply: template, " \
           "model.trust_remote_code, train.precision" in err
    err = _error(capsys, ["serve", "model=bundled"])
    assert "`model` has no effect on `chattune serve`; give the model with --model or --adapter" in err
    # the loss metric's keys without the loss metric would change nothing
    err = _error(capsys, ["eval", "--model", str(model), "--data", str(data), "data.max_length=64"])
    assert "data.max_length: only the loss metric encodes whole records" in err and "add loss to --metrics" in err


# ---------------------------------------------------------------- overrides reach the loaded run


def test_eval_starts_from_the_runs_recorded_config_and_overrides_change_the_loss(run, tiny, tmp_path):
    _, model, data = tiny
    recorded = _eval(["--adapter", str(run), "--data", str(data), "--metrics", "loss"], tmp_path / "a")
    assert (recorded["max_length"], recorded["truncation"]) == (80, "drop")  # from the run's config.yaml
    ckpt = _eval(["--adapter", str(run / "checkpoint-1"), "--data", str(data), "--metrics", "loss"], tmp_path / "c")
    assert (ckpt["max_length"], ckpt["truncation"]) == (80, "drop")  # a checkpoint's is its run's
    # overrides before or after the flags
    longer = _eval(["data.max_length=128", "--adapter", str(run), "--data", str(data), "--metrics", "loss"],
                   tmp_path / "b")
    assert (longer["max_length"], longer["truncation"]) == (128, "drop")
    assert longer["loss_tokens"] > recorded["loss_tokens"] > 0  # the 108-token record is scored only at 128
    cut = _eval(["--adapter", str(run), "--data", str(data), "--metrics", "loss", "data.max_length=60",
                 "data.truncation=right"], tmp_path / "d")
    assert (cut["max_length"], cut["truncation"]) == (60, "right")
    assert 0 < cut["loss_tokens"] < recorded["loss_tokens"]
    plain = _eval(["--model", str(model), "--data", str(data), "--metrics", "loss"], tmp_path / "e")
    assert (plain["max_length"], plain["truncation"]) == (1024, "prompt")  # no recorded config: the defaults
    assert plain["loss_tokens"] == longer["loss_tokens"]


def test_eval_template_and_system_overrides_change_the_prompt(tiny, tmp_path):
    _, model, data = tiny
    args = ["--model", str(model), "--data", str(data), "--metrics", "exact", "--max-new-tokens", "1"]

    def first_prompt(out) -> str:
        return json.loads((out / "predictions.jsonl").read_text().splitlines()[0])["prompt"]

    assert _eval(args, tmp_path / "own")["template"] == "auto"
    assert first_prompt(tmp_path / "own").startswith("<|im_start|>system\nYou are tiny.<|im_end|>")
    m = _eval([*args, "template=chatml"], tmp_path / "chatml")
    assert m["template"] == "chatml"
    assert first_prompt(tmp_path / "chatml") == "<|im_start|>user\nsay xx<|im_end|>\n<|im_start|>assistant\n"
    assert _eval([*args, "--template", "chatml"], tmp_path / "alias")["template"] == "chatml"  # the old flag
    _eval([*args, "template=chatml", "data.system=be brief"], tmp_path / "system")
    assert first_prompt(tmp_path / "system").startswith("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user")


def test_eval_precision_override_loads_the_model_in_that_dtype(tiny, tmp_path):
    _, model, data = tiny
    args = ["--model", str(model), "--data", str(data), "--metrics", "loss"]
    # the default, --dtype auto: a plain model runs in what training would choose on this CPU (hardware.py)
    assert _eval(args, tmp_path / "a")["precision"] == resolve_precision("auto", "cpu")
    assert _eval([*args, "train.precision=bf16"], tmp_path / "b")["precision"] == "bf16"


def test_serve_overrides_reach_the_loaded_model(run, tiny):
    _, model, _ = tiny

    def load(*argv):
        return serve_command.load(build_parser().parse_args(["serve", *argv]), log=lambda m: None)

    plain = load("--model", str(model))
    assert plain.template.name == "auto"
    assert next(plain.model.parameters()).dtype == torch_dtype(resolve_precision("auto", "cpu"))  # --dtype auto
    tuned = load("--adapter", str(run), "template=chatml", "train.precision=bf16")
    assert tuned.template.name == "chatml" and next(tuned.model.parameters()).dtype == torch.bfloat16
    assert load("--model", str(model), "--template", "chatml").template.name == "chatml"  # the old flag
    # auto: the precision the run trained in (its chattune.json)
    assert next(load("--adapter", str(run), "train.precision=auto").model.parameters()).dtype == torch.float32


# ---------------------------------------------------------------- bench: no dependence on the checkout


def test_bench_default_data_is_looked_up_from_the_current_directory_not_the_checkout(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # no shared/ here nor beside it
    err = _error(capsys, ["bench", "steps=1"])
    assert "bench: data file shared/data/llamafactory/alpaca_en_demo.json not found; give one with data=FILE" in err

    from chattune.bench import DEFAULT_DATA, parse_args

    demo = tmp_path / DEFAULT_DATA  # a shared/ folder next to the current directory, as in the project's layout
    demo.parent.mkdir(parents=True)
    write_jsonl(demo, RECORDS)
    assert parse_args([]).data == str(demo.resolve())
    other = write_jsonl(work / "mine.jsonl", RECORDS)
    assert parse_args([f"data={other.name}"]).data == str(other.resolve())
