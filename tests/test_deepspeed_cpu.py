"""DeepSpeed ZeRO for real, on CPU: the installed DeepSpeed runs through its CPU accelerator (gloo when Intel's
oneCCL is absent) and JIT-compiles its shared-memory allreduce op on first use (about 2 minutes on 2 cores, once:
cached under TORCH_EXTENSIONS_DIR, ~/.cache/torch_extensions). Each run below then takes 15-40 s on 2 cores.

On the tiny model, LoRA and full SFT train 2 steps under ZeRO-2 and ZeRO-3 and must save what the same run without
DeepSpeed saves: the same tensors (to 1e-6) that load with plain transformers (full) / peft (LoRA) and give the
same logits (to 1e-5). ZeRO-3 with one process still partitions the weights (over one rank) and gathers them on
save (`stage3_gather_16bit_weights_on_model_save`). The `deepspeed` launcher line of docs/scale.md runs too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny import make_tiny_llama, write_jsonl

pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra: pip install 'chattune[deepspeed]'")

from chattune.methods.common import missing_cpu_op_tools  # noqa: E402

if torch.cuda.is_available():
    pytest.skip("CPU DeepSpeed runs; this machine has a GPU", allow_module_level=True)
if missing_cpu_op_tools():
    pytest.skip(f"DeepSpeed's CPU ops cannot be compiled here (no {', '.join(missing_cpu_op_tools())})",
                allow_module_level=True)

WORDS = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "nut", "oat", "rye", "yam", "pea"]
FILES = {"lora": "adapter_model.safetensors", "full": "model.safetensors"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    model = make_tiny_llama(root / "model")
    data = write_jsonl(root / "data.jsonl", [{"instruction": f"repeat {w}", "output": f"{w} {w}"} for w in WORDS])
    return model, data, root


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


# Each method's own keys: `chattune train` refuses a method section's key that the run's method does not read.
METHOD_KEYS = {"lora": ["lora.dropout=0"]}


def train(tiny, out: Path, method: str, *extra, launcher=(), nproc=1):
    model, data, _ = tiny
    args = [f"model={model}", f"data.train={data}", f"output_dir={out}", f"method={method}", "train.max_steps=2",
            "train.batch_size=2", "train.logging_steps=1", "train.precision=fp32", *METHOD_KEYS.get(method, []),
            "train.save_steps=2", *extra]
    cmd = [*(launcher or [sys.executable, "-m", "chattune"]), "train",
           *(["--nproc", str(nproc)] if nproc > 1 else []), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=clean_env())
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return r


_plain: dict = {}


def plain_run(tiny, method: str) -> Path:
    """The same run without DeepSpeed (once per method)."""
    if method not in _plain:
        out = tiny[2] / f"plain-{method}"
        train(tiny, out, method)
        _plain[method] = out
    return _plain[method]


def load_output(tiny, out: Path, method: str):
    """The final output as a user loads it: plain transformers for a full model, peft on the base for LoRA."""
    from transformers import AutoModelForCausalLM

    if method == "full":
        return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    from peft import PeftModel

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny[0], dtype=torch.float32), out)


def logits(model) -> torch.Tensor:
    ids = torch.tensor([list(b"repeat kiwi: kiwi kiwi")])
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("config", ["ds_zero2.json", "ds_zero3.json"])
def test_zero_run_saves_what_the_plain_run_saves(tiny, tmp_path, method, config):
    from safetensors.torch import load_file

    out = tmp_path / "ds"
    r = train(tiny, out, method, f"train.deepspeed={config}")
    assert "done: 2 steps" in r.stderr
    plain = plain_run(tiny, method)
    a, b = load_file(out / FILES[method]), load_file(plain / FILES[method])
    assert set(a) == set(b)
    for k in a:
        assert a[k].shape == b[k].shape and torch.isfinite(a[k]).all(), k
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    ours, theirs = logits(load_output(tiny, out, method)), logits(load_output(tiny, plain, method))
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    loss = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(x)["loss"] for x in (plain / "metrics.jsonl").read_text().splitlines()]
    assert loss == pytest.approx(want, abs=1e-5)
    assert (out / "checkpoint-2").is_dir()


def test_deepspeed_launcher_line_runs_two_cpu_processes(tiny, tmp_path):
    """docs/scale.md's `deepspeed --num_gpus N --module chattune train ...`: the launcher passes --local_rank=N
    before the subcommand; 2 CPU processes under ZeRO-2, one set of outputs."""
    import shutil

    deepspeed = shutil.which("deepspeed") or pytest.skip("the `deepspeed` launcher is not on PATH")
    out = tmp_path / "launched"
    r = train(tiny, out, "lora", "train.deepspeed=ds_zero2.json",
              launcher=[deepspeed, "--num_gpus", "2", "--master_port", "29561", "--module", "chattune"])
    assert "--local_rank=1" in r.stdout + r.stderr and (r.stdout + r.stderr).count("done: 2 steps") == 1
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    model = load_output(tiny, out, "lora")
    assert torch.isfinite(logits(model)).all()


def test_zero3_two_processes_gather_the_weights_on_save(tiny, tmp_path):
    out = tmp_path / "two"
    train(tiny, out, "full", "train.deepspeed=ds_zero3.json", nproc=2)
    model = load_output(tiny, out, "full")
    base = load_output(tiny, tiny[0], "full")
    for (name, p), (_, q) in zip(model.named_parameters(), base.named_parameters()):
        assert p.shape == q.shape and torch.isfinite(p).all(), name
    assert torch.isfinite(logits(model)).all()
