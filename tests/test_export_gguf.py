"""`chattune export --format gguf`: llama.cpp (llama-cpp-python, built from source by the [test] extra) loads each
exported file, reads the chat template from it, tokenizes the prompt that template renders to exactly chattune's
prompt ids, and its greedy tokens equal chattune's own (transformers greedy on the same merged model).

Models: tiny random Llama (q/k/v/o biases, Llama 3 rope scaling), Mistral, Qwen2 (biases, tied head) and Glm (the
GLM family as chattune runs ChatGLM3 / GLM-4, with GLM-4's role tokens and chattune's glm4 template) built from a
config with the bundled model's real tokenizer; a LoRA run on the bundled model; the bundled model itself.
- f32: free-running greedy tokens equal, and every position's logits agree to 1e-4.
- f16 / bf16: on the bundled model free-running greedy tokens equal; on the tiny random models (whose 49152 logits
  are nearly uniform, so near-ties are common) the same token at every position of chattune's answer where its
  top-2 margin is not a near-tie (`NEAR_TIE`), given the same tokens so far.
- q8_0 / q4_0 change the weights: their agreement (the share of chattune's greedy positions where llama.cpp, given
  the same tokens so far, picks the same token) is printed ("[gguf agreement]") and only a floor is asserted.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import write_jsonl

from chattune.data.formats import Conversation, Message
from chattune.errors import ModelError
from chattune.export_gguf import GPT4_SPLIT, QWEN2_SPLIT, export_gguf, gguf_name, permute_rows
from chattune.inference import load_tuned

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is in the [test] extra (pip install -e .[test])")

PROMPTS = ["What is the capital of France?", "Write three numbers: 12 345 6789", "Say hello to Ana\nin two words."]
NEW_TOKENS = 12
# f16 / bf16 keep 11 / 8 bits of mantissa, and llama.cpp rounds the activations it multiplies such weights with to the
# same type: on the tiny random models (49152 near-uniform logits a few units apart) that flips choices whose top-2
# margin is ~0.01 (seen: at most 0.012). Elsewhere the choice must be the same; on the bundled model (a real model's
# margins) the free-running greedy tokens are the same.
NEAR_TIE = 0.05
FLOOR = {"q8_0": 0.8, "q4_0": 0.2}  # teacher-forced agreement; measured values are in docs/export.md
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="module")
def bundled() -> Path:
    from chattune.models.bundled import ensure_bundled_model

    return Path(ensure_bundled_model(log=lambda m: None))


# ---------------------------------------------------------------------------------------------- tiny models


def randomize(model, seed: int = 0):
    """Weights ~ N(0, 0.15) (norm weights 1 +- 0.2, biases ~ N(0, 0.1), never zero): next-token logits spread over
    several units rather than an initializer's near-zero ones, and every bias and norm is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "norm" in name else (0.1 if name.endswith("bias") else 0.15) * noise)
    return model


def tiny_config(family: str, vocab: int):
    from transformers import GlmConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1,
                  eos_token_id=2, pad_token_id=2)
    if family == "llama":  # biases on q/k/v/o (permuted with the rows) and Llama 3.1's rope scaling
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        return LlamaConfig(**common, attention_bias=True, tie_word_embeddings=False, rope_parameters=rope)
    if family == "mistral":
        return MistralConfig(**common, head_dim=16, tie_word_embeddings=False)
    if family == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True)
    return GlmConfig(**common, head_dim=16, partial_rotary_factor=0.5, attention_bias=True,
                     tie_word_embeddings=False)


GLM4_TOKENS = ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]


def make_tiny(path: Path, family: str, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A tiny random model of `family` saved with the bundled model's tokenizer; for glm with GLM-4's special tokens
    added (so chattune picks its glm4 template) and 2 embedding rows no token uses, as real GLM vocabularies have."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path.mkdir(parents=True)
    if family == "glm":
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        tokenizer.add_special_tokens({"additional_special_tokens": GLM4_TOKENS})
        tokenizer.save_pretrained(path)
        vocab = len(tokenizer) + 2
    else:
        for name in TOKENIZER_FILES:
            shutil.copy(tokenizer_dir / name, path / name)
        vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    torch.manual_seed(seed)
    model = randomize(AutoModelForCausalLM.from_config(tiny_config(family, vocab)), seed)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, bundled):
    root = tmp_path_factory.mktemp("tiny")
    return {f: make_tiny(root / f, f, bundled) for f in ("llama", "mistral", "qwen2", "glm")}


# ---------------------------------------------------------------------------------------------- running both


