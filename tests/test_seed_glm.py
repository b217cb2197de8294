"""Every command on tiny twins of ChatGLM2-6B, ChatGLM3-6B and GLM-4-9B-chat whose own Python files refuse to run.

A twin is a checkpoint folder laid out as the publisher's (config.json with `model_type: chatglm` and its auto_map,
chatglm-layout weights, the tokenizer file and tokenizer_config.json), 2 layers with random weights, from the
published configs (tests/test_family_glm.py) and tokenizer twins (tests/test_family_glm_tokenizer.py). Its
`modeling_chatglm.py`, `configuration_chatglm.py` and `tokenization_chatglm.py` are stand-ins that raise when
imported: chattune must never need them. It converts the folder once (models/native.py) and runs it as
transformers' own GlmForCausalLM with a fast tokenizer.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_family_glm import CHATGLM3_6B, GLM4_9B_CHAT, layout_shapes, make_weights, twin, write_chatglm_folder
from test_family_glm_tokenizer import write_twin
from tiny import write_jsonl

# ChatGLM2-6B's config.json has ChatGLM3-6B's architecture fields with a 32k context.
CHATGLM2_6B = {**CHATGLM3_6B, "seq_length": 32768, "transformers_version": "4.27.1"}
PUBLISHED = {"chatglm2": CHATGLM2_6B, "chatglm3": CHATGLM3_6B, "glm4": GLM4_9B_CHAT}
NAMES = {"chatglm2": "chatglm2-6b", "chatglm3": "chatglm3-6b", "glm4": "glm-4-9b-chat"}
STAND_IN = "raise RuntimeError('stand-in for the publisher code: chattune must not run it')\n"


def make_seed_twin(root: Path, kind: str) -> Path:
    """A ChatGLM2-6B (`chatglm2`), ChatGLM3-6B (`chatglm3`) or GLM-4-9B-chat (`glm4`) twin folder with stand-in
    remote code."""
    tok_dir = write_twin(root / f"{kind}-tok", kind)
    from chattune.models.families.glm_tokenizer import build_fast_tokenizer

    rows = len(build_fast_tokenizer(tok_dir)[0])
    config = twin(PUBLISHED[kind])
    config["padded_vocab_size"] = (rows + 63) // 64 * 64  # the tokenizer twin's ids must fit the embedding
    config["_name_or_path"] = f"THUDM/{NAMES[kind]}"
    config["auto_map"] = {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                          "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                          "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}
    folder = write_chatglm_folder(root / kind, config, make_weights(layout_shapes(config)))
    for f in ("tokenizer.model", "tokenizer_config.json"):
        (folder / f).write_bytes((tok_dir / f).read_bytes())
    for f in ("modeling_chatglm.py", "configuration_chatglm.py", "tokenization_chatglm.py"):
        (folder / f).write_text(STAND_IN)
    return folder


RECORDS = [{"messages": [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "hello"}]},
           {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好 world"}]},
           {"messages": [{"role": "user", "content": "the test"}, {"role": "assistant", "content": "is a test"}]},
           {"messages": [{"role": "user", "content": "a world"}, {"role": "assistant", "content": "hello hello"}]}]


@pytest.fixture(scope="module", params=["chatglm2", "chatglm3", "glm4"])
def seed(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    folder = make_seed_twin(root, request.param)
    data = write_jsonl(root / "data.jsonl", RECORDS)
    return request.param, folder, data, root


def chattune(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "chattune", *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd)


def test_the_stand_ins_refuse_to_run(seed):
    from transformers import AutoModelForCausalLM

    _, folder, _, _ = seed
    with pytest.raises(RuntimeError, match="stand-in"):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)


def test_data_inspect_picks_the_family_template(seed):
    kind, folder, data, _ = seed
    r = chattune("data", "inspect", str(data), f"model={folder}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert "runs as transformers' GlmForCausalLM" in r.stderr + r.stdout
    assert ("<sop>" if kind == "glm4" else "sop") in r.stdout
    assert f"template: {kind} (template=auto: " in r.stdout
    if kind == "chatglm2":
        assert "[Round 1]" in r.stdout


def chat_eval_export(out: Path, data: Path, root: Path) -> Path:
    """`chat`, `eval` (loss and ROUGE) and `export` of the run in `out`, each exiting 0; the exported folder."""
    r = chattune("chat", "--adapter", str(out), "--prompt", "hello", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    r = chattune("eval", "--adapter", str(out), "--data", str(data), "--metrics", "rouge,loss", "--max-new-tokens",
                 "4", "--out", str(root / "eval"))
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert metrics["loss"] > 0
    merged = root / "merged"
    r = chattune("export", "--adapter", str(out), "--out", str(merged))
    assert r.returncode == 0, r.stderr[-3000:]
    return merged


def test_lora_trains_chats_evaluates_and_exports(seed):
    kind, folder, data, root = seed
    out = root / "lora"
    r = chattune("train", "lora", f"model={folder}", f"data.train={data}", f"output_dir={out}", "train.max_steps=2",
                 "train.batch_size=2", "lora.target=all", "train.logging_steps=1")
    assert r.returncode == 0, r.stderr[-3000:]
    adapter = json.loads((out / "adapter_config.json").read_text())
    targets = set(adapter["target_modules"]) if isinstance(adapter["target_modules"], list) else {
        adapter["target_modules"]}
    assert not any("lm_head" in t or "output_layer" in t for t in targets)
    merged = chat_eval_export(out, data, root)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(merged)  # plain transformers, no remote code
    assert type(model).__name__ == "GlmForCausalLM"
    assert (merged / "chat_template.jinja").is_file()
    tok = AutoTokenizer.from_pretrained(merged)
    prompt = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True)
    prompt = prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt
    first = ["[gMASK]", "<sop>"] if kind == "glm4" else ["[gMASK]", "sop"]
    assert tok.convert_ids_to_tokens(prompt[:2]) == first


METHODS = [("ptuning_v2", ["prefix.num_virtual_tokens=4"]),
           ("ptuning_v2", ["prefix.num_virtual_tokens=4", "prefix.projection=true"]),
           ("freeze", ["freeze.trainable_layers=1"]), ("sft", [])]


def train_and_answer(folder, data, out, method: str, extra: list[str]) -> None:
    """Two fp32 steps of `method` on the twin, then its output loads and answers."""
    from chattune.chat import answer_once
    from chattune.config import load_config
    from chattune.inference import load_tuned
    from chattune.train.trainer import train

    cfg = load_config(method, [f"model={folder}", f"data.train={data}", f"output_dir={out}", "train.max_steps=2",
                               "train.batch_size=2", "train.precision=fp32", "overwrite=true", *extra])
    result = train(cfg, log=lambda m: None)
    assert result.steps == 2 and result.final_loss is not None and torch.isfinite(torch.tensor(result.final_loss))
    tuned = load_tuned(adapter=str(out), log=lambda m: None)
    assert isinstance(answer_once(tuned, "hello", max_new_tokens=3), str)


@pytest.mark.parametrize("method, extra", METHODS)
def test_every_method_trains_and_its_output_answers(seed, method, extra):
    kind, folder, data, root = seed
    train_and_answer(folder, data, root / f"{method}-{len(extra)}", method, extra)


def test_serve_answers_on_the_twin(seed):
    import httpx

    from chattune.inference import load_tuned
    from chattune.serve.app import create_app
    from serve_helpers import running

    kind, folder, _, _ = seed
    tuned = load_tuned(model=str(folder), log=lambda m: None)
    assert type(tuned.model).__name__ == "GlmForCausalLM"
    with running(create_app(tuned)) as url:
        r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 4


def test_conversion_is_cached_by_the_source_files(seed, tmp_path):
    from chattune.models import native

    kind, folder, _, _ = seed
    out = native.ensure_native(folder, log=lambda m: None)
    assert native.ensure_native(folder, log=lambda m: pytest.fail("converted twice")) == out
    assert json.loads((out / native.MARKER).read_text())["family"] == kind
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    config["layernorm_epsilon"] = 1e-6  # another checkpoint: another cache folder
    (copy / "config.json").write_text(json.dumps(config))
    assert native.cache_folder(copy) != native.cache_folder(folder)


def test_convert_command_writes_a_native_folder(seed, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind, folder, _, _ = seed
    out = tmp_path / "native"
    r = chattune("convert", str(folder), str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == "GlmForCausalLM"
    assert AutoTokenizer.from_pretrained(out).chat_template
    assert not list(out.glob("*.py"))  # no remote code travels with it
    r = chattune("convert", str(folder), str(out))
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr


def test_other_remote_code_that_breaks_is_one_message_naming_the_call(tmp_path):
    """A remote-code model whose own code fails under today's transformers (here: it reads `config.max_length`,
    as ChatGLM's code written for transformers 4.x does) exits 2 with the failing file, line and function and the
    way out, never a traceback from inside its files."""
    from fixtures.make_remote_glm import make_remote_glm
    from tiny import make_tokenizer

    folder = make_remote_glm(tmp_path / "remote", vocab_size=300)
    make_tokenizer().save_pretrained(folder)
    code = folder / "modeling_tinyglm.py"
    text = code.read_text()
    text = text.replace("        super().__init__(config)\n",
                        "        super().__init__(config)\n        self.limit = config.max_length\n", 1)
    code.write_text(text)
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    r = chattune("train", "lora", f"model={folder}", f"data.train={data}", f"output_dir={tmp_path / 'out'}",
                 "model.trust_remote_code=true", "template=chatml", "train.max_steps=1")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    line = next(x for x in r.stderr.splitlines() if x.startswith("error:"))
    assert line.startswith("error: the model's own code fails under transformers ")
    assert "modeling_tinyglm.py, line " in line and "in __init__: AttributeError:" in line and "max_length" in line
    assert "fix: download the publisher's updated revision of the model (if it has one)" in r.stderr
