"""Every fine-tuning method on tiny models: exact trainable-parameter counts (by hand from the tiny config),
loss goes down, save -> reload gives the same logits, resume continues the same run, export matches the
adapter model, remote-code and GLM-4 models train, and impossible combinations fail before any work.

Everything runs in fp32 on one thread (`train.num_threads=1`: tiny matmuls only lose from more threads) so that
numbers can be compared exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from fixtures.make_remote_glm import make_remote_glm
from tiny import SPECIAL_ID, VOCAB_SIZE, make_tiny_llama, make_tokenizer, write_jsonl

import chattune.methods as methods
from chattune.config import load_config
from chattune.errors import MethodError
from chattune.export import export
from chattune.inference import conversation, generate, load_tuned
from chattune.train.trainer import train

# ---------------------------------------------------------------- the tiny Llama, by hand

H, I, L, V = 32, 64, 2, VOCAB_SIZE  # hidden, intermediate, layers, vocab (tests/tiny.py)
HEADS, KV_HEADS = 4, 2
HEAD_DIM = H // HEADS  # 8
KV = KV_HEADS * HEAD_DIM  # 16: width of k_proj / v_proj outputs (grouped-query attention)
LINEARS = [(H, H), (H, KV), (H, KV), (H, H), (H, I), (H, I), (I, H)]  # q k v o gate up down: (in, out)
LAYER = sum(i * o for i, o in LINEARS) + 2 * H  # + input/post-attention RMSNorm weights
EMBED = V * H
TOTAL = 2 * EMBED + H + L * LAYER  # embeddings + lm_head (untied) + final norm + layers


def lora_params(r: int, shapes) -> int:
    return sum(r * (i + o) for i, o in shapes)  # A: r x in, B: out x r


NVT = 4  # prefix.num_virtual_tokens in these tests
PROJ = 24  # prefix.projection_hidden

MATRIX = {
    # name: (overrides, trainable parameters by hand, learning rate)
    "lora": (["method=lora", "lora.r=8"], L * lora_params(8, LINEARS), 1e-2),
    "lora_last_layer": (["method=lora", "lora.r=8", "lora.layers=1"], lora_params(8, LINEARS), 1e-2),
    "lora_listed_layer_targets": (["method=lora", "lora.r=4", "lora.layers=[0]", "lora.target=q_proj,v_proj"],
                                  lora_params(4, [(H, H), (H, KV)]), 1e-2),
    "prefix": (["method=prefix", f"prefix.num_virtual_tokens={NVT}"],
               NVT * L * 2 * KV, 1e-1),  # one key and one value vector per layer and virtual token
    "prefix_projection": (["method=prefix", f"prefix.num_virtual_tokens={NVT}", "prefix.projection=true",
                           f"prefix.projection_hidden={PROJ}"],
                          NVT * KV + (KV * PROJ + PROJ) + (PROJ * L * 2 * KV + L * 2 * KV), 1e-2),
    "freeze_last": (["method=freeze", "freeze.trainable_layers=1"], LAYER, 1e-3),
    "freeze_list_modules": (["method=freeze", "freeze.trainable_layers=[0]",
                             "freeze.trainable_modules=[lm_head, model.norm]"], LAYER + EMBED + H, 1e-3),
    "freeze_modules_only": (["method=freeze", "freeze.trainable_layers=0", "freeze.trainable_modules=['*.mlp.*']"],
                            L * sum(i * o for i, o in LINEARS[4:]), 1e-3),
    "full": (["method=full"], TOTAL, 1e-3),
}

WORDS = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "nut"]
STEPS = 10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model = make_tiny_llama(root / "model")
    data = write_jsonl(root / "data.jsonl", [{"instruction": f"say {w}", "output": f"{w} {w} {w}"} for w in WORDS])
    return root, model, data


def base_overrides(model, data, out, lr, steps: int = STEPS, batch_size: int = 4) -> list[str]:
    # batch 4 of 8 samples: two different batches alternate, so resume must restore the data order too.
    return [f"model={model}", f"data.train={data}", f"output_dir={out}", "train.precision=fp32",
            "train.num_threads=1", f"train.max_steps={steps}", "train.logging_steps=1",
            f"train.batch_size={batch_size}", f"train.lr={lr}", "train.scheduler=constant", "train.seed=7"]


def run(overrides: list[str], capture: bool = False):
    """train() with these overrides; with capture, also return the in-memory model after training."""
    cfg = load_config(None, overrides)
    logs: list[str] = []
    result = train(cfg, log=logs.append)
    return result, (result.run.model if capture else None), logs


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r.get("loss") is not None}


def sample_batch() -> dict[str, torch.Tensor]:
    ids = torch.tensor([list(b"<|im_start|>user\nsay fig<|im_end|>\n"[:24]), list(b"hello there, tiny model!")])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on one row: masks must be honoured the same way after reload
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def logits(model) -> torch.Tensor:
    model.eval()
    return model(**sample_batch()).logits.float()


@pytest.fixture(scope="module")
def trained(tiny):
    """One uninterrupted 10-step run per method, shared by the tests below."""
    root, model, data = tiny
    runs = {}

    def get(name):
        if name not in runs:
            overrides, _, lr = MATRIX[name]
            out = root / f"run-{name}"
            result, net, logs = run(base_overrides(model, data, out, lr) + overrides, capture=True)
            runs[name] = (out, result, net, logs)
        return runs[name]

    return get


# ---------------------------------------------------------------- per method


@pytest.mark.parametrize("name", MATRIX)
def test_trainable_parameters_are_exact_and_reported(trained, name):
    out, result, net, logs = trained(name)
    expected = MATRIX[name][1]
    extra = 0 if name.startswith(("freeze", "full")) else expected  # adapters add parameters to the total
    assert (result.trainable_params, result.total_params) == (expected, TOTAL + extra)
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == expected
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["trainable_params"] == expected and run_json["total_params"] == TOTAL + extra
    assert run_json["trainable_percent"] == pytest.approx(100 * expected / (TOTAL + extra))
    line = next(m for m in logs if "trainable params" in m)
    assert f"{expected:,} of {TOTAL + extra:,}" in line and f"({100 * expected / (TOTAL + extra):.4f}%)" in line


@pytest.mark.parametrize("name", MATRIX)
def test_ten_steps_lower_the_loss(trained, name):
    out, result, _, _ = trained(name)
    loss = losses(out)
    assert sorted(loss) == list(range(1, STEPS + 1))
    # two batches alternate: compare the same batch at the start and at the end
    assert loss[9] < loss[1] and loss[10] < loss[2], loss


@pytest.mark.parametrize("name", MATRIX)
def test_save_then_reload_gives_identical_logits(trained, name):
    out, _, net, _ = trained(name)
    full = name.startswith(("freeze", "full"))
    assert (out / ("model.safetensors" if full else "adapter_model.safetensors")).exists()
    reloaded = load_tuned(adapter=str(out))  # chat/serve load every method's output_dir the same way
    torch.testing.assert_close(logits(reloaded.model), logits(net), atol=1e-5, rtol=0)
    # generation (with its KV cache, which holds the prefix for prefix tuning) sees the same model
    assert isinstance(generate(reloaded, conversation([], "say fig"), max_new_tokens=3), str)
    ids = sample_batch()["input_ids"][:1]
    r = reloaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                do_sample=False, eos_token_id=None, pad_token_id=0, output_logits=True,
                                return_dict_in_generate=True)
    with torch.no_grad():
        full_pass = reloaded.model(input_ids=r.sequences[:, :-1]).logits[0, ids.shape[1] - 1:]
    torch.testing.assert_close(torch.stack(r.logits, 1)[0], full_pass, atol=1e-4, rtol=0)
    # the prefix (and nothing else) changes the output of an adapter model: it really is loaded
    base = load_tuned(model=str(reloaded.info["base_model"])).model
    assert not torch.allclose(logits(base), logits(net), atol=1e-4)


@pytest.mark.parametrize("name", MATRIX)
def test_resume_continues_the_same_run(tiny, trained, name):
    root, model, data = tiny
    full_run, *_ = trained(name)
    overrides, _, lr = MATRIX[name]
    out = root / f"resume-{name}"
    first, _, _ = run(base_overrides(model, data, out, lr) + overrides + ["train.stop_after=3"])
    assert first.stopped_early and first.steps == 3 and (out / "checkpoint-3").is_dir()
    second, _, logs = run(base_overrides(model, data, out, lr) + overrides + ["resume=auto"])
    assert second.steps == STEPS and any("resuming from" in m for m in logs)
    expected, got = losses(full_run), losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s] for s in range(1, STEPS + 1)] == pytest.approx([expected[s] for s in range(1, STEPS + 1)],
                                                                    rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", ["lora", "prefix", "freeze_last"])
def test_export(tiny, trained, name):
    from transformers import AutoModelForCausalLM

    root, *_ = tiny
    out, *_ = trained(name)
    dest = root / f"export-{name}"
    messages: list[str] = []
    export(out, dest, log=messages.append)
    info = json.loads((dest / "chattune.json").read_text())
    assert info["exported_from"] == str(out.resolve())
    assert not list(root.glob(f".export-{name}.export-*"))  # the temp folder is gone
    adapter_logits = logits(load_tuned(adapter=str(out)).model)
    if name == "prefix":
        assert any("cannot be merged" in m for m in messages)
        assert (dest / "adapter_model.safetensors").exists() and not (dest / "model.safetensors").exists()
        torch.testing.assert_close(logits(load_tuned(adapter=str(dest)).model), adapter_logits, atol=1e-5, rtol=0)
        return
    if name == "freeze_last":
        assert any("nothing to merge" in m for m in messages)
    assert (dest / "model.safetensors").exists() and (dest / "tokenizer.json").exists()
    assert (dest / "chat_template.jinja").exists() or "chat_template" in json.loads(
        (dest / "tokenizer_config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32)
    assert not any("lora" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(logits(plain), adapter_logits, atol=1e-4, rtol=0)
    # and chattune loads it as a model, with the run's template
    assert load_tuned(model=str(dest)).info["template"] == "auto"


def test_export_refuses_a_non_empty_target(tiny, trained):
    from chattune.errors import ModelError

    root, *_ = tiny
    out, *_ = trained("lora")
    dest = root / "occupied"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(ModelError, match="not empty"):
        export(out, dest, log=lambda m: None)
    assert (dest / "keep.txt").read_text() == "mine"


@pytest.fixture
def umask():
    """Set the process umask for a test (os.umask returns the old one), restored after it."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _mode(path) -> int:
    return Path(path).stat().st_mode & 0o777


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_an_atomic_folder_and_file_get_the_modes_plain_ones_get(tmp_path, umask, mask):
    """atomic_folder's temporary folder (renamed to the output at the end) is made as os.makedirs makes one: mode
    0o777 less the umask, not tempfile.mkdtemp's 0o700; atomic_write_text's file (chattune.json, config.yaml, ...)
    as open() makes one: 0o666 less the umask, not tempfile.mkstemp's 0o600."""
    from chattune.outputs import atomic_folder, atomic_write_text

    umask(mask)
    os_made = tmp_path / "os-made"
    os.makedirs(os_made)
    (tmp_path / "plain.txt").write_text("x")
    with atomic_folder(tmp_path / "out") as tmp:
        atomic_write_text(tmp / "f.txt", "x")
    assert _mode(tmp_path / "out") == _mode(os_made) == 0o777 & ~mask
    assert _mode(tmp_path / "out" / "f.txt") == _mode(tmp_path / "plain.txt") == 0o666 & ~mask
    assert (tmp_path / "out" / "f.txt").read_text() == "x" and [p.name for p in (tmp_path / "out").iterdir()] == \
        ["f.txt"]


