"""The training recipe on a tiny random Llama: loss, outputs, metrics, checkpoints and exact resume."""

import json
import shutil

import pytest
import torch

from chattune.config import load_config
from chattune.errors import ConfigError
from chattune import outputs as ckpt
from chattune.train.trainer import train
from tiny import make_tiny_llama, write_jsonl

# Runs once more per CPU kind (tests/test_cpu_kinds.py): its outcome depends on the precision chattune picks or
# on the CPU's kernels.
pytestmark = pytest.mark.cpu_kind

WORDS = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "nut", "yam", "oat", "rye", "pea"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model = make_tiny_llama(root / "model")
    data = write_jsonl(root / "data.jsonl", [
        {"instruction": f"repeat {w}", "output": f"{w} {w} {w}"} for w in WORDS])
    return model, data


def run(tiny, out, *overrides):
    model, data = tiny
    cfg = load_config(None, [f"model={model}", f"data.train={data}", f"output_dir={out}", "train.precision=fp32",
                             "train.logging_steps=1", "train.batch_size=4", "train.lr=5e-3", *overrides])
    return train(cfg, log=lambda m: None)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_decreases_and_outputs(tiny, tmp_path):
    out = tmp_path / "run"
    result = run(tiny, out, "train.max_steps=12", "train.save_steps=6", "lora.dropout=0")
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(rows[0])
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 0.1
    for name in ("config.yaml", "run.json", "chattune.json", "adapter_config.json", "adapter_model.safetensors",
                 "tokenizer.json"):
        assert (out / name).exists(), name
    assert [s for s, _ in ckpt.complete_checkpoints(out)] == [6, 12]
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["trainable_params"] == result.trainable_params > 0
    assert run_info["steps"] == 12 and run_info["data"]["samples"] == len(WORDS)
    # the final adapter loads with plain peft
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny[0]), str(out))
    assert peft_model.peft_config["default"].r == 8


def test_first_step_loss_equals_reference_cross_entropy(tiny, tmp_path):
    """Step 1's logged loss (label-only logits, packed batch) equals HF's own loss on the padded batch."""
    from transformers import AutoModelForCausalLM

    from chattune.data.collate import PaddingCollator
    from chattune.data.encode import encode_conversation
    from chattune.data.formats import load_conversations
    from chattune.data.templates import get_template
    from chattune.models.load import load_tokenizer

    out = tmp_path / "run"
    run(tiny, out, "train.max_steps=1", "train.batch_size=12", "lora.dropout=0")
    logged = metrics(out)[0]["loss"]
    tok = load_tokenizer(str(tiny[0]))
    template = get_template("auto", tok)
    rows = [encode_conversation(c, template, tok, 1024) for c in load_conversations(tiny[1]).conversations]
    batch = PaddingCollator(tok.pad_token_id)([{"input_ids": r.input_ids, "labels": r.labels} for r in rows])
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(tiny[0])(**batch).loss.item()
    assert logged == pytest.approx(reference, abs=1e-5)


def test_exact_resume(tiny, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    run(tiny, full, "train.max_steps=6", "train.save_steps=3")
    stopped = run(tiny, split, "train.max_steps=6", "train.save_steps=3", "train.stop_after=3")
    assert stopped.stopped_early and [r["step"] for r in metrics(split)] == [1, 2, 3]
    run(tiny, split, "train.max_steps=6", "train.save_steps=3", "resume=auto")
    a, b = metrics(full), metrics(split)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-6), ra["step"]
        assert rb["lr"] == pytest.approx(ra["lr"])


def test_incomplete_checkpoint_is_never_resumed(tiny, tmp_path):
    out = tmp_path / "run"
    run(tiny, out, "train.max_steps=4", "train.save_steps=2", "train.stop_after=2")
    # a crash while writing checkpoint-4: the folder exists, the completion marker does not
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-4")
    (out / "checkpoint-4" / ckpt.MARKER).unlink()
    assert ckpt.resolve_resume(out, "auto") == out / "checkpoint-2"
    with pytest.raises(ConfigError, match="no complete checkpoint-4"):
        ckpt.resolve_resume(out, 4)
    assert ckpt.resolve_resume(out, "2") == out / "checkpoint-2"


def test_output_dir_with_a_run_needs_resume_or_overwrite(tiny, tmp_path):
    out = tmp_path / "run"
    run(tiny, out, "train.max_steps=1")
    with pytest.raises(ConfigError, match="already holds a run"):
        run(tiny, out, "train.max_steps=1")
    result = run(tiny, out, "train.max_steps=2", "overwrite=true")
    assert result.steps == 2 and [r["step"] for r in metrics(out)] == [1, 2]


def test_truncation_policies(tiny, tmp_path):
    from chattune.errors import DataError

    with pytest.raises(DataError, match="longer than data.max_length=20"):
        run(tiny, tmp_path / "a", "train.max_steps=1", "data.max_length=20", "data.truncation=error")
    with pytest.raises(DataError, match="every sample was dropped"):
        run(tiny, tmp_path / "b", "train.max_steps=1", "data.max_length=20", "data.truncation=drop")