def chattune_greedy(tuned, prompt: str, n: int) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy tokens) as chattune prompts and transformers decodes, up to a stop token."""
    ids = tuned.prompt_ids(Conversation([Message("user", prompt)]))
    with torch.no_grad():
        out = tuned.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                   max_new_tokens=n, do_sample=False, eos_token_id=tuned.stop_ids,
                                   pad_token_id=tuned.pad_id)
    return ids, out[0, len(ids):].tolist()


def llama_greedy(llm, ids: list[int], n: int, stops: list[int]) -> list[int]:
    """llama.cpp's argmax token after each step (the same rule as transformers' greedy), up to a stop token."""
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    while len(out) < n:
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        if token in stops:
            break
        llm.eval([token])
    return out


def llama_prompt_ids(llm, prompt: str) -> list[int]:
    """The prompt as llama-cpp-python's chat path makes it: the file's own chat template, then its tokenizer."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    meta = llm.metadata
    formatter = Jinja2ChatFormatter(meta["tokenizer.chat_template"], eos_token=llm.detokenize([llm.token_eos()],
                                    special=True).decode(), bos_token=llm.detokenize([llm.token_bos()],
                                    special=True).decode())
    text = formatter(messages=[{"role": "user", "content": prompt}]).prompt
    return llm.tokenize(text.encode("utf-8"), add_bos=meta.get("tokenizer.ggml.add_bos_token") == "true",
                        special=True)


def open_gguf(path: Path):
    """logits_all: llama-cpp-python keeps the logits (`scores`) only then; an f32 key/value cache (llama.cpp's
    default is f16) so that an f32 file computes in f32 throughout, as transformers does here."""
    f32 = llama_cpp.GGML_TYPE_F32
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, n_batch=256, verbose=False, logits_all=True,
                           type_k=f32, type_v=f32)


def compare(tuned, gguf_file: Path, n: int = NEW_TOKENS) -> list[tuple[list[int], list[int]]]:
    """[(chattune's greedy tokens, llama.cpp's)] for each prompt; checks the prompt and the template on the way."""
    llm = open_gguf(gguf_file)
    try:
        from chattune.data.template_files import chat_template_jinja

        assert llm.metadata["tokenizer.chat_template"] == chat_template_jinja(tuned.template, tuned.tokenizer)
        pairs = []
        for prompt in PROMPTS:
            ids, ours = chattune_greedy(tuned, prompt, n)
            assert llama_prompt_ids(llm, prompt) == ids
            pairs.append((ours, llama_greedy(llm, ids, n, tuned.stop_ids)))
        return pairs
    finally:
        llm.close()


def teacher_forced(tuned, gguf_file: Path, n: int = NEW_TOKENS) -> list[tuple[bool, float]]:
    """For every position of chattune's greedy answers to PROMPTS: (whether llama.cpp, given the same tokens so far,
    picks chattune's token; chattune's margin between its best and second-best logit there)."""
    llm = open_gguf(gguf_file)
    out = []
    try:
        for prompt in PROMPTS:
            ids, ours = chattune_greedy(tuned, prompt, n)
            sequence = ids + ours
            with torch.no_grad():
                logits = tuned.model(torch.tensor([sequence])).logits[0, len(ids) - 1:-1]
            top2 = logits.topk(2).values
            llm.reset()
            llm.eval(sequence)
            theirs = np.array(llm.scores[len(ids) - 1:len(sequence) - 1]).argmax(axis=1)
            out += [(int(t) == o, float(m)) for t, o, m in zip(theirs, ours, top2[:, 0] - top2[:, 1])]
    finally:
        llm.close()
    return out


def agreement(positions: list[tuple[bool, float]]) -> float:
    return sum(same for same, _ in positions) / len(positions)


def report(capsys, what: str, value: float) -> None:
    with capsys.disabled():
        print(f"\n[gguf agreement] {what}: {value:.2f}")


# ---------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "glm"])
def test_tiny_models_give_chattunes_greedy_tokens(tiny_models, tmp_path, family, capsys):
    folder = tiny_models[family]
    tuned = load_tuned(model=str(folder), log=lambda m: None)
    for quant in ("f32", "f16", "bf16", "q8_0", "q4_0"):
        gguf_file = export_gguf(None, tmp_path / quant, quant, model=str(folder), log=lambda m: None)
        assert gguf_file == tmp_path / quant / gguf_name(quant)
        pairs = compare(tuned, gguf_file)
        if quant == "f32":
            assert [theirs for _, theirs in pairs] == [ours for ours, _ in pairs], quant
            continue
        positions = teacher_forced(tuned, gguf_file)
        report(capsys, f"{family} {quant}", agreement(positions))
        if quant in ("f16", "bf16"):  # the same token wherever the choice is not a near-tie that rounding decides
            decided = [same for same, margin in positions if margin >= NEAR_TIE]
            assert all(decided) and len(decided) >= 0.75 * len(positions)
        else:
            assert agreement(positions) >= FLOOR[quant], quant