def test_an_exported_folder_gets_the_mode_a_plain_folder_gets(tiny, trained, umask):
    root, *_ = tiny
    out, *_ = trained("lora")
    umask(0o027)
    os_made = root / "os-made-027"
    os.makedirs(os_made)
    export(out, root / "export-mode", log=lambda m: None)
    assert _mode(root / "export-mode") == _mode(os_made) == 0o750
    assert _mode(root / "export-mode" / "chattune.json") == 0o640  # as open() makes a file under this umask


# ---------------------------------------------------------------- other architectures


@pytest.fixture(scope="module")
def remote_glm(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    path = make_remote_glm(root / "model", vocab_size=VOCAB_SIZE)
    make_tokenizer(eos="</s>").save_pretrained(path)
    data = write_jsonl(root / "data.jsonl", [{"instruction": f"say {w}", "output": f"{w} {w}"} for w in WORDS])
    return root, path, data


GLM_LINEARS = [(H, 3 * H), (H, H), (H, 2 * I), (I, H)]  # query_key_value, dense, dense_h_to_4h, dense_4h_to_h


@pytest.mark.parametrize("target,expected", [("all", L * lora_params(8, GLM_LINEARS)),
                                             ("query_key_value", L * lora_params(8, GLM_LINEARS[:1]))])
def test_remote_code_model_trains_with_lora(remote_glm, target, expected):
    from transformers import AutoModelForCausalLM

    root, model, data = remote_glm
    out = root / f"lora-{target}"
    result, net, _ = run(base_overrides(model, data, out, 2e-2, steps=6, batch_size=8)
                         + ["model.trust_remote_code=true", "template=chatglm3", f"lora.target={target}"], capture=True)
    assert result.trainable_params == expected
    loss = losses(out)
    assert loss[6] < loss[1], loss
    reloaded = load_tuned(adapter=str(out))  # trust_remote_code comes from the run's chattune.json
    torch.testing.assert_close(logits(reloaded.model), logits(net), atol=1e-5, rtol=0)
    if target == "all":
        dest = root / "export"
        export(out, dest, log=lambda m: None)
        assert (dest / "modeling_tinyglm.py").exists() and (dest / "configuration_tinyglm.py").exists()
        plain = AutoModelForCausalLM.from_pretrained(dest, trust_remote_code=True, dtype=torch.float32)
        torch.testing.assert_close(logits(plain), logits(net), atol=1e-4, rtol=0)


def test_prefix_refuses_a_model_without_a_kv_cache(remote_glm):
    root, model, data = remote_glm
    with pytest.raises(MethodError, match="past_key_values"):
        run(base_overrides(model, data, root / "prefix", 1e-2) + ["method=prefix", "model.trust_remote_code=true",
                                                                  "template=chatglm3"])


def _tiny_glm4(path: Path) -> Path:
    from transformers import Glm4Config, Glm4ForCausalLM

    tok = make_tokenizer(eos="<|endoftext|>", chat_template=None)
    config = Glm4Config(vocab_size=VOCAB_SIZE, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                        max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                        eos_token_id=[SPECIAL_ID["<|endoftext|>"], SPECIAL_ID["<|user|>"], SPECIAL_ID["<|observation|>"]])
    torch.manual_seed(0)
    Glm4ForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("method,expected", [
    ("lora", L * lora_params(8, [(H, H), (H, KV), (H, KV), (H, H), (H, 2 * I), (I, H)])),
    ("prefix", NVT * L * 2 * KV),
])
def test_glm4_trains_with_the_glm4_template(tmp_path, method, expected):
    model = _tiny_glm4(tmp_path / "glm4")
    data = write_jsonl(tmp_path / "data.jsonl", [{"messages": [
        {"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w}"}]} for w in WORDS])
    out = tmp_path / "out"
    result, net, _ = run(base_overrides(model, data, out, 5e-2, steps=6, batch_size=8)
                         + ["template=glm4", f"method={method}", f"prefix.num_virtual_tokens={NVT}"], capture=True)
    assert result.trainable_params == expected
    loss = losses(out)
    assert loss[6] < loss[1], loss
    reloaded = load_tuned(adapter=str(out))
    assert reloaded.template.name == "glm4"
    torch.testing.assert_close(logits(reloaded.model), logits(net), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- impossible combinations fail first


def _nothing_written(out: Path) -> bool:
    return not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("overrides,match", [
    (["method=qlora"], r"needs a CUDA GPU.*method=lora"),
    (["method=qlora", "qlora.bits=8"], r"needs a CUDA GPU.*method=lora"),
    (["method=lora", "model.load_in_8bit=true"], r"load_in_8bit.*CUDA GPU.*method=lora"),
    (["method=prefix", "train.gradient_checkpointing=true"], r"gradient_checkpointing.*method=lora"),
    (["method=freeze", "model.load_in_8bit=true"], r"load_in_8bit"),
    (["method=prefix", "prefix.init_text=hi", "prefix.projection=true"], r"init_text.*projection"),
])
def test_impossible_combinations_fail_before_loading(tmp_path, overrides, match):
    if torch.cuda.is_available() and "qlora" in overrides[0]:
        pytest.skip("this machine has a GPU")
    out = tmp_path / "out"
    # the model folder does not exist: an error about it would mean the method was checked too late
    cfg = load_config(None, ["model=/nonexistent/model", "data.train=/nonexistent.jsonl", f"output_dir={out}"]
                      + overrides)
    with pytest.raises(MethodError, match=match):
        train(cfg, log=lambda m: None)
    assert _nothing_written(out)


@pytest.mark.parametrize("key,layers,match", [
    ("freeze.trainable_layers", "[0, 2]", r"index 2 out of range.*valid indices are 0 to 1"),
    ("freeze.trainable_layers", "3", r"only 2 decoder layers \(valid: 0 to 2\)"),
    ("lora.layers", "[0, 2]", r"lora.layers: layer index 2 out of range"),
    ("lora.layers", "3", r"lora.layers=3: this model has only 2 decoder layers"),
    ("lora.layers", "0", r"lora.layers=0: give N >= 1")])
def test_layer_selection_out_of_range_fails_before_loading(tiny, tmp_path, key, layers, match):
    _, model, data = tiny
    out = tmp_path / "out"
    method = key.split(".")[0]
    cfg = load_config(None, [f"model={model}", f"data.train={data}", f"output_dir={out}", f"method={method}",
                             f"{key}={layers}"])
    with pytest.raises(MethodError, match=match):
        train(cfg, log=lambda m: None)
    assert _nothing_written(out)
    # the same check guards apply() for models whose config does not say how many layers they have
    net = load_tuned(model=str(model)).model
    with pytest.raises(MethodError, match=match):
        methods.get_method(method).apply(net, cfg)


@pytest.mark.parametrize("value", ["abc", "true", "[1, x]", "1.5"])
def test_lora_layers_of_the_wrong_type_are_refused_with_the_forms_it_takes(value):
    from chattune.errors import ConfigError

    with pytest.raises(ConfigError, match=r"lora.layers.*give all, N \(the last N decoder layers\) or a list"):
        load_config(None, ["method=lora", f"lora.layers={value}"])


def test_lora_on_the_last_layer_runs_no_backward_below_it(trained):
    """Adapters only in layer 1: layer 0's output needs no gradient, so autograd records nothing below layer 1
    (the speed and memory lora.layers buys), and layer 0's weights are untouched by training."""
    _, _, net, logs = trained("lora_last_layer")
    assert any(m.endswith("; backward stops at decoder layer 1 (layer 0 runs forward only)") for m in logs), logs
    assert not any("backward stops" in m for m in trained("lora")[3])
    layers = net.base_model.model.model.layers
    assert not any("lora" in n for n, _ in layers[0].named_parameters())
    seen = {}
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o[0] if isinstance(o, tuple)
                                                                                 else o))
             for i, layer in enumerate(layers)]
    net.train()
    try:
        net(**sample_batch()).logits.sum().backward()
    finally:
        for h in hooks:
            h.remove()
        net.zero_grad(set_to_none=True)
    assert seen[0].grad_fn is None and not seen[0].requires_grad
    assert seen[1].grad_fn is not None


