"""models/layers.py: a model's decoder layers found by structure (freeze, lora.layers, train.compile, the decode
step, estimate), and the projections that read one input (lora.fuse's probe, the decode step's fused groups,
estimate's shared masks) — on transformers' models, chattune's own families, remote-code layouts and MoE models."""

from __future__ import annotations

import types
import warnings

import pytest
import torch
import transformers
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM

from chattune.models.layers import (ATTENTION_INPUT, KNOWN_SHARED, MLP_INPUT, decoder_layers, known_shared,
                                    layer_count, shared_input_groups)

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def on_meta(build):
    """The model `build()` makes, on the meta device (its real module tree, no memory)."""
    with init_empty_weights(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build()


def auto(config):
    return lambda: AutoModelForCausalLM.from_config(config)


# ---------------------------------------------------------------- layouts


def chatglm6b():
    from chattune.models.families.chatglm6b import ChatGLM6BConfig, ChatGLM6BForCausalLM

    return ChatGLM6BForCausalLM(ChatGLM6BConfig(vocab_size=128, hidden_size=64, num_layers=3, num_attention_heads=4,
                                                 inner_hidden_size=128))


def transnormer():
    from chattune.models.families.transnormer import TransnormerConfig, TransnormerForCausalLM

    return TransnormerForCausalLM(TransnormerConfig(vocab_size=128, decoder_embed_dim=64, decoder_layers=3,
                                                    decoder_attention_heads=4, glu_dim=128))


def remote_glm():
    """The test suite's remote-code ChatGLM stand-in (tests/fixtures/remote_glm): `transformer.encoder.layers`."""
    from fixtures.make_remote_glm import _load_code

    config_class, model_class = _load_code()
    return model_class(config_class(vocab_size=128, num_layers=3))


class _Expert(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(h, 2 * h), nn.Linear(2 * h, h), nn.Linear(h, 2 * h)


class _Layer(nn.Module):
    def __init__(self, h, experts):
        super().__init__()
        self.self_attn = nn.Linear(h, h)
        self.mlp = nn.Module()
        self.mlp.gate = nn.Linear(h, experts)
        self.mlp.experts = nn.ModuleList(_Expert(h) for _ in range(experts))


class RemoteMoe(nn.Module):
    """A mixture-of-experts model as remote code (and transformers 4.x's Mixtral, Qwen2-MoE) lays it out: each
    layer's experts in a ModuleList, longer than the list of layers."""

    def __init__(self, layers=2, experts=8, h=16, config=True):
        super().__init__()
        if config:
            self.config = types.SimpleNamespace(num_hidden_layers=layers)
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(32, h)
        self.model.layers = nn.ModuleList(_Layer(h, experts) for _ in range(layers))
        self.lm_head = nn.Linear(h, 32)


def jamba():  # a hybrid: Mamba and attention layers of two classes in one list
    return AutoModelForCausalLM.from_config(transformers.JambaConfig(
        **{**SMALL, "num_hidden_layers": 4}, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
        expert_layer_offset=1, num_experts=4))


def llava():  # a vision tower with more, and larger, layers than the language model
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    return LlavaForConditionalGeneration(LlavaConfig(
        text_config=LlamaConfig(**SMALL), vision_config=CLIPVisionConfig(
            hidden_size=128, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4, image_size=32,
            patch_size=8)))


LAYOUTS = {
    "llama": (auto(transformers.LlamaConfig(**SMALL)), "model.layers", 3),
    "qwen2": (auto(transformers.Qwen2Config(**SMALL)), "model.layers", 3),
    "glm": (auto(transformers.GlmConfig(**SMALL, head_dim=16)), "model.layers", 3),
    "gpt2": (auto(transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=3, n_head=4)), "transformer.h", 3),
    "qwen2_moe": (auto(transformers.Qwen2MoeConfig(**SMALL, num_experts=8, num_experts_per_tok=2,
                                                   moe_intermediate_size=32, shared_expert_intermediate_size=32)),
                  "model.layers", 3),
    "mixtral": (auto(transformers.MixtralConfig(**SMALL, num_local_experts=8)), "model.layers", 3),
    "chatglm6b": (chatglm6b, "transformer.layers", 3),
    "transnormer": (transnormer, "model.layers", 3),
    "remote_glm": (remote_glm, "transformer.encoder.layers", 3),
    "remote_moe": (RemoteMoe, "model.layers", 2),
    "remote_moe_no_config": (lambda: RemoteMoe(config=False), "model.layers", 2),
    "jamba": (jamba, "model.layers", 4),
    "llava": (llava, "model.language_model.layers", 3),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_decoder_layers_of_every_layout(name):
    build, path, length = LAYOUTS[name]
    model = on_meta(build)
    found, layers = decoder_layers(model)
    assert (found, len(layers)) == (path, length)
    assert dict(model.named_modules())[found] is layers


# The rules before models/layers.py, kept here to show where the new one differs.
def old_freeze_rule(model):
    """methods/freeze.py's: the ModuleList of one class with the most parameters."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[1]:
                best = (name, size)
    return best and best[0]


def old_compile_rule(model):
    """train/compile.py's: the longest ModuleList of one class whose first entry holds parameters."""
    best, found = 0, None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > best and len({type(m) for m in module}) == 1 \
                and any(True for _ in module[0].parameters()):
            best, found = len(module), name
    return found


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_where_the_old_rules_differed_the_new_one_is_right(name):
    """The old freeze rule (most parameters) agrees with the new one on every layout tests covered before; it
    differs only where it was wrong: a hybrid model whose layers are of two classes (it found no layers: freeze and
    lora.layers failed) and a vision-language model whose vision tower outweighs the language layers (it trained
    the vision tower's layers). The old compile rule (the longest list) took a remote-code MoE's experts."""
    model = on_meta(LAYOUTS[name][0])
    new = decoder_layers(model)[0]
    freeze_before = {"jamba": None, "llava": "model.vision_tower.encoder.layers"}
    assert old_freeze_rule(model) == freeze_before.get(name, new)
    compile_before = {"jamba": None, "llava": "model.vision_tower.encoder.layers",
                      "remote_moe": "model.layers.0.mlp.experts", "remote_moe_no_config": "model.layers.0.mlp.experts"}
    assert old_compile_rule(model) == compile_before.get(name, new)


def test_no_layers_is_none_and_a_freeze_error():
    from chattune.errors import MethodError
    from chattune.methods import freeze
    from chattune.train import compile as compile_module

    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    assert decoder_layers(plain) is None and compile_module.decoder_layers(plain) == []
    with pytest.raises(MethodError, match="found no list of decoder layers"):
        freeze.decoder_layers(plain)
    nested = nn.Module()  # a list inside another list's entry is never the layers, even the longer one
    nested.blocks = nn.ModuleList([nn.Module()])
    nested.blocks[0].inner = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
    assert decoder_layers(nested) == ("blocks", nested.blocks)
    empty = nn.Module()  # nor a list of blocks without parameters
    empty.acts = nn.ModuleList([nn.ReLU(), nn.ReLU()])
    assert decoder_layers(empty) is None


def test_through_peft_and_every_caller_uses_it(tmp_path):
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    from chattune.methods import freeze
    from chattune.models.decode_step import DecodeStep
    from chattune.train import compile as compile_module
    from tiny import make_tiny_llama

    path = make_tiny_llama(tmp_path / "m")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), LoraConfig(r=2, target_modules="all-linear"))
    name, layers = decoder_layers(model)
    assert name == "base_model.model.model.layers" and layers is model.base_model.model.model.layers
    assert freeze.decoder_layers(model) == (name, layers)
    assert compile_module.decoder_layers(model) == list(layers)
    step = DecodeStep(model.eval())
    assert [s.norm1 for s in step.layers] == [layer.input_layernorm.weight for layer in layers]
    prefix = get_peft_model(AutoModelForCausalLM.from_pretrained(path),
                            PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    assert decoder_layers(prefix)[0] == "base_model.model.layers"


def test_layer_count_from_configs_and_config_json():
    from chattune.models.families.transnormer import TransnormerConfig

    assert layer_count(transformers.LlamaConfig(num_hidden_layers=5)) == 5
    assert layer_count(TransnormerConfig(decoder_layers=7)) == 7  # through its attribute_map
    assert layer_count(transformers.GPT2Config(n_layer=4)) == 4
    assert layer_count({"num_layers": 28}) == 28 and layer_count({"n_layer": 12}) == 12
    assert layer_count({"text_config": {"num_hidden_layers": 6}, "vision_config": {"num_hidden_layers": 24}}) == 6
    assert layer_count({"hidden_size": 8}) is None and layer_count(None) is None
    assert layer_count({"num_hidden_layers": True}) is None


# ---------------------------------------------------------------- projections that read one input


def test_known_shared_names():
    assert KNOWN_SHARED[:2] == (ATTENTION_INPUT, MLP_INPUT) == (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
    assert known_shared(["o_proj", "v_proj", "q_proj", "k_proj", "up_proj", "gate_proj", "down_proj"]) == [
        ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")]
    assert known_shared(["q_proj", "v_proj", "w1"]) == [("q_proj", "v_proj")]  # present members, in group order
    assert known_shared(["q_proj", "dense"]) == []


def test_the_probe_finds_what_the_names_say_on_llama(tmp_path):
    """On a plain Llama (no adapters) the probe's groups are the KNOWN_SHARED ones: what lora.fuse observes and
    what the decode step fuses by name agree."""
    from tiny import make_tiny_llama

    model = AutoModelForCausalLM.from_pretrained(make_tiny_llama(tmp_path / "m")).train()
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    groups = shared_input_groups(model, linears, torch.tensor([[1, 2, 3, 4]]))
    name_of = {m: n for n, m in model.named_modules()}
    assert [[name_of[m] for m in g] for g in groups] == [
        [f"model.layers.{i}.{part}.{n}" for n in names]
        for i in range(2) for part, names in (("self_attn", ATTENTION_INPUT), ("mlp", MLP_INPUT))]
    assert model.training  # its mode is restored
    assert shared_input_groups(model, [], torch.tensor([[1]])) == []
    # a module called twice with one tensor takes that tensor's group out
    twice = nn.Module()
    twice.a, twice.b = nn.Linear(4, 4), nn.Linear(4, 4)
    twice.forward = lambda input_ids: twice.a(input_ids) + twice.b(input_ids) + twice.a(input_ids)
    assert shared_input_groups(twice, [twice.a, twice.b], torch.ones(1, 4)) == []


def test_estimate_counts_shared_masks_by_the_known_names(tmp_path):
    from peft import LoraConfig, get_peft_model

    from chattune.train.shared_lora import masks_kept
    from tiny import make_tiny_llama

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(make_tiny_llama(tmp_path / "m")),
                           LoraConfig(r=2, lora_dropout=0.1, target_modules="all-linear"))
    layer = decoder_layers(model)[1][0]
    # q/k/v share one mask of the hidden width (32), o its own (32), gate/up one (32), down its own (64)
    assert masks_kept(layer) == [32, 32, 32, 64]