def test_bad_data_with_overwrite_keeps_the_old_run(tiny, tmp_path):
    from chattune.errors import DataError

    out = tmp_path / "run"
    run(tiny, out, "train.max_steps=2", "train.save_steps=2")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a"}\n')
    with pytest.raises(DataError, match="output: missing"):
        run(tiny, out, "train.max_steps=2", "overwrite=true", f"data.train={bad}")
    assert (out / "adapter_model.safetensors").exists() and ckpt.complete_checkpoints(out)
    with pytest.raises(ConfigError, match="no complete checkpoint-9"):
        run(tiny, out, "train.max_steps=2", "resume=9")


def test_eval_loss_during_training(tiny, tmp_path):
    out = tmp_path / "run"
    run(tiny, out, "train.max_steps=4", "train.eval_steps=2", f"data.eval={tiny[1]}")
    evals = [r for r in metrics(out) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(r["eval_loss"] > 0 for r in evals) and evals[1]["eval_loss"] < evals[0]["eval_loss"]


def test_terminal_shows_one_progress_bar_and_no_log_dicts(tiny, tmp_path):
    """`chattune train` writes per step only its progress bar (step, time left, loss, tokens/s); the Trainer's raw
    log dicts never reach the terminal (metrics.jsonl holds them)."""
    import subprocess
    import sys

    model, data = tiny
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "chattune", "train", f"model={model}", f"data.train={data}",
                           f"output_dir={out}", "train.precision=fp32", "train.logging_steps=1", "train.max_steps=4",
                           "train.batch_size=4"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    terminal = proc.stdout + proc.stderr
    assert "tok/s=" in terminal and "loss=" in terminal and "4/4" in terminal
    assert "{'loss'" not in terminal and "'train_runtime'" not in terminal and "{'eval_loss'" not in terminal
    assert len(metrics(out)) == 4


@pytest.mark.parametrize("method", ["lora", "freeze"])
def test_compiled_layers_train_the_same_losses(tiny, tmp_path, method):
    """train.compile=true (torch.compile of each decoder layer, dynamic shapes) gives the eager run's losses to
    1e-5 in fp32, over batches of different lengths, without renaming any saved weight; the layers really ran
    compiled (Dynamo compiled one frame, which every layer reused)."""
    import torch._dynamo

    from chattune.train.compile import decoder_layers

    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    own = {"lora": ["lora.dropout=0"], "freeze": ["freeze.trainable_layers=1"]}[method]  # the method's keys only
    common = ["train.max_steps=6", f"method={method}", *own, "train.num_threads=1", "train.group_by_length=false"]
    run(tiny, eager, *common, "train.compile=false")
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    result = run(tiny, compiled, *common, "train.compile=true")
    assert counters["stats"]["unique_graphs"] >= 1
    layers = decoder_layers(result.run.model)
    assert len(layers) == 2 and all(layer._compiled_call_impl is not None for layer in layers)
    want = [m["loss"] for m in metrics(eager) if "loss" in m]
    got = [m["loss"] for m in metrics(compiled) if "loss" in m]
    assert len(got) == 6 and got == pytest.approx(want, abs=1e-5, rel=0)
    from safetensors import safe_open

    name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    with safe_open(str(eager / name), "pt") as a, safe_open(str(compiled / name), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())


def test_compile_auto_is_off_on_cpu_and_short_runs():
    from chattune.train.compile import should_compile

    assert should_compile("auto", "cpu", 1000, False)[0] is False
    assert should_compile("auto", "cuda", 10, False)[0] is False
    assert should_compile("auto", "cuda", 1000, False)[0] is True
    assert should_compile("auto", "cuda", 1000, True)[0] is False
    assert should_compile(False, "cuda", 1000, False)[0] is False
    with pytest.raises(ConfigError, match="train.compile=true cannot be combined with train.deepspeed"):
        should_compile(True, "cuda", 1000, True)


def test_the_optimizer_is_torchs_fused_adamw(tiny, tmp_path):
    """One kernel per step for the whole AdamW update, on CPU too (transformers' adamw_torch_fused)."""
    from transformers import Trainer

    from chattune.train.trainer import training_arguments

    result = run(tiny, tmp_path / "run", "train.max_steps=1")
    args = training_arguments(result.run)
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert cls is torch.optim.AdamW and kwargs.get("fused") is True


def test_compile_with_deepspeed_is_refused_before_the_model_loads(tmp_path):
    out = tmp_path / "out"
    cfg = load_config(None, ["model=/nonexistent/model", "data.train=/nonexistent.jsonl", f"output_dir={out}",
                             "train.compile=true", "train.deepspeed=ds_zero2.json"])
    with pytest.raises(ConfigError, match="train.compile=true cannot be combined with train.deepspeed"):
        train(cfg, log=lambda m: None)
    assert not out.exists()