def test_freeze_pattern_that_matches_nothing_is_an_error(tiny):
    from chattune.methods import freeze

    _, model, _ = tiny
    cfg = load_config(None, ["method=freeze", "freeze.trainable_modules=[nosuchlayer]"])
    with pytest.raises(MethodError, match="matches no parameter"):
        freeze.METHOD.apply(load_tuned(model=str(model)).model, cfg)


@pytest.mark.parametrize("text,nvt", [("the cat sat", None), ("ab", 5)])
def test_prefix_init_text_starts_as_the_base_model_with_that_text_in_front(tiny, text, nvt):
    """prefix.init_text: before any training, the prefix model's logits on a prompt equal the base model's logits
    on the text's tokens (repeated or cut to num_virtual_tokens) followed by the prompt."""
    from chattune.methods.prefix import METHOD

    _, model, _ = tiny
    tokenizer = load_tuned(model=str(model)).tokenizer
    text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = nvt or len(text_ids)
    prefix_ids = (text_ids * n)[:n]
    cfg = load_config(None, ["method=prefix", f"prefix.num_virtual_tokens={n}", f"prefix.init_text={text}"])
    base = load_tuned(model=str(model)).model
    prompt = torch.tensor([[5, 9, 14, 3, 7, 22]])
    with torch.no_grad():
        want = base(input_ids=torch.cat([torch.tensor([prefix_ids]), prompt], dim=1)).logits[:, n:]
        tuned = METHOD.apply(load_tuned(model=str(model)).model, cfg, tokenizer)
        got = tuned(input_ids=prompt, attention_mask=torch.ones_like(prompt)).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    random = METHOD.apply(load_tuned(model=str(model)).model, load_config(None, ["method=prefix",
                          f"prefix.num_virtual_tokens={n}"]), tokenizer)  # the peft default: not the same model
    with torch.no_grad():
        assert (random(input_ids=prompt, attention_mask=torch.ones_like(prompt)).logits - want).abs().max() > 1e-2


