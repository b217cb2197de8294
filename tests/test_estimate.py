"""`chattune estimate`: parameter counts from the real module tree, DeepSpeed's ZeRO terms, published figures,
and the estimate against peak memory measured on this machine."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from chattune.config import load_config
from chattune.estimate import estimate, parse_size
from tiny import make_tiny_llama, write_jsonl

GIB = 2**30


def est(*overrides, gpus=None, memory=None):
    return estimate(load_config(None, list(overrides)), gpus, memory, log=lambda m: None)


@pytest.mark.parametrize("name,params", [
    ("glm-4-9b-chat", 9_399_951_360), ("chatglm3-6b", 6_243_584_000), ("chatglm-6b", 6_173_286_400),
    ("llama-2-7b", 6_738_415_616)])
def test_shipped_model_configs_count_the_published_sizes(name, params):
    assert est(f"model={name}", gpus=1).params["base"] == params  # 9.4B, 6.24B, 6.2B, 6.74B as published


def test_chatglm_6b_trainable_parameters_per_method():
    # ChatGLM-Finetuning reports 1.01B (Freeze, last 5 layers) and 0.96B (P-tuning v2 with projection)
    assert est("model=chatglm-6b", "method=freeze", "freeze.trainable_layers=5").params["trainable"] == 1_006_899_200
    assert est("model=chatglm-6b", "method=prefix", "prefix.projection=true",
               "prefix.projection_hidden=4096").params["trainable"] == 956_600_320
    # LoRA r=8 on query_key_value: 28 layers x 8 x (4096 + 12288)
    assert est("model=chatglm-6b", "lora.target=[query_key_value]").params["trainable"] == 28 * 8 * (4096 + 12288)


def test_meta_count_equals_the_real_training_count(tmp_path):
    from chattune.train.trainer import train

    model = make_tiny_llama(tmp_path / "m")
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}] * 4)
    for method in (["method=lora", "lora.r=4"], ["method=freeze", "freeze.trainable_layers=1"], ["method=prefix"]):
        common = [f"model={model}", f"data.train={data}", "train.max_steps=1", "train.precision=fp32", *method]
        real = train(load_config(None, [*common, f"output_dir={tmp_path / method[0]}"]), log=lambda m: None)
        e = estimate(load_config(None, common), log=lambda m: None)
        assert (e.params["trainable"], e.params["total"]) == (real.trainable_params, real.total_params), method


def test_zero_terms_are_deepspeeds_own():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    e3 = est("model=glm-4-9b-chat", "method=full", "train.deepspeed=ds_zero3.json", gpus=8)
    _, gpu3, _ = estimate_zero3_model_states_mem_needs(e3.params["base"], e3.params["largest_layer"], 8, 1, False,
                                                       False, True, 1.5)
    assert e3.terms["model states (ZeRO-3: weights, gradients, optimizer)"] == gpu3
    e2 = est("model=glm-4-9b-chat", "method=full", "train.deepspeed=ds_zero2.json", gpus=8)
    _, gpu2 = estimate_zero2_model_states_mem_needs(e2.params["base"], 8, 1, False, 1.5)
    assert e2.terms["model states (ZeRO-2: weights, gradients, optimizer)"] == gpu2


ZERO3 = "model states (ZeRO-3: weights, gradients, optimizer)"
ZERO2 = "model states (ZeRO-2: weights, gradients, optimizer)"


def test_zero_terms_count_only_trainable_parameters_as_trained():
    """LoRA under ZeRO: DeepSpeed's estimator for the adapters alone; the frozen bf16 base adds 2 bytes per
    parameter, partitioned over the GPUs under ZeRO-3 and whole on each under ZeRO-2."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    e3 = est("model=glm-4-9b-chat", "method=lora", "train.deepspeed=ds_zero3.json", gpus=8)
    p = e3.params
    frozen = p["total"] - p["trainable"]
    assert frozen == p["base"] and p["trainable"] < p["base"] / 100
    _, adapters, _ = estimate_zero3_model_states_mem_needs(p["trainable"], p["largest_layer"], 8, 1, False, False,
                                                           True, 1.5)
    assert e3.terms[ZERO3] == adapters + int(2 * frozen / 8)
    full3 = est("model=glm-4-9b-chat", "method=full", "train.deepspeed=ds_zero3.json", gpus=8)
    assert e3.terms[ZERO3] < full3.terms[ZERO3] / 6  # 2 bytes per frozen weight against 18 (+ one layer buffer)

    e2 = est("model=glm-4-9b-chat", "method=lora", "train.deepspeed=ds_zero2.json", gpus=8)
    _, adapters2 = estimate_zero2_model_states_mem_needs(p["trainable"], 8, 1, False, 1.5)
    assert e2.terms[ZERO2] == adapters2 + 2 * frozen
    # Freeze: the trained top layers get ZeRO's full treatment, the frozen rest only its 16-bit weights
    fr = est("model=glm-4-9b-chat", "method=freeze", "freeze.trainable_layers=2", "train.deepspeed=ds_zero3.json",
             gpus=8)
    _, trained, _ = estimate_zero3_model_states_mem_needs(fr.params["trainable"], fr.params["largest_layer"], 8, 1,
                                                          False, False, True, 1.5)
    assert fr.terms[ZERO3] == trained + int(2 * (fr.params["total"] - fr.params["trainable"]) / 8)


