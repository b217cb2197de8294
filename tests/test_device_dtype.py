"""Every command that runs a model does so on the user's hardware: `--device` and `--dtype` (and `--device-map`) on
chat, eval, serve and export (compare's eval.device / eval.dtype), from one option definition and one decision
(hardware.decide_device_and_dtype); QLoRA runs load on a 4-/8-bit base as trained, or are refused with the reason;
export keeps the base's dtype and files whether the base was a folder or a hub id.

No test here needs a GPU: a GPU machine is played by patching torch.cuda's answers, and the real loading on a GPU
is left to a GPU machine (docs/chat.md, "Device and precision")."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import httpx
import pytest
import torch

from chattune import hardware
from chattune.cli import build_parser, main
from chattune.commands import chat as chat_command
from chattune.commands import serve as serve_command
from chattune.errors import ConfigError, ModelError
from chattune.hardware import decide_device_and_dtype
from serve_helpers import running
from tiny import make_tiny_llama, make_tokenizer, write_jsonl

RECORDS = [{"instruction": f"say {w}", "output": w} for w in ("a", "bb", "ccc", "dddd")]
AMX = "the CPU has AMX-BF16 instructions (CHATTUNE_CPU_KIND=amx)"
AVX2 = ("the CPU has no bf16 instructions (AVX2 only; CHATTUNE_CPU_KIND=avx2): bf16 would be ~100x slower than "
        "fp32")


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def gpus(monkeypatch):
    """This process sees two CUDA GPUs (bf16 by default; `gpus(bf16=False)` for an older card)."""
    def have(bf16: bool = True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    have()
    return have


def cpu_kind(monkeypatch, kind: str) -> None:
    monkeypatch.setenv(hardware.CPU_KIND_VARIABLE, kind)


def parse(*argv):
    return build_parser().parse_args(list(argv))


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------- the one decision


@pytest.mark.parametrize("kind, expected", [("amx", ("cpu", "bf16", AMX)), ("avx2", ("cpu", "fp32", AVX2))])
def test_auto_on_a_machine_without_a_gpu_is_the_cpu_in_what_training_would_choose(monkeypatch, no_gpu, kind,
                                                                                  expected):
    cpu_kind(monkeypatch, kind)
    assert decide_device_and_dtype() == expected
    assert decide_device_and_dtype("cpu", "auto", {}) == expected


def test_auto_keeps_the_runs_precision_where_it_trained_on_this_kind_of_device(monkeypatch, no_gpu):
    cpu_kind(monkeypatch, "amx")  # a CPU that would choose bf16: an fp32 run still runs in fp32 (today's behaviour)
    assert decide_device_and_dtype("auto", "auto", {"precision": "fp32", "device": "cpu"}) == \
        ("cpu", "fp32", "the run trained in fp32 on a CPU")
    assert decide_device_and_dtype("auto", "auto", {"precision": "bf16"}) == \
        ("cpu", "bf16", "the run trained in bf16 (its chattune.json)")  # no run.json: where is unknown
    cpu_kind(monkeypatch, "avx2")  # kept, but the start-up line says what is faster here
    assert decide_device_and_dtype("auto", "auto", {"precision": "bf16", "device": "cpu"}) == \
        ("cpu", "bf16", "the run trained in bf16 on a CPU; this CPU has no bf16 instructions (AVX2 only): "
                        "--dtype fp32 runs much faster here")


def test_a_run_trained_on_a_gpu_decides_afresh_on_a_cpu(monkeypatch, no_gpu):
    cpu_kind(monkeypatch, "avx2")
    assert decide_device_and_dtype("auto", "auto", {"precision": "bf16", "device": "cuda"}) == \
        ("cpu", "fp32", f"the run trained in bf16 on a GPU, this is a CPU: {AVX2}")
    cpu_kind(monkeypatch, "amx")
    assert decide_device_and_dtype("cpu", "auto", {"precision": "fp16", "device": "cuda"}) == \
        ("cpu", "bf16", f"the run trained in fp16 on a GPU, this is a CPU: {AMX}")


def test_an_explicit_dtype_is_kept(monkeypatch, no_gpu):
    cpu_kind(monkeypatch, "avx2")
    assert decide_device_and_dtype("cpu", "bf16", {"precision": "fp32", "device": "cpu"}) == \
        ("cpu", "bf16", "set by --dtype")
    assert decide_device_and_dtype("auto", "fp32", {}, asked_by="train.precision") == \
        ("cpu", "fp32", "set by train.precision")


def test_on_a_gpu_machine(monkeypatch, gpus):
    assert decide_device_and_dtype() == ("cuda:0", "bf16", "the GPU supports bf16")
    assert decide_device_and_dtype("cuda", "auto", {"precision": "fp16", "device": "cuda"}) == \
        ("cuda:0", "fp16", "the run trained in fp16 on a GPU")
    assert decide_device_and_dtype("cuda:1", "auto", {"precision": "fp32", "device": "cpu"}) == \
        ("cuda:1", "bf16", "the run trained in fp32 on a CPU, this is a GPU: the GPU supports bf16")
    assert decide_device_and_dtype("cuda:1", "fp16") == ("cuda:1", "fp16", "set by --dtype")
    assert decide_device_and_dtype("auto", "auto", {}, device_map="auto") == ("cuda", "bf16", "the GPU supports bf16")
    cpu_kind(monkeypatch, "avx2")
    assert decide_device_and_dtype("cpu", "auto", {"precision": "bf16", "device": "cuda"})[:2] == ("cpu", "fp32")
    gpus(bf16=False)
    assert decide_device_and_dtype() == ("cuda:0", "fp16", "the GPU has no bf16")
    with pytest.raises(ConfigError, match=r"^--device cuda:2: this machine has 2 CUDA GPU\(s\), cuda:0 to cuda:1; "
                                          "choose one of them$"):
        decide_device_and_dtype("cuda:2")
    with pytest.raises(ConfigError, match="^--device-map auto and --device cuda:1 both place the model; give one"):
        decide_device_and_dtype("cuda:1", "auto", {}, device_map="auto")


def test_what_cannot_run_here_is_refused_with_the_fix(monkeypatch, no_gpu):
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError) as e:
            decide_device_and_dtype(device)
        assert str(e.value) == (f"--device {device}: this machine has no CUDA GPU (torch sees none); use --device cpu "
                                "(or leave --device out)")
    with pytest.raises(ConfigError) as e:
        decide_device_and_dtype("auto", "fp16")
    assert str(e.value) == ("--dtype fp16 on the CPU: torch has few fp16 kernels for CPUs (slow matmuls, missing "
                            "ops); use bf16 (on a CPU with bf16 instructions) or fp32, or auto")
    with pytest.raises(ConfigError, match="^train.precision fp16 on the CPU"):
        decide_device_and_dtype("cpu", "fp16", asked_by="train.precision")
    with pytest.raises(ConfigError) as e:
        decide_device_and_dtype("auto", "auto", {}, device_map="auto")
    assert str(e.value) == ("--device-map auto spreads a model over CUDA GPUs and this machine has none; leave "
                            "--device-map out (the model then runs on the CPU)")
    for bad in ("gpu", "mps", "cuda:x", "cuda:-1"):
        with pytest.raises(ConfigError, match=f"^--device {bad}: not a device; give auto, cpu, cuda or cuda:N"):
            hardware.parse_device(bad)
    assert hardware.parse_device(" CUDA:3 ") == "cuda:3"


# ---------------------------------------------------------------- one option definition on every command


def test_every_command_takes_the_same_device_and_dtype_options(capsys, no_gpu, tmp_path):
    for command, extra in (("chat", []), ("eval", ["--data", "d.jsonl"]), ("serve", []),
                           ("export", ["--adapter", "a", "--out", "o"])):
        args = parse(command, *extra)
        assert (args.device, args.dtype) == ("cpu" if command == "export" else "auto", "auto"), command
        assert parse(command, *extra, "--device", "cuda:1", "--dtype", "bf16").device == "cuda:1"
        assert hasattr(args, "device_map") == (command != "export")
        with pytest.raises(SystemExit):
            parse(command, *extra, "--dtype", "fp64")
        assert "invalid choice: 'fp64'" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            parse(command, *extra, "--device", "gpu")
        assert "argument --device: not a device; give auto, cpu, cuda or cuda:N" in capsys.readouterr().err
    model = make_tiny_llama(tmp_path / "model")
    assert one_line_error(capsys, ["chat", "--model", str(model), "--prompt", "hi", "--device", "cuda"]) == \
        "error: --device cuda: this machine has no CUDA GPU (torch sees none); use --device cpu (or leave --device out)"
    assert one_line_error(capsys, ["serve", "--model", str(model), "--device-map", "auto"]).startswith(
        "error: --device-map auto spreads a model over CUDA GPUs and this machine has none")
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    assert one_line_error(capsys, ["eval", "--model", str(model), "--data", str(data), "--dtype", "bf16",
                                   "train.precision=fp32"]) == \
        "error: --dtype bf16 and train.precision=fp32 disagree; give one of them"
    assert "give the dtype with --dtype" in one_line_error(capsys, ["chat", "--model", str(model),
                                                                    "train.precision=bf16"])


# ---------------------------------------------------------------- runs trained in fp32 and in bf16


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One-step LoRA runs: on an fp32 tiny model in fp32, and on a bf16 tiny model in bf16."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("device_dtype")
    data = write_jsonl(root / "data.jsonl", RECORDS)
    fp32_model = make_tiny_llama(root / "fp32-model")
    bf16_model = make_tiny_llama(root / "bf16-model")
    AutoModelForCausalLM.from_pretrained(bf16_model, dtype=torch.bfloat16).save_pretrained(bf16_model)
    made = {}
    for precision, model in (("fp32", fp32_model), ("bf16", bf16_model)):
        out = root / f"{precision}-run"
        assert main(["train", f"model={model}", f"data.train={data}", f"output_dir={out}", "train.max_steps=1",
                     "train.batch_size=2", f"train.precision={precision}", "template=chatml"]) == 0
        made[precision] = out
    return root, data, made


def test_an_fp32_run_evaluates_as_today_on_a_cpu_that_would_choose_bf16(runs, monkeypatch, capsys):
    """compare's subprocess evals and `chattune eval`'s default keep the fp32 of a run trained in fp32."""
    root, data, made = runs
    cpu_kind(monkeypatch, "amx")
    out = root / "eval-fp32"
    assert main(["eval", "--adapter", str(made["fp32"]), "--data", str(data), "--metrics", "loss",
                 "--out", str(out)]) == 0
    assert "device: cpu, dtype: fp32 (the run trained in fp32 on a CPU)" in capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["device"], metrics["precision"], metrics["quantized"]) == ("cpu", "fp32", None)


@pytest.mark.parametrize("kind", ["amx", "avx2"])
def test_a_bf16_run_chats_evaluates_and_exports_in_bf16(runs, monkeypatch, capsys, kind):
    root, data, made = runs
    cpu_kind(monkeypatch, kind)
    logs: list[str] = []
    tuned = chat_command.load(parse("chat", "--adapter", str(made["bf16"])), log=logs.append)
    assert tuned.model.get_input_embeddings().weight.dtype == torch.bfloat16
    line = next(line for line in logs if line.startswith("device: "))
    assert line.startswith("device: cpu, dtype: bf16 (the run trained in bf16 on a CPU")
    assert ("--dtype fp32 runs much faster here" in line) == (kind == "avx2")
    if kind == "avx2":
        return  # the rest does not depend on the CPU kind
    out = root / "eval-bf16"
    assert main(["eval", "--adapter", str(made["bf16"]), "--data", str(data), "--metrics", "exact,loss",
                 "--max-new-tokens", "2", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["device"], metrics["precision"]) == ("cpu", "bf16")
    exported = root / "export-bf16"
    assert main(["export", "--adapter", str(made["bf16"]), "--out", str(exported)]) == 0
    assert "saving (bfloat16, the base model's dtype)" in capsys.readouterr().err
    assert _weight_dtypes(exported) == {torch.bfloat16}
    assert json.loads((exported / "config.json").read_text())["dtype"] == "bfloat16"
    as_fp16 = root / "export-fp16"
    assert main(["export", "--adapter", str(made["bf16"]), "--out", str(as_fp16), "--dtype", "fp16"]) == 0
    assert _weight_dtypes(as_fp16) == {torch.float16}


def _weight_dtypes(folder) -> set:
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys()}


def test_export_refuses_device_and_dtype_where_it_only_copies(runs, tmp_path, capsys):
    root, data, made = runs
    full = tmp_path / "full"
    assert main(["export", "--adapter", str(made["fp32"]), "--out", str(full)]) == 0
    assert one_line_error(capsys, ["export", "--adapter", str(full), "--out", str(tmp_path / "again"),
                                   "--dtype", "bf16"]) == \
        (f"error: --dtype bf16: {full} is a full model, which export copies as it is (nothing is merged or cast); "
         "leave --dtype out")


@pytest.mark.cpu_kind  # the batching check's outcome depends on the CPU's bf16 kernels: run as each kind too
def test_serve_in_bf16_on_a_cpu_keeps_batching_on(tmp_path):
    """The start-up checks (serve/engine.py's batching check, models/checks.py's bf16 tolerance) keep continuous
    batching on for a model served in bf16: /health says so, and a request is answered."""
    model = make_tiny_llama(tmp_path / "model", max_position_embeddings=2048)
    logs: list[str] = []
    tuned = serve_command.load(parse("serve", "--model", str(model), "--dtype", "bf16"), log=logs.append)
    assert "device: cpu, dtype: bf16 (set by --dtype)" in logs
    assert tuned.model.get_input_embeddings().weight.dtype == torch.bfloat16
    from chattune.serve.app import create_app

    with running(create_app(tuned, max_batch=8)) as url:
        health = httpx.get(url + "/health", timeout=30).json()
        r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0})
    assert health["batching"] is True
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


# ---------------------------------------------------------------- QLoRA: a quantized base, as trained


def _fake_run(folder, base, overrides: list[str], precision: str = "bf16"):
    """A run folder as training leaves it (adapter, chattune.json, config.yaml) without training: QLoRA cannot
    train on this machine. The adapter is an ordinary LoRA adapter, as QLoRA's is."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from chattune.config import load_config

    cfg = load_config(None, [f"model={base}", *overrides, f"train.precision={precision}"])
    net = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=["q_proj"]))
    net.save_pretrained(folder)
    (folder / "config.yaml").write_text(cfg.to_yaml())
    (folder / "chattune.json").write_text(json.dumps({"base_model": str(base), "model_spec": str(base),
                                                      "method": cfg.method, "template": "chatml",
                                                      "trust_remote_code": False, "precision": precision}))
    return cfg