def test_prefix_and_gradient_checkpointing_are_really_incompatible(tiny):
    """Why preflight refuses the combination: peft itself refuses it (checkpointed decoder layers are called
    with past_key_values=None, which would drop the prefix)."""
    from peft import get_peft_model

    from chattune.methods.prefix import prefix_config

    _, model, _ = tiny
    net = load_tuned(model=str(model)).model
    net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(ValueError, match="gradient checkpointing"):
        get_peft_model(net, prefix_config(net, load_config(None, ["method=prefix"])))


def test_deepspeed_configs_are_valid_json_with_auto_values():
    from chattune.shipped import SHIPPED_CONFIGS

    for name, stage in [("ds_zero2.json", 2), ("ds_zero3.json", 3), ("ds_zero3_offload.json", 3)]:
        ds = json.loads((SHIPPED_CONFIGS / name).read_text())
        assert ds["zero_optimization"]["stage"] == stage
        assert ds["train_micro_batch_size_per_gpu"] == "auto" and ds["gradient_accumulation_steps"] == "auto"
        if stage == 3:
            assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize("name", ["ptuning_v2", "freeze", "sft", "qlora", "lora"])
def test_shipped_configs_load(name):
    cfg = load_config(name)
    assert cfg.method == {"ptuning_v2": "prefix", "sft": "full"}.get(name, name)