def test_f32_logits_match_transformers(tiny_models, tmp_path):
    """Beyond greedy tokens: every position's logits agree to float32 rounding (logits of up to ~6), for every
    architecture; a wrong rope permutation or frequency would move them by whole units."""
    for family, folder in tiny_models.items():
        tuned = load_tuned(model=str(folder), log=lambda m: None)
        ids = tuned.prompt_ids(Conversation([Message("user", PROMPTS[1])]))
        with torch.no_grad():
            expected = tuned.model(torch.tensor([ids])).logits[0].numpy()
        gguf_file = export_gguf(None, tmp_path / family, "f32", model=str(folder), log=lambda m: None)
        llm = open_gguf(gguf_file)
        try:
            llm.eval(ids)
            got = np.array(llm.scores[: len(ids)])
        finally:
            llm.close()
        assert np.abs(expected).max() > 1.0  # logits of a real spread, not all ~0
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0, err_msg=family)  # seen: at most 9e-6


@pytest.mark.slow
def test_bundled_model_every_quant(bundled, tmp_path, capsys):
    tuned = load_tuned(model="bundled", log=lambda m: None)
    for quant in ("f16", "bf16", "q8_0", "q4_0"):
        gguf_file = export_gguf(None, tmp_path / quant, quant, model="bundled", log=lambda m: None)
        pairs = compare(tuned, gguf_file, n=20)
        if quant in ("f16", "bf16"):  # a real model's choices have real margins: free-running greedy is the same
            assert [theirs for _, theirs in pairs] == [ours for ours, _ in pairs], quant
        else:
            share = agreement(teacher_forced(tuned, gguf_file, n=20))
            report(capsys, f"bundled {quant}", share)
            assert share >= FLOOR[quant], quant


BUNDLED_MODELFILE = '''# chattune export --format gguf: the model, with the prompt format and stop tokens chattune trained it with
FROM ./model-f32.gguf
TEMPLATE """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{- range .Messages }}{{ if eq .Role "user" "assistant" }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}{{ end }}<|im_start|>assistant
"""
SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""
PARAMETER stop "<|im_end|>"
'''


@pytest.mark.slow
def test_bundled_lora_run_is_merged_and_exported(bundled, tmp_path):
    """A LoRA run on the bundled model: merged as `--format hf` merges it, written f32; llama.cpp answers as
    `chattune chat --adapter RUN` does, and the Modelfile renders the run's (ChatML) prompts."""
    from chattune.config import load_config
    from chattune.train.trainer import train

    data = write_jsonl(tmp_path / "data.jsonl", [{"instruction": p, "output": "Paris is nice."} for p in PROMPTS])
    run = tmp_path / "run"
    cfg = load_config(None, ["model=bundled", f"data.train={data}", f"output_dir={run}", "train.max_steps=2",
                             "train.batch_size=1", "data.max_length=64", "train.precision=fp32", "train.lr=1e-2",
                             "method=lora", "lora.r=4", "lora.target=all"])
    train(cfg, log=lambda m: None)
    tuned = load_tuned(adapter=str(run), log=lambda m: None)
    messages = []
    gguf_file = export_gguf(run, tmp_path / "gguf", "f32", log=messages.append)
    pairs = compare(tuned, gguf_file, n=20)
    assert [theirs for _, theirs in pairs] == [ours for ours, _ in pairs]
    assert sorted(p.name for p in (tmp_path / "gguf").iterdir()) == ["Modelfile", "model-f32.gguf"]  # no merge left
    assert (tmp_path / "gguf" / "Modelfile").read_text() == BUNDLED_MODELFILE
    assert any("exported" in m and "Modelfile" in m for m in messages)


# ---------------------------------------------------------------------------------------------- file details