@pytest.mark.parametrize("overrides", [["method=qlora"], ["method=qlora", "qlora.bits=8"],
                                       ["method=qlora", "qlora.quant_type=fp4", "qlora.double_quant=false"],
                                       ["method=lora", "model.load_in_8bit=true"]])
def test_the_quantization_config_for_loading_is_the_one_training_used(tmp_path, monkeypatch, overrides):
    from chattune import inference, methods

    base = make_tiny_llama(tmp_path / "model")
    cfg = _fake_run(tmp_path / "run", base, overrides)
    monkeypatch.setattr(inference, "bitsandbytes_installed", lambda: True)
    loading = inference.quantized_base(tmp_path / "run", torch.bfloat16, "cuda:1")
    training = methods.get_method(cfg.method).load_kwargs(cfg, torch.bfloat16)
    assert loading["quantization_config"].to_dict() == training["quantization_config"].to_dict()
    assert loading["device_map"] == {"": "cuda:1"}  # training's: {"": LOCAL_RANK}
    assert inference.quantized_base(tmp_path / "run", torch.bfloat16, "cuda", "auto")["device_map"] == "auto"


def test_a_plain_lora_run_is_not_quantized(tmp_path):
    from chattune import inference

    base = make_tiny_llama(tmp_path / "model")
    _fake_run(tmp_path / "run", base, ["method=lora"])
    assert inference.quantized_base(tmp_path / "run", torch.float32, "cpu") == {}