def test_remote_code_model_freeze_output_loads(remote_glm):
    from chattune.methods.freeze import decoder_layers

    root, model, data = remote_glm
    out = root / "freeze"
    result, net, _ = run(base_overrides(model, data, out, 1e-3, steps=2, batch_size=8)
                         + ["model.trust_remote_code=true", "template=chatglm3", "method=freeze",
                            "freeze.trainable_layers=1"], capture=True)
    name, layers = decoder_layers(net)
    assert name == "transformer.encoder.layers" and len(layers) == L
    assert result.trainable_params == sum(p.numel() for p in layers[1].parameters())
    assert (out / "modeling_tinyglm.py").exists()  # the code travels with the weights
    torch.testing.assert_close(logits(load_tuned(adapter=str(out)).model), logits(net), atol=1e-5, rtol=0)


def test_freeze_can_train_a_head_tied_to_the_embedding(tmp_path):
    from chattune.methods import count_parameters, freeze

    model = make_tiny_llama(tmp_path / "tied", tie_word_embeddings=True)
    net = load_tuned(model=str(model)).model
    cfg = load_config(None, ["method=freeze", "freeze.trainable_layers=0", "freeze.trainable_modules=[lm_head]"])
    freeze.METHOD.apply(net, cfg)
    assert count_parameters(net) == (EMBED, TOTAL - EMBED)  # one shared matrix, counted once
    assert net.get_output_embeddings().weight.requires_grad and net.get_input_embeddings().weight.requires_grad