def test_glm_metadata_tokens_and_stops(tiny_models, tmp_path):
    """The GLM file: llama.cpp's chatglm architecture, half-width rope, fused MLP as ffn_up, GLM-4's role tokens as
    control tokens, unused rows as [PAD], and llama.cpp stops at every token chattune stops at."""
    import gguf

    tuned = load_tuned(model=str(tiny_models["glm"]), log=lambda m: None)
    assert tuned.template.name == "glm4"
    gguf_file = export_gguf(None, tmp_path / "glm", "q8_0", model=str(tiny_models["glm"]), log=lambda m: None)
    reader = gguf.GGUFReader(gguf_file)
    field = {k: reader.fields[k].contents() for k in ("general.architecture", "tokenizer.ggml.model",
                                                      "tokenizer.ggml.pre", "chatglm.rope.dimension_count",
                                                      "tokenizer.ggml.add_bos_token", "general.file_type")}
    assert field == {"general.architecture": "chatglm", "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
                     "chatglm.rope.dimension_count": 8, "tokenizer.ggml.add_bos_token": False,
                     "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q8_0)}
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    first = len(tokens) - 8  # the 6 GLM-4 tokens, then 2 rows no token uses
    assert tokens[first:] == GLM4_TOKENS + [f"[PAD{first + 6}]", f"[PAD{first + 7}]"]
    assert types[first:] == [int(gguf.TokenType.CONTROL)] * 6 + [int(gguf.TokenType.UNUSED)] * 2
    ids = tuned.tokenizer.convert_tokens_to_ids(["<|user|>", "<|observation|>"])
    assert [reader.fields[f"tokenizer.ggml.{k}_token_id"].contents() for k in ("eot", "eom")] == ids
    tensor_types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert tensor_types["blk.0.ffn_up.weight"] == "Q8_0" and tensor_types["blk.0.attn_q.bias"] == "F32"
    assert tensor_types["blk.0.attn_norm.weight"] == "F32" and tensor_types["output.weight"] == "Q8_0"
    assert [t.shape.tolist() for t in reader.tensors if t.name == "blk.0.ffn_up.weight"] == [[64, 256]]
    llm = open_gguf(gguf_file)
    try:
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        assert all(llama_cpp.llama_vocab_is_eog(vocab, i) for i in tuned.stop_ids)
    finally:
        llm.close()
    modelfile = (tmp_path / "glm" / "Modelfile").read_text()
    assert 'TEMPLATE """[gMASK]<sop>{{ if .System }}<|system|>\n{{ .System }}{{ end }}' in modelfile
    # chattune's glm4 stops: eos (here the bundled <|endoftext|>, which is also its unk, so not a stop), <|user|>, ...
    assert modelfile.endswith('PARAMETER stop "<|user|>"\nPARAMETER stop "<|observation|>"\n')


SAMPLES = ["Hello world! It's 2024-12-05: 3.14, 123456789 and 7 apples.", "  two spaces\n\n\ttab\r\nCRLF   end  ",
           "I'VE been 'told he's there, 'RE you sure?", "naïve café, Straße — 東京で 🚀🦙 ok", "x  \n  y\n\n\nz",
           "<|im_start|>user\nHi<|im_end|>\n"]
_BYTES = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}


def _split(regex: str) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}, _BYTES]}


