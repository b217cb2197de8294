"""Every command on tiny twins of ChatGLM-6B and TransNormerLLM whose own Python files refuse to run.

A twin is a checkpoint folder laid out as the publisher's (config.json with the published model_type and auto_map,
the weights under the published names, the tokenizer files with tokenizer_config.json), 2 layers with the
deterministic weights of the family tests (tests/test_family_chatglm6b.py, tests/test_family_transnormer.py) and the
tokenizer twins of the tokenizer tests. Its modeling / configuration / tokenization files are stand-ins that raise
when imported: chattune must never need them. chattune converts the folder once (models/native.py: config under
chattune's own model type, weights linked as published, a fast tokenizer) and runs its own model code.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_seed_glm import METHODS, STAND_IN, chat_eval_export, chattune, train_and_answer
from tiny import write_jsonl

FAMILIES = ["chatglm6b", "transnormer"]
RUNS_AS = {"chatglm6b": "runs as chattune's ChatGLM6BForCausalLM", "transnormer":
           "runs as chattune's TransnormerForCausalLM"}
MODEL_CLASS = {"chatglm6b": "ChatGLM6BForCausalLM", "transnormer": "TransnormerForCausalLM"}

RECORDS = [{"messages": [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "hello"}]},
           {"messages": [{"role": "user", "content": "the test"}, {"role": "assistant", "content": "is a test"}]},
           {"messages": [{"role": "user", "content": "a world"}, {"role": "assistant", "content": "hello hello"}]},
           {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"},
                         {"role": "user", "content": "the world"}, {"role": "assistant", "content": "a test"}]}]


def _stand_ins(folder: Path, names: tuple[str, ...]) -> None:
    for name in names:
        (folder / name).write_text(STAND_IN)


def make_transnormer_twin(root: Path) -> Path:
    from test_family_transnormer import TWIN, official_shapes, twin_weights
    from test_family_transnormer_tokenizer import write_twin

    folder = write_twin(root / "transnormer-1b")
    from chattune.models.families.transnormer_tokenizer import build_fast_tokenizer

    rows = max(len(build_fast_tokenizer(folder)), TWIN["vocab_size"])
    config = {**TWIN, "model_type": "transnormer", "vocab_size": rows, "_name_or_path": "OpenNLPLab/TransNormerLLM-1B"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    state = twin_weights(official_shapes(config))
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    torch.save(state, folder / "pytorch_model.bin")
    _stand_ins(folder, ("modeling_transnormer.py", "configuration_transnormer.py", "tokenization_baichuan.py",
                        "norm.py", "utils.py", "lightning_attention2.py"))
    return folder


def make_chatglm6b_twin(root: Path) -> Path:
    from test_family_chatglm6b import TWIN, make_weights, official_shapes
    from test_family_chatglm6b_tokenizer import write_twin

    folder = write_twin(root / "chatglm-6b")
    from chattune.models.families.chatglm6b_tokenizer import build_fast_tokenizer

    tok = build_fast_tokenizer(folder)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("[MASK]", "[gMASK]", "<sop>", "<eop>", "<pad>")}
    config = {**TWIN, "vocab_size": len(tok), "mask_token_id": ids["[MASK]"], "gmask_token_id": ids["[gMASK]"],
              "bos_token_id": ids["<sop>"], "eos_token_id": ids["<eop>"], "pad_token_id": ids["<pad>"],
              "_name_or_path": "THUDM/chatglm-6b",
              "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                           "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                           "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    state = make_weights(official_shapes(config))
    torch.save(state, folder / "pytorch_model.bin")
    _stand_ins(folder, ("modeling_chatglm.py", "configuration_chatglm.py", "tokenization_chatglm.py",
                        "quantization.py"))
    return folder


MAKERS = {"chatglm6b": make_chatglm6b_twin, "transnormer": make_transnormer_twin}


@pytest.fixture(scope="module", params=FAMILIES)
def seed(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    folder = MAKERS[request.param](root)
    data = write_jsonl(root / "data.jsonl", RECORDS)
    return request.param, folder, data, root


def test_the_stand_ins_refuse_to_run(seed):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, folder, _, _ = seed
    with pytest.raises(RuntimeError, match="stand-in"):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    with pytest.raises(RuntimeError, match="stand-in"):
        AutoTokenizer.from_pretrained(folder, trust_remote_code=True)


def test_data_inspect_picks_the_family_template(seed):
    kind, folder, data, _ = seed
    r = chattune("data", "inspect", str(data), f"model={folder}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert RUNS_AS[kind] in r.stderr + r.stdout
    assert f"template: {kind} (template=auto: the tokenizer was converted by chattune" in r.stdout
    # the first record as trained (trained tokens inside the brackets)
    if kind == "chatglm6b":
        assert "hello world[gMASK]⟦<sop> hello<eop>⟧" in r.stdout
    else:
        assert "Human:\nhello world\nAssistant:\n⟦hello</s>⟧" in r.stdout


def test_lora_trains_chats_evaluates_and_exports(seed):
    kind, folder, data, root = seed
    out = root / "lora"
    r = chattune("train", "lora", f"model={folder}", f"data.train={data}", f"output_dir={out}", "train.max_steps=2",
                 "train.batch_size=2", "train.logging_steps=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "packing: off (" in r.stdout + r.stderr
    adapter = json.loads((out / "adapter_config.json").read_text())
    targets = adapter["target_modules"]
    targets = set(targets) if isinstance(targets, list) else {targets}
    assert targets and not any("lm_head" in t for t in targets)
    merged = chat_eval_export(out, data, root)
    assert (merged / "chat_template.jinja").is_file()
    assert not list(merged.glob("*.py"))  # no remote code travels with it
    # loadable with chattune installed: importing it registers the model type with the Auto classes
    code = ("import chattune.models.families as f, sys, torch; f.register_all(); "
            "from transformers import AutoModelForCausalLM, AutoTokenizer; "
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1]); "
            "ids = t.apply_chat_template([{'role': 'user', 'content': 'hello'}], add_generation_prompt=True); "
            "ids = ids['input_ids'] if hasattr(ids, 'keys') else ids; "
            "out = m.generate(torch.tensor([ids]), max_new_tokens=2, do_sample=False); "
            "print(type(m).__name__, t.convert_ids_to_tokens(ids))")
    r = subprocess.run([sys.executable, "-c", code, str(merged)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith(MODEL_CLASS[kind])
    if kind == "chatglm6b":
        assert r.stdout.rstrip().endswith("'[gMASK]', '<sop>']")


@pytest.mark.parametrize("method, extra", METHODS)
def test_every_method_trains_and_its_output_answers(seed, method, extra):
    kind, folder, data, root = seed
    out = root / f"{method}-{len(extra)}"
    if kind == "transnormer" and method == "ptuning_v2":
        from chattune.config import load_config
        from chattune.errors import MethodError
        from chattune.train.trainer import train

        cfg = load_config(method, [f"model={folder}", f"data.train={data}", f"output_dir={out}", *extra])
        with pytest.raises(MethodError, match="does not apply to TransNormerLLM"):
            train(cfg, log=lambda m: None)
        return
    train_and_answer(folder, data, out, method, extra)


def test_what_cannot_apply_is_refused_before_loading(seed, tmp_path):
    """TransNormerLLM has no key/value cache for a P-tuning prefix; ChatGLM-6B cannot start a prefix from a bare
    text (its forward needs [gMASK] and <sop>). Both are one line, exit 2, before any conversion or loading."""
    kind, folder, data, _ = seed
    extra = ["prefix.init_text=hello"] if kind == "chatglm6b" else []
    r = chattune("train", "ptuning_v2", f"model={folder}", f"data.train={data}", f"output_dir={tmp_path / 'p'}",
                 *extra)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    said = ("does not apply to TransNormerLLM" if kind == "transnormer" else
            "prefix.init_text does not apply to ChatGLM-6B")
    assert said in r.stderr
    assert "converting" not in r.stderr + r.stdout  # refused before the model is loaded


def test_a_moved_checkpoint_converts_again(seed, tmp_path):
    """The cached folder links the published weights: an identical copy elsewhere gets its own cache folder, and a
    cache whose linked checkpoint is gone converts again."""
    import shutil

    from chattune.models import native

    kind, folder, _, _ = seed
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    out = native.ensure_native(copy, log=lambda m: None)
    assert out != native.ensure_native(folder, log=lambda m: None)
    assert (out / "pytorch_model.bin").resolve() == (copy / "pytorch_model.bin").resolve()
    (copy / "pytorch_model.bin").rename(tmp_path / "elsewhere.bin")
    assert not native.is_complete(out)
    (tmp_path / "elsewhere.bin").rename(copy / "pytorch_model.bin")
    shutil.rmtree(out)


def test_serve_answers_on_the_twin(seed):
    import httpx

    from chattune.inference import load_tuned
    from chattune.serve.app import create_app
    from serve_helpers import running

    kind, folder, _, _ = seed
    tuned = load_tuned(model=str(folder), log=lambda m: None)
    assert type(tuned.model).__name__ == MODEL_CLASS[kind]
    with running(create_app(tuned)) as url:
        r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 4


def test_conversion_links_the_published_weights_and_is_cached(seed):
    from chattune.models import native

    kind, folder, _, _ = seed
    out = native.ensure_native(folder, log=lambda m: None)
    assert native.ensure_native(folder, log=lambda m: pytest.fail("converted twice")) == out
    assert json.loads((out / native.MARKER).read_text())["family"] == kind
    weights = out / "pytorch_model.bin"
    assert weights.is_symlink() and weights.resolve() == (folder / "pytorch_model.bin").resolve()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == f"chattune_{kind}" and "auto_map" not in config
    generation = json.loads((out / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    stop = "<eop>" if kind == "chatglm6b" else "</s>"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids(stop) in (eos if isinstance(eos, list) else [eos])


def test_convert_command_copies_the_weights(seed, tmp_path):
    kind, folder, _, _ = seed
    out = tmp_path / "native"
    r = chattune("convert", str(folder), str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "pytorch_model.bin").is_file() and not (out / "pytorch_model.bin").is_symlink()
    assert not list(out.glob("*.py"))
    assert "once chattune is imported" in r.stderr + r.stdout


def test_the_family_template_renders_as_its_jinja_tokenizes(seed):
    """The exported chat_template.jinja, rendered to text and tokenized by the converted tokenizer, gives exactly
    the ids chattune trains on (for training conversations and for generation prompts)."""
    from transformers import AutoTokenizer

    from chattune.data.encode import encode_pieces
    from chattune.data.formats import Conversation, Message
    from chattune.data.template_files import to_messages
    from chattune.data.templates import get_template
    from chattune.models import native

    kind, folder, _, _ = seed
    tok = AutoTokenizer.from_pretrained(native.ensure_native(folder, log=lambda m: None))
    template = get_template("auto", tok)
    assert template.name == kind
    convs = [[("user", "hello world")], [("user", "hello"), ("assistant", "a test")],
             [("user", "hello"), ("assistant", "world"), ("user", "the  test\n\tline"), ("assistant", "hello hello")],
             [("user", "hello"), ("assistant", "world"), ("user", "the world")]]
    for turns in convs:
        conv = Conversation([Message(r, c) for r, c in turns], source="t")
        prompt = turns[-1][0] == "user"
        ids, _ = encode_pieces(template.pieces(conv, add_generation_prompt=prompt), tok)
        msgs, tools = to_messages(conv)
        text = tok.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=prompt)
        assert tok.encode(text, add_special_tokens=False) == ids, turns


def test_compare_runs_the_seed_experiment_on_a_chatglm6b_twin(tmp_path):
    """ChatGLM-Finetuning's experiment (Freeze, P-tuning v2 and LoRA on SPO-style triple extraction, ChatGLM-6B) as
    one `chattune compare` on the twin: every variant trains, is evaluated, and lands in the report."""
    import yaml

    folder = make_chatglm6b_twin(tmp_path)
    words = ["hello", "world", "test", "line"]
    data = write_jsonl(tmp_path / "spo.jsonl", [{"instruction": "extract", "input": f"{a} {b}",
                                                 "output": f"{a}_is_{b}"} for a in words for b in words])
    spec = {"train_data": str(data), "test_split": 0.25, "output_dir": str(tmp_path / "out"),
            "shared": {"model": str(folder), "train": {"max_steps": 2, "batch_size": 2, "precision": "fp32",
                                                       "logging_steps": 1}},
            "eval": {"metrics": "triple_f1,rouge", "max_new_tokens": 4, "batch_size": 2},
            "variants": [{"name": "lora", "overrides": {"method": "lora", "lora": {"r": 4}}},
                         {"name": "ptuning_v2", "overrides": {"method": "prefix",
                                                              "prefix": {"num_virtual_tokens": 4,
                                                                         "projection": True}}},
                         {"name": "freeze", "overrides": {"method": "freeze", "freeze": {"trainable_layers": 1}}}]}
    cfg = tmp_path / "compare.yaml"
    cfg.write_text(yaml.safe_dump(spec))
    r = chattune("compare", str(cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [row["variant"] for row in report["rows"]] == ["lora", "ptuning_v2", "freeze"]
    for row in report["rows"]:
        assert row["trainable_params"] > 0 and row["test_seconds"] > 0 and "triple_f1" in row
