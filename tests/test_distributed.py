"""Data parallel on CPU: torchrun with 2 gloo processes on the tiny model.

A 2-process run with batch b per process must follow the 1-process run with batch b and grad_accum=2 (the same
global batch, the same samples per step: accelerate hands whole batches to the ranks in turn). Tolerance: 1e-5
on the loss (the gradients are summed across processes in another order than across micro-batches). Only rank 0
writes: one metrics line per step, one set of outputs; metrics count the tokens of both ranks.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from chattune import outputs
from tiny import make_tiny_llama, write_jsonl

WORDS = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "nut", "oat", "rye", "yam", "pea"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    model = make_tiny_llama(root / "model")
    data = write_jsonl(root / "data.jsonl", [{"instruction": f"repeat {w}", "output": f"{w} {w}"} for w in WORDS])
    return model, data


def train(tiny, out, *extra, nproc=1):
    model, data = tiny
    args = [f"model={model}", f"data.train={data}", f"output_dir={out}", "train.max_steps=6", "train.batch_size=2",
            "train.logging_steps=1", "train.precision=fp32", "lora.dropout=0", "train.save_steps=2", *extra]
    cmd = [sys.executable, "-m", "chattune", "train", *(["--nproc", str(nproc)] if nproc > 1 else []), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one_with_doubled_accumulation(tiny, tmp_path):
    one = tmp_path / "one"
    train(tiny, one, "train.grad_accum=2")
    two = tmp_path / "two"
    r = train(tiny, two, nproc=2)
    assert r.stderr.count("done: 6 steps") == 1 and r.stderr.count("trainable params") == 1  # rank 0 speaks
    a, b = rows(one), rows(two)
    assert [x["step"] for x in b] == [1, 2, 3, 4, 5, 6]  # one line per step: only rank 0 writes
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-5)
        assert (y["tokens"], y["trained_tokens"]) == (x["tokens"], x["trained_tokens"])  # both ranks' tokens
    assert [s for s, _ in outputs.complete_checkpoints(two)] == [2, 4, 6]
    assert (two / "adapter_model.safetensors").is_file() and json.loads((two / "run.json").read_text())["steps"] == 6


def test_resume_under_torchrun(tiny, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    train(tiny, full, nproc=2)
    train(tiny, split, "train.stop_after=2", nproc=2)
    assert [x["step"] for x in rows(split)] == [1, 2]
    train(tiny, split, "resume=auto", nproc=2)
    a, b = rows(full), rows(split)
    assert [x["step"] for x in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-6)


def test_lora_with_gradient_checkpointing_under_ddp(tiny, tmp_path):
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    train(tiny, plain, nproc=2)
    train(tiny, ckpt, "train.gradient_checkpointing=true", nproc=2)
    for x, y in zip(rows(plain), rows(ckpt)):  # recomputing activations changes nothing but memory
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-5)


@pytest.mark.parametrize("argv", [["--local_rank=1", "estimate"], ["--local-rank", "1", "estimate"],
                                  ["estimate", "--local_rank=1"], ["estimate", "--local-rank=1"]])
def test_cli_takes_the_deepspeed_launchers_local_rank(argv, tmp_path, monkeypatch, capsys):
    """`deepspeed --module chattune train ...` runs `python -m chattune --local_rank=N train ...` in each process:
    the argument is consumed (LOCAL_RANK, which chattune reads, is set from it when the launcher did not)."""
    from chattune.cli import drop_local_rank, main

    monkeypatch.setenv("LOCAL_RANK", "unset")  # absent during the test and after it
    monkeypatch.delenv("LOCAL_RANK")
    model = make_tiny_llama(tmp_path / "m")
    capsys.readouterr()  # (what importing the libraries printed)
    assert main([*argv, f"model={model / 'config.json'}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"]["base"] > 0
    import os

    assert os.environ["LOCAL_RANK"] == "1"
    assert drop_local_rank(["--local_rank=0", "train", "a=b", "--", "--local_rank=3"]) == ["train", "a=b", "--",
                                                                                          "--local_rank=3"]
    assert drop_local_rank(["train", "--local-rank", "2", "x=1"]) == ["train", "x=1"]