# name: (model, pre_tokenizer, ignore_merges, llama.cpp's name for it). transformers' Qwen2Tokenizer always splits with
# Qwen2's regex, whatever tokenizer.json says; chattune exports the tokenizer as it runs.
PRE_TOKENIZER_CASES = {
    "gpt2": ("mistral", {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
             False, "gpt-2"),
    "smollm": ("mistral", {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}, False, "smollm"),
    "qwen2": ("qwen2", _split(QWEN2_SPLIT), False, "qwen2"),
    "llama3": ("llama", _split(GPT4_SPLIT), True, "llama-bpe"),
    "glm4": ("glm", _split(GPT4_SPLIT), True, "glm4"),
    "gpt4-with-merges": ("mistral", _split(GPT4_SPLIT), False, "chatglm-bpe"),
}


@pytest.mark.parametrize("case", list(PRE_TOKENIZER_CASES))
def test_pre_tokenizers_split_as_the_tokenizer_does(tiny_models, tmp_path, case):
    """Each pre-tokenizer chattune maps to a llama.cpp name tokenizes sample text to the same ids in llama.cpp as in
    transformers (the bundled vocab and merges under that pre-tokenizer)."""
    from transformers import AutoTokenizer

    family, pre_tokenizer, ignore_merges, name = PRE_TOKENIZER_CASES[case]
    folder = tmp_path / "m"
    shutil.copytree(tiny_models[family], folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["pre_tokenizer"], spec["model"]["ignore_merges"] = pre_tokenizer, ignore_merges
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    gguf_file = export_gguf(None, tmp_path / "o", "f16", model=str(folder), log=lambda m: None)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    llm = llama_cpp.Llama(model_path=str(gguf_file), vocab_only=True, verbose=False)
    try:
        assert llm.metadata["tokenizer.ggml.pre"] == name
        for text in SAMPLES:
            expected = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == expected, text
    finally:
        llm.close()


def test_q4_0_keeps_the_head_at_q8_0(tiny_models, tmp_path):
    import gguf

    gguf_file = export_gguf(None, tmp_path / "q", "q4_0", model=str(tiny_models["qwen2"]), log=lambda m: None)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(gguf_file).tensors}
    assert "output.weight" not in types  # tied: llama.cpp reads the head from token_embd
    assert types["token_embd.weight"] == "Q8_0" and types["blk.1.attn_v.weight"] == "Q4_0"


def test_permute_rows_pairs_the_halves_of_each_head():
    w = np.arange(8)[:, None] * np.ones((1, 3))  # 2 heads of 4 rows: [0 1 | 2 3], [4 5 | 6 7]
    assert permute_rows(w, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert permute_rows(np.arange(8.0), 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_modelfile_for_other_templates(bundled):
    """llama3 gets its TEMPLATE with the one divergence noted; a template Ollama's syntax cannot hold, and a model's
    own jinja unlike every built-in, get none and say why."""
    from transformers import AutoTokenizer

    from chattune.data.templates import TokenizerTemplate, get_template
    from chattune.export_ollama import modelfile_text

    tokenizer = AutoTokenizer.from_pretrained(bundled)
    text, why = modelfile_text("m.gguf", get_template("llama3"), tokenizer)
    assert why is None and "# Note: chattune strips leading/trailing whitespace of each message" in text
    assert 'TEMPLATE """<|begin_of_text|>{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n' in text
    text, why = modelfile_text("m.gguf", get_template("transnormer"), tokenizer)
    assert why.startswith("chattune's `transnormer` template has no Ollama (Go template) form here")
    assert f"# No TEMPLATE: {why}" in text and "TEMPLATE" not in text.replace("# No TEMPLATE", "")
    tokenizer.chat_template = ("{% for m in messages %}{{ '[INST] ' + m['content'] + ' [/INST]' }}{% endfor %}")
    text, why = modelfile_text("m.gguf", TokenizerTemplate(tokenizer), tokenizer)
    assert why.startswith("the model's own chat template renders unlike chattune's chatml, llama3 and glm4")
    assert text.splitlines()[1:] == ["FROM ./m.gguf", f"# No TEMPLATE: {why}", 'PARAMETER stop "<|im_end|>"']


# ---------------------------------------------------------------------------------------------- refusals


def test_refusals(tiny_models, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=49152)).save_pretrained(gpt2)
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_models["llama"] / name, gpt2 / name)
    with pytest.raises(ModelError, match=r"the architecture GPT2LMHeadModel \(model_type gpt2\) is not one"):
        export_gguf(None, tmp_path / "o1", "f16", model=str(gpt2), log=lambda m: None)
    assert not (tmp_path / "o1").exists()  # nothing half-written
    with pytest.raises(ModelError, match="--quant q5_k: choose one of f32, f16, bf16, q8_0, q4_0"):
        export_gguf(None, tmp_path / "o2", "q5_k", model=str(tiny_models["llama"]), log=lambda m: None)
    with pytest.raises(ModelError, match="either --adapter RUN .* or --model PATH"):
        export_gguf(tmp_path, tmp_path / "o3", "f16", model="bundled", log=lambda m: None)


def test_sentencepiece_tokenizer_is_refused(tiny_models, tmp_path):
    folder = tmp_path / "spm"
    shutil.copytree(tiny_models["mistral"], folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["model"]["byte_fallback"] = True  # what Llama 2 / Mistral 7B tokenizer.json files have
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ModelError, match="the tokenizer is not byte-level BPE .* SentencePiece-style"):
        export_gguf(None, tmp_path / "o", "f16", model=str(folder), log=lambda m: None)


def test_prefix_adapter_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(ModelError, match="P-tuning v2 \\(prefix\\) adapter: .* no GGUF file can hold it"):
        export_gguf(run, tmp_path / "o", "f16", log=lambda m: None)


def test_cli(tiny_models, tmp_path):
    from chattune.cli import main

    out = tmp_path / "cli"
    assert main(["export", "--format", "gguf", "--quant", "q8_0", "--model", str(tiny_models["qwen2"]),
                 "--out", str(out)]) == 0
    assert (out / "model-q8_0.gguf").is_file() and (out / "Modelfile").is_file()
    assert main(["export", "--model", str(tiny_models["qwen2"]), "--out", str(tmp_path / "x")]) == 2
    assert main(["export", "--adapter", str(tmp_path), "--quant", "f16", "--out", str(tmp_path / "y")]) == 2
    assert main(["export", "--format", "gguf", "--out", str(tmp_path / "z")]) == 2