def test_a_qlora_run_is_refused_where_bitsandbytes_cannot_run_and_exports(tmp_path, no_gpu, capsys):
    base = make_tiny_llama(tmp_path / "model")
    run = tmp_path / "run"
    _fake_run(run, base, ["method=qlora"])
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    expected = (f"error: {run} was trained on a 4-bit base (method=qlora, bitsandbytes) and is loaded on one, which "
                "needs a CUDA GPU: this machine has no CUDA GPU; fix: run it on a CUDA GPU with bitsandbytes (pip "
                f"install 'chattune[qlora]'), or merge it into the unquantized base with `chattune export --adapter "
                f"{run} --out DIR` and use --model DIR")
    for argv in (["chat", "--prompt", "hi"], ["eval", "--data", str(data)], ["serve"]):
        assert one_line_error(capsys, [*argv, "--adapter", str(run)]) == expected
    exported = tmp_path / "export"
    assert main(["export", "--adapter", str(run), "--out", str(exported)]) == 0  # merged into the unquantized base
    assert main(["chat", "--model", str(exported), "--prompt", "hi", "--max-new-tokens", "2"]) == 0


# ---------------------------------------------------------------- export of a hub-id base


def _hub_cache_with(*args, **kwargs):
    from test_model_keys import _hub_cache_with as make

    return make(*args, **kwargs)


