"""The one precision decision (hardware.decide_precision) and its three callers: training (a resumed run keeps the
precision it recorded), the commands that load a trained model (commands.placement, `auto` = the run's)
and `chattune estimate` (the precision training would decide). Each CPU kind is set through CHATTUNE_CPU_KIND, so
the results hold on whatever machine runs the tests."""

from __future__ import annotations

import json

import pytest
import torch

from chattune import hardware
from chattune.commands import placement
from chattune.config import load_config
from chattune.errors import ConfigError
from chattune.estimate import estimate
from chattune.hardware import decide_precision

SET = "set by train.precision"
RECORDED = "recorded by the run being resumed"
AVX2 = ("fp32", "the CPU has no bf16 instructions (AVX2 only; CHATTUNE_CPU_KIND=avx2): bf16 would be ~100x slower "
                "than fp32")
AMX = ("bf16", "the CPU has AMX-BF16 instructions (CHATTUNE_CPU_KIND=amx)")


@pytest.fixture
def no_probe(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_bf16_speedup", lambda: pytest.fail("the CPU's kind decides: no probe"))


@pytest.mark.parametrize("kind", ["avx2", "amx", "other"])
@pytest.mark.parametrize("device, requested, expected", [
    ("cpu", "fp32", ("fp32", SET)), ("cpu", "bf16", ("bf16", SET)),
    ("cpu", "fp16", ("fp32", "fp16 autocast on CPU is slow and unstable: using fp32")),
    ("cuda", "fp32", ("fp32", SET)), ("cuda", "bf16", ("bf16", SET)), ("cuda", "fp16", ("fp16", SET)),
])
def test_an_explicit_precision_is_kept_on_any_cpu_but_fp16_on_a_cpu(monkeypatch, no_probe, kind, device, requested,
                                                                    expected):
    monkeypatch.setenv("CHATTUNE_CPU_KIND", kind)
    assert decide_precision(requested, device) == expected
    assert decide_precision(requested, device, recorded="bf16") == expected  # a recorded one does not override it


@pytest.mark.parametrize("kind, expected", [
    ("avx2", AVX2), ("avx512_bf16", ("bf16", "the CPU has AVX512-BF16 instructions (CHATTUNE_CPU_KIND=avx512_bf16)")),
    ("amx", AMX)])
def test_auto_on_each_cpu_kind(monkeypatch, no_probe, kind, expected):
    monkeypatch.setenv("CHATTUNE_CPU_KIND", kind)
    assert decide_precision("auto", "cpu") == expected == hardware.choose_precision("auto", "cpu")


@pytest.mark.parametrize("speedup, expected", [(5.0, "bf16"), (1.2, "fp32")])
def test_auto_on_another_cpu_follows_the_probe(monkeypatch, speedup, expected):
    monkeypatch.setenv("CHATTUNE_CPU_KIND", "other")
    monkeypatch.setattr(hardware, "cpu_bf16_speedup", lambda: speedup)
    assert decide_precision("auto", "cpu")[0] == expected


@pytest.mark.parametrize("bf16_ok, expected", [(True, ("bf16", "the GPU supports bf16")),
                                               (False, ("fp16", "the GPU has no bf16"))])
def test_auto_on_a_gpu_asks_it_unless_told(monkeypatch, bf16_ok, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    assert decide_precision("auto", "cuda") == expected
    assert decide_precision("auto", "cuda", gpu_bf16=True) == ("bf16", "assumed: a GPU with bf16")  # estimate's --gpus


@pytest.mark.parametrize("kind", ["avx2", "amx"])
def test_auto_keeps_a_recorded_precision(monkeypatch, no_probe, kind):
    """A resumed run (or a trained model loaded with auto) keeps what its chattune.json recorded, whatever this
    machine would choose now."""
    monkeypatch.setenv("CHATTUNE_CPU_KIND", kind)
    for recorded in ("fp32", "bf16"):
        assert decide_precision("auto", "cpu", recorded, RECORDED) == (recorded, RECORDED)
    assert decide_precision("auto", "cuda", "fp16", RECORDED) == ("fp16", RECORDED)
    assert decide_precision("auto", "cuda", "fp32", RECORDED) == ("fp32", RECORDED)


@pytest.mark.parametrize("kind, expected", [("avx2", AVX2), ("amx", AMX)])
def test_a_recorded_fp16_or_unknown_value_on_a_cpu_decides_as_unrecorded(monkeypatch, no_probe, kind, expected):
    """Where today's rules disagreed, the inference commands' rule won: training kept a recorded fp16 on a CPU
    (and any recorded string), loading ignored it; now neither runs fp16 on a CPU, as a fresh run would not."""
    monkeypatch.setenv("CHATTUNE_CPU_KIND", kind)
    for recorded in ("fp16", "auto", "fp64", "", None):
        assert decide_precision("auto", "cpu", recorded, RECORDED) == expected
    assert decide_precision("fp16", "cpu", "fp16", RECORDED) == ("fp32", "fp16 autocast on CPU is slow and unstable: "
                                                                         "using fp32")


def test_an_explicit_precision_equal_to_the_recorded_one_is_the_users(monkeypatch, no_probe):
    """Where today's rules disagreed on the reason only (training said `recorded by the run being resumed`, loading
    `set by train.precision`): an explicit value is the user's choice and says so."""
    monkeypatch.setenv("CHATTUNE_CPU_KIND", "avx2")
    assert decide_precision("bf16", "cpu", "bf16", RECORDED) == ("bf16", SET)


def test_inference_reads_the_run_precision_through_the_one_decision(monkeypatch, no_probe, tmp_path):
    """`placement` (chat, eval, serve) reads the run's chattune.json (a checkpoint-N's: its run's): `auto` is the
    precision the run trained in, else what training would choose on this CPU (decide_precision)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CHATTUNE_CPU_KIND", "avx2")
    run = tmp_path / "run"
    (run / "checkpoint-2").mkdir(parents=True)
    (run / "chattune.json").write_text(json.dumps({"precision": "bf16"}))
    plain = tmp_path / "plain-model"
    plain.mkdir()

    def placed(folder, dtype="auto"):
        p = placement(str(folder) if folder else None, "auto", dtype)
        assert p["device"] == "cpu"
        return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[p["dtype"]], p["placement_why"]

    trained_in = ("bf16", "the run trained in bf16 (its chattune.json); this CPU has no bf16 instructions (AVX2 only): "
                          "--dtype fp32 runs much faster here")
    assert placed(run) == trained_in
    assert placed(run / "checkpoint-2") == trained_in  # its run's chattune.json
    assert placed(run, "fp32") == ("fp32", "set by --dtype")
    assert placed(plain) == AVX2  # a plain model: what training would choose here
    assert placed(tmp_path / "no-such-folder") == AVX2
    (run / "chattune.json").write_text(json.dumps({"precision": "fp16"}))  # trained on a GPU in fp16
    assert placed(run) == AVX2
    monkeypatch.setenv("CHATTUNE_CPU_KIND", "amx")
    assert placed(run) == AMX
    with pytest.raises(ConfigError, match="--dtype fp16 on the CPU"):  # refused, not run as fp32
        placed(run, "fp16")


def _estimate_precision(*overrides, gpus=None):
    return estimate(load_config(None, ["model=llama-2-7b", *overrides]), gpus, log=lambda m: None).precision


@pytest.mark.parametrize("kind, expected", [("avx2", "fp32"), ("avx512_bf16", "bf16"), ("amx", "bf16")])
def test_estimate_defaults_to_the_precision_training_would_decide(monkeypatch, no_probe, kind, expected):
    """Today's rules disagreed: estimate took auto as fp32 on any CPU (and kept fp16 on one), training decides by
    the CPU's kind (and runs fp16 as fp32 there). Training's rule won: the estimate is of the run training makes."""
    monkeypatch.setattr(hardware, "device_type", lambda: "cpu")
    monkeypatch.setenv("CHATTUNE_CPU_KIND", kind)
    assert _estimate_precision() == expected == decide_precision("auto", "cpu")[0]
    assert _estimate_precision("train.precision=fp16") == "fp32"
    assert _estimate_precision("train.precision=bf16") == "bf16"
    assert _estimate_precision("train.precision=fp32") == "fp32"


def test_estimate_assumes_bf16_on_the_gpus_it_is_given(monkeypatch, no_probe):
    """--gpus may size GPUs this process does not run on: auto is bf16 there, as before; explicit values as given."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert _estimate_precision(gpus=1) == "bf16"
    assert _estimate_precision("train.precision=fp16", gpus=1) == "fp16"
    assert _estimate_precision("train.precision=fp32", gpus=1) == "fp32"


def test_a_resumed_run_recorded_in_fp16_is_not_trained_in_fp16_on_a_cpu(monkeypatch, tmp_path):
    """Training's side of the rule above: a run recorded in fp16 (on a GPU) and resumed on a CPU decides as a fresh
    run there (it kept fp16 before)."""
    from chattune.train.trainer import train
    from tiny import make_tiny_llama, write_jsonl

    if torch.cuda.is_available():
        pytest.skip("a run on the CPU")
    monkeypatch.setenv("CHATTUNE_CPU_KIND", "avx2")
    model = make_tiny_llama(tmp_path / "model")
    data = write_jsonl(tmp_path / "data.jsonl", [{"instruction": f"repeat {w}", "output": f"{w} {w}"}
                                                 for w in ["apple", "pear", "plum", "fig"]])
    out = tmp_path / "run"

    def run(*overrides, log=lambda m: None):
        cfg = load_config(None, [f"model={model}", f"data.train={data}", f"output_dir={out}", "train.batch_size=1",
                                 "train.max_steps=4", "train.save_steps=2", *overrides])
        return train(cfg, log=log)

    run("train.stop_after=2")
    info = json.loads((out / "chattune.json").read_text())
    assert info["precision"] == "fp32"
    (out / "chattune.json").write_text(json.dumps({**info, "precision": "fp16"}))
    logs: list[str] = []
    result = run("resume=auto", log=logs.append)
    assert f"precision: {AVX2[0]} ({AVX2[1]})" in logs
    assert result.run.precision == "fp32" and json.loads((out / "run.json").read_text())["precision"] == "fp32"