def test_zero3_offload_keeps_frozen_weights_off_the_gpu():
    pytest.importorskip("deepspeed")
    on = est("model=glm-4-9b-chat", "method=lora", "train.deepspeed=ds_zero3.json", gpus=8)
    off = est("model=glm-4-9b-chat", "method=lora", "train.deepspeed=ds_zero3_offload.json", gpus=8)
    assert off.terms[ZERO3] == 4 * off.params["largest_layer"] < on.terms[ZERO3]


def test_lora_dropout_activations_come_from_the_adapted_layers(monkeypatch):
    """The method's hook counts, per token and layer, a mask and a dropped-out input for each adapted layer."""
    base = ["model=glm-4-9b-chat", "data.max_length=1024", "train.batch_size=1", "lora.target=[q_proj,k_proj,v_proj]",
            "train.compile=false"]
    no_dropout = est(*base, "lora.dropout=0", gpus=1)
    dropout = est(*base, "lora.dropout=0.1", gpus=1)
    own_masks = est(*base, "lora.dropout=0.1", "lora.fuse=false", gpus=1)
    hidden, layers = 4096, 40
    extra = 1024 * layers * 2 * (3 * hidden) * 2  # tokens x layers x (mask + input) x 3 inputs of 4096 x bf16
    assert own_masks.terms["activations"] - no_dropout.terms["activations"] == extra
    # lora.fuse (the default): q, k and v read one input and share one mask
    assert dropout.terms["activations"] - no_dropout.terms["activations"] == extra // 3
    assert est(*base, "method=prefix", gpus=1).terms["activations"] == no_dropout.terms["activations"]
    # train.compile=auto (the default) compiles a GPU run of 200 steps or more, or one given in epochs, and a
    # compiled run keeps peft's calls: one mask per adapter. A shorter run is not compiled and shares them.
    auto = [b for b in base if not b.startswith("train.compile")]
    for steps, masks in (("train.max_steps=500", extra), ("train.max_steps=0", extra),
                         ("train.max_steps=100", extra // 3)):
        with_dropout = est(*auto, "lora.dropout=0.1", steps, gpus=1).terms["activations"]
        assert with_dropout - est(*auto, "lora.dropout=0", steps, gpus=1).terms["activations"] == masks, steps
    # on CPU train.compile=auto never compiles; the activations are in the precision training decides for the CPU's
    # kind (hardware.decide_precision): fp32 on an AVX2-only CPU, bf16 with AMX
    from chattune.estimate import _this_device

    if _this_device() == "cpu":
        for kind, expected in (("avx2", extra // 3 * 2), ("amx", extra // 3)):
            monkeypatch.setenv("CHATTUNE_CPU_KIND", kind)
            masks = est(*auto, "lora.dropout=0.1").terms["activations"] - \
                est(*auto, "lora.dropout=0").terms["activations"]
            assert masks == expected, kind  # shared masks


def test_lora_layers_keep_activations_from_the_lowest_adapted_layer_up():
    """No gradient flows below the lowest adapted layer: lora.layers=10 of GLM-4's 40 keeps a quarter of the
    activations (its dropout masks counted on an adapted layer), a list reaching layer 0 keeps them all."""
    base = ["model=glm-4-9b-chat", "data.max_length=1024", "train.batch_size=1", "lora.dropout=0.1"]
    every = est(*base, gpus=1)
    assert est(*base, "lora.layers=10", gpus=1).terms["activations"] * 4 == every.terms["activations"]
    assert est(*base, "lora.layers=[0, 39]", gpus=1).terms["activations"] == every.terms["activations"]
    assert est(*base, "lora.layers=10", gpus=1).params["trainable"] * 4 == every.params["trainable"]


def test_quantized_base_counts_the_linear_weights_only_and_inference_counts_the_adapter():
    """bitsandbytes quantizes the linear layers' weights; ChatGLM-6B's tied 130528 x 4096 embedding/head stays
    unquantized (fp32 after peft's k-bit preparation for training, 16-bit at inference)."""
    q4 = est("model=chatglm-6b", "method=qlora", "qlora.double_quant=false", "lora.target=[query_key_value]", gpus=1)
    linear = 28 * (4096 * 12288 + 4096 * 4096 + 2 * 4096 * 16384)
    rest = q4.params["base"] - linear
    assert 130528 * 4096 < rest < 130528 * 4096 + 2e6  # + biases and norms
    assert q4.terms["weights"] == int(linear * 4.5 / 8 + rest * 4)
    # P-tuning v2 with projection: its ~1B-parameter prefix encoder is loaded for inference too
    pt = est("model=chatglm-6b", "method=prefix", "prefix.projection=true", "prefix.projection_hidden=4096", gpus=1)
    plain = est("model=chatglm-6b", "method=lora", "lora.target=[query_key_value]", gpus=1)
    assert pt.inference_bytes - plain.inference_bytes == 2 * (pt.params["trainable"] - plain.params["trainable"])


def test_checkpointing_and_label_only_logits_shrink_their_terms():
    base = ["model=glm-4-9b-chat", "data.max_length=1024", "train.batch_size=1"]
    plain = est(*base, gpus=1)
    ckpt = est(*base, "train.gradient_checkpointing=true", gpus=1)
    full_logits = est(*base, "train.label_only_logits=false", gpus=1)
    assert ckpt.terms["activations (gradient checkpointing)"] < plain.terms["activations"] / 10
    assert full_logits.terms["logits"] > 2 * plain.terms["logits"]


@pytest.mark.parametrize("method,extra,published_mib", [
    # GLM-4's finetune demo: LoRA 21531 MiB, P-tuning v2 21381 MiB on one GPU (bf16, 512 + 512 tokens, batch 1;
    # the demo's own loss over every position; gradient checkpointing assumed, as its finetune script turns on)
    ("lora", ["lora.target=[q_proj,k_proj,v_proj]", "lora.dropout=0.1"], 21531),
    ("prefix", ["prefix.num_virtual_tokens=512"], 21381)])
def test_glm4_published_figures_within_25_percent(method, extra, published_mib):
    e = est("model=glm-4-9b-chat", f"method={method}", "data.max_length=1024", "train.batch_size=1",
            "train.gradient_checkpointing=true", "train.label_only_logits=false", *extra, gpus=1)
    assert abs(e.total_bytes / (published_mib * 2**20) - 1) < 0.25


def test_cli_json_and_fit_verdict(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "vocab_size": 32000, "hidden_size": 2048,
                               "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
                               "num_key_value_heads": 4, "tie_word_embeddings": False}))
    r = subprocess.run([sys.executable, "-m", "chattune", "estimate", f"model={cfg}", "--gpus", "1",
                        "--gpu-memory", "8GB", "--json", "train.batch_size=2"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(r.stdout)
    assert d["total_bytes"] == sum(d["terms_bytes"].values()) and d["params"]["base"] == 1_100_048_384
    assert d["fits"] == (d["total_bytes"] <= 8 * 10**9)
    r = subprocess.run([sys.executable, "-m", "chattune", "estimate", f"model={cfg}", "--gpus", "1",
                        "--gpu-memory", "4GB"], capture_output=True, text=True, timeout=300)
    assert "does NOT fit a 3.7 GiB device" in r.stdout and "weights" in r.stdout


def test_sizes_and_errors():
    assert parse_size("24GB") == 24 * 10**9 and parse_size("80GiB") == 80 * GIB and parse_size("16") == 16 * 10**9
    from chattune.errors import ConfigError

    with pytest.raises(ConfigError, match="not a shipped model"):
        est("model=no-such-model-anywhere")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "prefix", "freeze", "full"])
def test_estimate_within_25_percent_of_measured_peak_on_the_bundled_model(method, tmp_path, shared_data):
    """Peak RSS during training (run.json, measured from the start of training) vs the CPU estimate, bundled
    model, batch 4 x 256 tokens, fp32. Measured 2026-12-05 on an AVX512-BF16 EPYC: -13% .. -2% for the four methods
    (the estimate is low); a CI machine's freeze run peaked 11% higher than this one's (1839 vs 1660 MiB)."""
    records = json.loads((shared_data / "llamafactory" / "alpaca_en_demo.json").read_text())[:40]
    data = write_jsonl(tmp_path / "d.jsonl", records)
    common = ["model=bundled", f"method={method}", "train.batch_size=4", "data.max_length=256",
              "train.precision=fp32"]
    # a fresh process per run: a freed heap is not given back to the OS, so an earlier run would count
    r = subprocess.run([sys.executable, "-m", "chattune", "train", *common, f"data.train={data}", "train.max_steps=3",
                        f"output_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    e = estimate(load_config(None, common), log=lambda m: None)
    measured = json.loads((tmp_path / "run" / "run.json").read_text())["peak_memory_mb"] * 2**20
    print(f"\nestimate {method}: {e.total_bytes / 2**20:.0f} MiB estimated, {measured / 2**20:.0f} MiB measured")
    assert abs(e.total_bytes / measured - 1) < 0.25


def test_estimate_refuses_keys_it_does_not_read():
    """A run key the estimate never reads (output_dir, train.lr, data.train, template) is refused naming the keys that
    apply, instead of being accepted and changing nothing; the keys it reads and a method section's keys pass."""
    from chattune.commands.estimate import check_keys
    from chattune.errors import ConfigError

    for key in ("output_dir=/tmp/x", "train.lr=1", "data.train=x.jsonl", "template=chatml", "resume=auto"):
        with pytest.raises(ConfigError, match=r"has no effect on `chattune estimate`; the keys that apply: model, "
                                              r"method, data.max_length, train.batch_size"):
            check_keys([key])
    check_keys(["model=x", "model.trust_remote_code=true", "method=lora", "lora.r=4", "prefix.num_virtual_tokens=8",
                "data.max_length=64", "train.batch_size=2", "train.gradient_checkpointing=true", "train.deepspeed=x"])


def test_estimate_refuses_a_key_of_a_method_section_the_method_does_not_read(capsys):
    """As `train` does: `lora.r=8` with method=freeze would change nothing; qlora reads lora.* (its adapters)."""
    from chattune.cli import main

    assert main(["estimate", "model=chatglm-6b", "method=freeze", "lora.r=8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: `lora.r` has no effect: this run's method is freeze, which reads no lora.* key "
                          "(lora.* is read by lora, qlora)") and "Traceback" not in err
    assert main(["estimate", "model=chatglm-6b", "method=qlora", "lora.r=8", "--gpus", "1", "--json"]) == 0


def test_inference_memory_is_counted_in_the_dtype_the_commands_load_the_run_in(monkeypatch):
    """chat/eval/serve load a run in the precision it trained in (`--dtype auto`): the inference line counts the
    weights in that dtype, 2 bytes each in bf16, 4 in fp32, on a CPU as on a GPU."""
    from chattune.config import load_config
    from chattune.estimate import estimate

    cfg = lambda p: load_config(None, ["model=chatglm3-6b", "method=lora", f"train.precision={p}"])  # noqa: E731
    fp32, bf16 = estimate(cfg("fp32"), log=lambda m: None), estimate(cfg("bf16"), log=lambda m: None)
    # 2 bytes less per parameter, and per KV-cache value: keys and values, 28 layers, 2 groups x 128, 1024 positions
    assert fp32.inference_bytes - bf16.inference_bytes == 2 * fp32.params["total"] + 2 * (2 * 28 * 256 * 1024)