def test_export_of_a_hub_id_base_keeps_its_dtype_and_its_code(tmp_path):
    """A run whose base was given as org/name (from the local Hugging Face cache, offline): the export finds the
    base's files in the cache, so it is saved in the base's dtype (bf16, not fp32) with the model's own code."""
    from fixtures.make_remote_glm import make_remote_glm
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    base = make_remote_glm(tmp_path / "glm")
    make_tokenizer(eos="</s>").save_pretrained(base)
    weights = base / "model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (base / "config.json").write_text(json.dumps(config))
    # Code that save_pretrained does not write itself (its model and config classes' files it does): only the
    # export's copy from the base's folder brings it.
    (base / "tokenization_tinyglm.py").write_text("# the model's own tokenizer code would be here\n")
    repo = "chattune-test/glm"
    cache = _hub_cache_with(tmp_path, base, repo=repo, revisions=("main",))

    run = tmp_path / "run"
    net = get_peft_model(AutoModelForCausalLM.from_pretrained(base, trust_remote_code=True),
                         LoraConfig(r=2, target_modules=["query_key_value"], init_lora_weights=False))
    net.save_pretrained(run)
    adapter_config = json.loads((run / "adapter_config.json").read_text())
    (run / "adapter_config.json").write_text(json.dumps({**adapter_config, "base_model_name_or_path": repo}))
    (run / "chattune.json").write_text(json.dumps({"base_model": repo, "model_spec": repo, "method": "lora",
                                                   "template": "chatml", "trust_remote_code": True,
                                                   "precision": "bf16"}))
    out = tmp_path / "export"
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "chattune", "export", "--adapter", str(run), "--out", str(out)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert _weight_dtypes(out) == {torch.bfloat16}
    assert {p.name for p in out.glob("*.py")} == {"configuration_tinyglm.py", "modeling_tinyglm.py",
                                                  "tokenization_tinyglm.py"}
    assert "copied the model's code: tokenization_tinyglm.py (load with trust_remote_code=True)" in r.stderr