def test_export_keeps_the_base_models_dtype(tmp_path):
    """A bf16 base is merged in fp32 and saved in bf16 (a 6B model stays 12 GB, not 24)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    path = make_tiny_llama(tmp_path / "model")
    AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).save_pretrained(path)
    data = write_jsonl(tmp_path / "data.jsonl", [{"instruction": f"say {w}", "output": w} for w in WORDS])
    out = tmp_path / "out"
    run(base_overrides(path, data, out, 1e-2, steps=2, batch_size=8))
    export(out, tmp_path / "export", log=lambda m: None)
    with safe_open(tmp_path / "export" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32)
    torch.testing.assert_close(logits(plain), logits(load_tuned(adapter=str(out)).model), atol=0.05, rtol=0)


@pytest.mark.parametrize("overrides,bits", [(["method=qlora"], 4), (["method=qlora", "qlora.bits=8"], 8),
                                            (["method=qlora", "qlora.quant_type=fp4", "qlora.double_quant=false"], 4),
                                            (["method=lora", "model.load_in_8bit=true"], 8)])
def test_quantized_loading_arguments(overrides, bits):
    """What QLoRA / 8-bit LoRA pass to from_pretrained (the loading itself needs a CUDA GPU)."""
    cfg = load_config(None, overrides)
    kwargs = methods.get_method(cfg.method).load_kwargs(cfg, torch.bfloat16)
    q = kwargs["quantization_config"]
    assert kwargs["device_map"] == {"": 0}
    assert (q.load_in_4bit, q.load_in_8bit) == (bits == 4, bits == 8)
    if bits == 4:
        assert q.bnb_4bit_quant_type == cfg.qlora.quant_type and q.bnb_4bit_use_double_quant == cfg.qlora.double_quant
        assert q.bnb_4bit_compute_dtype == torch.bfloat16
    assert methods.get_method("lora").load_kwargs(load_config(None, []), torch.float32) == {}
