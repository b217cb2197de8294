"""`lora.target=all` never adapts the output head, on any model: the head is `get_output_embeddings()` where the
model defines it, else recognised by what it is (methods/common.py: output_head) — a module whose weight maps the
hidden size to the vocabulary, tied to the input embedding, named like a head, or the last such one. Checked on a
tiny Llama (lm_head, tied or not), the ChatGLM-layout remote-code fixture whose `transformer.output_layer` is not
reachable through `get_output_embeddings` (in memory, and trained end to end from a folder whose code lacks the
method), a tied head that only the tie identifies, and `chattune estimate`'s head rule."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from fixtures.make_remote_glm import _load_code, make_remote_glm
from tiny import VOCAB_SIZE, make_tokenizer, write_jsonl

from chattune.config import load_config
from chattune.estimate import _quantizable_weights
from chattune.methods.common import output_head
from chattune.methods.lora import linear_module_names, resolve_targets
from chattune.train.trainer import train

H, I, L, V = 32, 64, 2, VOCAB_SIZE  # the fixtures' hidden, intermediate, layers; tests/tiny.py's vocabulary
LLAMA_LEAVES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj"]
GLM_LEAVES = ["self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]
GLM_LINEARS = [(H, 3 * H), (H, H), (H, 2 * I), (I, H)]  # (in, out) of GLM_LEAVES


def tiny_llama(tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie))


def tiny_glm(tie: bool = False):
    config_class, model_class = _load_code()
    torch.manual_seed(0)
    model = model_class(config_class(vocab_size=V, tie_word_embeddings=tie))
    if tie:
        model.transformer.output_layer.weight = model.get_input_embeddings().weight
    return model


@pytest.fixture
def glm_without_head_getter(monkeypatch):
    """The fixture's class with `get_output_embeddings` answering None, as ChatGLM's own code does."""
    _, model_class = _load_code()
    monkeypatch.setattr(model_class, "get_output_embeddings", lambda self: None)


def layer_names(prefix: str, leaves: list[str]) -> list[str]:
    return [f"{prefix}.{i}.{leaf}" for i in range(L) for leaf in leaves]


# ---------------------------------------------------------------- Llama: lm_head, as before


@pytest.mark.parametrize("tie", [False, True])
def test_llama_all_adapts_every_projection_but_lm_head(tie):
    model = tiny_llama(tie)
    assert output_head(model) is model.lm_head
    assert resolve_targets(model, "all") == layer_names("model.layers", LLAMA_LEAVES)


def test_a_tied_llama_head_is_found_without_get_output_embeddings(monkeypatch):
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(LlamaForCausalLM, "get_output_embeddings", lambda self: None)
    model = tiny_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert output_head(model) is model.lm_head
    assert resolve_targets(model, "all") == layer_names("model.layers", LLAMA_LEAVES)


# ---------------------------------------------------------------- ChatGLM layout: transformer.output_layer


@pytest.mark.parametrize("tie", [False, True])
def test_glm_output_layer_is_the_head_without_get_output_embeddings(glm_without_head_getter, tie):
    model = tiny_glm(tie)
    assert model.get_output_embeddings() is None
    assert output_head(model) is model.transformer.output_layer
    assert "transformer.output_layer" not in linear_module_names(model)
    assert resolve_targets(model, "all") == layer_names("transformer.encoder.layers", GLM_LEAVES)


def test_glm_lora_all_trains_exactly_the_layer_adapters(glm_without_head_getter):
    from peft import LoraConfig, get_peft_model

    net = get_peft_model(tiny_glm(), LoraConfig(r=8, target_modules=resolve_targets(tiny_glm(), "all"),
                                                task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert trainable == L * sum(8 * (i + o) for i, o in GLM_LINEARS)
    assert not any("output_layer" in name for name, p in net.named_parameters() if p.requires_grad)


def test_glm_head_by_its_name_when_its_shape_is_square(glm_without_head_getter):
    """hidden == vocab: every hidden x hidden projection has the head's shape; its name still tells it apart."""
    config_class, model_class = _load_code()
    model = model_class(config_class(vocab_size=H))
    assert output_head(model) is model.transformer.output_layer
    assert resolve_targets(model, "all") == layer_names("transformer.encoder.layers", GLM_LEAVES)


def test_a_remote_code_model_without_get_output_embeddings_trains_without_a_head_adapter(tmp_path):
    """End to end: the folder's own code (loaded with trust_remote_code) defines no get_output_embeddings."""
    path = make_remote_glm(tmp_path / "glm_no_head_getter", vocab_size=V)
    code = path / "modeling_tinyglm.py"
    source = code.read_text()
    getter = "    def get_output_embeddings(self):\n        return self.transformer.output_layer\n\n"
    assert getter in source
    code.write_text(source.replace(getter, ""))
    make_tokenizer(eos="</s>").save_pretrained(path)
    data = write_jsonl(tmp_path / "data.jsonl", [{"instruction": f"say {w}", "output": w} for w in ("a", "bb")])
    cfg = load_config(None, [f"model={path}", f"data.train={data}", f"output_dir={tmp_path / 'out'}",
                             "model.trust_remote_code=true", "template=chatglm3", "train.precision=fp32",
                             "train.num_threads=1", "train.max_steps=1", "train.batch_size=2", "lora.target=all"])
    result = train(cfg, log=lambda m: None)
    net = result.run.model
    assert net.get_base_model().get_output_embeddings() is None  # the code really lacks it
    assert result.trainable_params == L * sum(8 * (i + o) for i, o in GLM_LINEARS)
    assert not any("output_layer" in name for name, _ in net.named_parameters() if "lora_" in name)


# ---------------------------------------------------------------- a tie alone identifies the head


class _Toy(torch.nn.Module):
    """hidden == vocab and a head with no head-like name: only the tie to the input embedding tells."""

    def __init__(self, tie: bool):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=16, hidden_size=16)
        self.embed = torch.nn.Embedding(16, 16)
        self.mix = torch.nn.Linear(16, 16)
        self.unembed = torch.nn.Linear(16, 16, bias=False)
        if tie:
            self.unembed.weight = self.embed.weight

    def get_input_embeddings(self):
        return self.embed


def test_a_tied_head_is_found_by_the_tie_alone():
    toy = _Toy(tie=True)
    assert output_head(toy) is toy.unembed
    assert linear_module_names(toy) == ["mix"]
    untied = _Toy(tie=False)  # square, unnamed, untied: nothing says which is the head, so none is taken for it
    assert output_head(untied) is None


def test_a_vocabulary_projection_is_the_head_by_its_shape():
    """Neither get_output_embeddings, a tie nor a head-like name: the [vocab, hidden] weight decides."""
    toy = torch.nn.Module()
    toy.config = SimpleNamespace(padded_vocab_size=40, hidden_size=16)
    toy.proj = torch.nn.Linear(16, 16)
    toy.to_vocab = torch.nn.Linear(16, 40)
    assert output_head(toy) is toy.to_vocab
    assert linear_module_names(toy) == ["proj"]


# ---------------------------------------------------------------- estimate: the same head rule


def test_estimate_counts_quantizable_weights_without_the_unnamed_head(glm_without_head_getter):
    model = tiny_glm()
    assert _quantizable_weights(model) == L * sum(i * o for i, o in GLM_LINEARS)  # output_layer (V x H) excluded


def test_estimate_counts_quantizable_weights_without_lm_head():
    assert _quantizable_weights(tiny_llama()) == L * sum(
        m.weight.numel() for m in tiny_llama().model.layers[0].modules() if isinstance(m, torch.nn.Linear))