# ---------------------------------------------------------------- compare: eval.device / eval.dtype


def test_compare_passes_eval_device_and_dtype_and_reevaluates_when_they_change(tmp_path, monkeypatch, no_gpu):
    from chattune import compare
    from chattune.config import apply_overrides, validate

    cpu_kind(monkeypatch, "amx")
    run_dir = tmp_path / "v"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"device": "cpu"}))
    (run_dir / "chattune.json").write_text(json.dumps({"precision": "fp32"}))
    test_file = write_jsonl(tmp_path / "test.jsonl", RECORDS)
    calls: list[list[str]] = []

    def fake_eval(args, log):
        calls.append(args)
        device, dtype = args[args.index("--device") + 1], args[args.index("--dtype") + 1]
        (run_dir / "eval-compare").mkdir(exist_ok=True)
        (run_dir / "eval-compare" / "metrics.json").write_text(json.dumps({
            "data": str(test_file), "batch_size": 8, "max_new_tokens": 256, "samples": 4, "rouge-1": 1.0,
            "rouge-2": 1.0, "rouge-l": 1.0, "bleu-4": 1.0, "device": "cpu",
            "precision": {"auto": "fp32"}.get(dtype, dtype), "asked": device}))

    monkeypatch.setattr(compare, "_chattune", fake_eval)

    def spec(*keys):
        return validate(compare.CompareSpec, apply_overrides(
            {"train_data": str(test_file), "variants": [{"name": "v"}]}, list(keys)))

    logs: list[str] = []
    compare.eval_variant(spec("eval.device=cpu", "eval.dtype=bf16"), run_dir, test_file, logs.append)
    assert calls[-1][calls[-1].index("--device"):calls[-1].index("--device") + 4] == ["--device", "cpu", "--dtype",
                                                                                      "bf16"]
    compare.eval_variant(spec("eval.device=cpu", "eval.dtype=bf16"), run_dir, test_file, logs.append)
    assert len(calls) == 1 and logs[-1] == "compare: v: already evaluated with these settings"
    compare.eval_variant(spec(), run_dir, test_file, logs.append)  # auto: the run's fp32, not bf16: evaluate again
    assert len(calls) == 2 and calls[-1][-4:] == ["--device", "auto", "--dtype", "auto"]
    with pytest.raises(ConfigError, match=r"eval.device.*give auto, cpu, cuda or cuda:N"):
        spec("eval.device=gpu")
    with pytest.raises(ConfigError, match="eval.dtype"):
        spec("eval.dtype=fp64")


def test_compare_refuses_an_eval_device_that_is_not_here(tmp_path, monkeypatch, no_gpu):
    from chattune import compare

    run_dir = tmp_path / "v"
    run_dir.mkdir()
    spec = compare.validate(compare.CompareSpec, {"train_data": "x", "variants": [{"name": "v"}],
                                                  "eval": {"device": "cuda"}})
    with pytest.raises(ConfigError, match="^--device cuda: this machine has no CUDA GPU"):
        compare.eval_variant(spec, run_dir, tmp_path / "t.jsonl", print)


def test_load_tuned_raises_model_error_not_a_traceback_for_a_qlora_checkpoint(tmp_path, no_gpu):
    """A checkpoint-N of a QLoRA run: its run's config.yaml says how it was trained."""
    from chattune.inference import load_tuned

    base = make_tiny_llama(tmp_path / "model")
    run = tmp_path / "run"
    _fake_run(run, base, ["method=qlora", "qlora.bits=8"])
    checkpoint = run / "checkpoint-1"
    checkpoint.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (checkpoint / name).write_bytes((run / name).read_bytes())
    with pytest.raises(ModelError, match=r"checkpoint-1 was trained on an 8-bit base \(method=qlora"):
        load_tuned(adapter=str(checkpoint), log=lambda m: None)


def test_the_bundled_model_runs_in_fp32_on_a_cpu_and_bf16_on_a_gpu(monkeypatch, no_gpu, gpus):
    """The bundled model's weights are its GGUF's blocks: on a CPU `auto` keeps them exact in fp32 (block-weight
    decode) even where training would pick bf16; on a GPU the usual choice."""
    from chattune.inference import recorded_hardware
    from chattune.models.bundled import bundled_model_dir

    bundled = recorded_hardware(None)
    assert recorded_hardware("bundled") == recorded_hardware(str(bundled_model_dir())) == bundled
    assert "why" not in recorded_hardware(str(bundled_model_dir().parent))  # another folder: no preference
    cpu_kind(monkeypatch, "amx")
    assert decide_device_and_dtype("cpu", "auto", bundled) == \
        ("cpu", "fp32", "the bundled model's weights are its GGUF's 8-bit blocks, exact in fp32, decoded from the "
                        "blocks on a CPU")
    assert decide_device_and_dtype("cuda", "auto", bundled) == ("cuda:0", "bf16", "the GPU supports bf16")
    assert decide_device_and_dtype("cpu", "bf16", bundled) == ("cpu", "bf16", "set by --dtype")
