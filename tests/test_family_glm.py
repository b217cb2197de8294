"""ChatGLM3-6B / GLM-4-9B-chat checkpoints converted to transformers' own GlmForCausalLM compute what the publisher's
code computes, to 1e-5 in fp32.

How the reference numbers below were produced (once, outside this repository; the publisher's code is not in it):
- Code: the publisher's remote code, run read-only from /tmp in a separate virtualenv with transformers 4.44.2 and
  torch 2.13.0 (CPU).
  * ChatGLM3-6B: `modeling_chatglm.py` + `configuration_chatglm.py` (+ config.json) of THUDM/chatglm3-6b as mirrored
    with its Hugging Face history in github.com/czk1997/chatglm3-copy (HEAD 456aa875cf1f46623006edaa23103774ea9c0eae;
    last change to modeling_chatglm.py: 340a2eb35e0ab604bbd037499596575060326bf7, "fix issue
    https://github.com/THUDM/ChatGLM3/issues/227 (#9)", 2023-12-07; its tokenizer has build_chat_input). Byte-identical
    to the copy in github.com/ypwhs/CreativeChatGLM chatglm3/ (commit 02fe5f2).
  * GLM-4-9B-chat: `modeling_chatglm.py` + `configuration_chatglm.py` (+ config.json, generation_config.json) of
    THUDM/glm-4-9b-chat (the transformers>=4.44 revision: config transformers_version 4.44.0, rope_ratio 500,
    ChatGLM4Tokenizer beside it) as mirrored in github.com/aifunny/Hate-Detection, commit
    4f5fc7d147740d2a3ac0502316513fe3419fbb36, folder `chuli/glm4更新包/` (blob 3b1e503d39ae1dca74ad8aa22f8f14dd2b5c3c42).
    Its computation is identical to the earlier June 2024 revision in github.com/ypwhs/CreativeChatGLM glm4/ (the
    diff touches only generation helpers).
- Patches: one, to ChatGLM3's `_update_model_kwargs_for_generation`, so its own generate runs under 4.44
  (`self._extract_past_from_model_output(outputs)[1]` instead of the removed `standardize_cache_format=` call). The
  forward code is unpatched.
- Twins: each published config.json with num_layers (and num_hidden_layers) 2, hidden_size 64, kv_channels 16,
  num_attention_heads 4, multi_query_group_num 2, ffn_hidden_size 96, padded_vocab_size 128, seq_length 256, every
  other field as published (rope_ratio: absent = 1 for ChatGLM3, 500 for GLM-4), run in float32. (The converted
  GLM-4 twin pads with id 0 instead of 151329, which its 128-token vocab cannot hold: see `twin`.)
  `ChatGLMForConditionalGeneration(config, empty_init=False)`; ChatGLM3 with its default attention (torch SDPA inside
  CoreAttention), GLM-4 with "eager" (its "sdpa" path agrees to 6e-7). Weights: `make_weights` below over the
  official model's state_dict keys minus `transformer.rotary_pos_emb.inv_freq` (the layout `SHAPES` below, which is
  what the official model reported), loaded with load_state_dict.
- Inputs: row 0 = IDS (no mask, default positions); a batch [IDS, IDS2] with attention_mask [ones, MASK2] and
  position_ids [0..7, POS2] (left padding), logits compared at the real (unpadded) positions only: the publisher's
  mask lets padded queries attend everywhere, transformers masks them, and nobody reads those rows.
- Greedy: the official `generate(max_new_tokens=6, do_sample=False, use_cache=True)` (its own kv cache) on IDS and on
  IDS2's real tokens; for IDS it equals the continuation by repeated full forwards; smallest top-1/top-2 logit margin
  0.016, far above the 1e-5 agreement.
Values were printed with 9 significant digits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from chattune.errors import ModelError
from chattune.models.families import glm

TINY = dict(num_layers=2, hidden_size=64, kv_channels=16, num_attention_heads=4, multi_query_group_num=2,
            ffn_hidden_size=96, padded_vocab_size=128, seq_length=256)

# config.json of THUDM/chatglm3-6b and THUDM/glm-4-9b-chat as published (auto_map / _name_or_path left out)
CHATGLM3_6B = {
    "model_type": "chatglm", "architectures": ["ChatGLMModel"], "add_bias_linear": False, "add_qkv_bias": True,
    "apply_query_key_layer_scaling": True, "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0,
    "attention_softmax_in_fp32": True, "bias_dropout_fusion": True, "ffn_hidden_size": 13696,
    "fp32_residual_connection": False, "hidden_dropout": 0.0, "hidden_size": 4096, "kv_channels": 128,
    "layernorm_epsilon": 1e-05, "multi_query_attention": True, "multi_query_group_num": 2, "num_attention_heads": 32,
    "num_layers": 28, "original_rope": True, "padded_vocab_size": 65024, "post_layer_norm": True, "rmsnorm": True,
    "seq_length": 8192, "use_cache": True, "torch_dtype": "float16", "transformers_version": "4.30.2",
    "tie_word_embeddings": False, "eos_token_id": 2, "pad_token_id": 0,
}
GLM4_9B_CHAT = {
    "model_type": "chatglm", "architectures": ["ChatGLMModel"], "add_bias_linear": False, "add_qkv_bias": True,
    "apply_query_key_layer_scaling": True, "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0,
    "attention_softmax_in_fp32": True, "attn_implementation": "sdpa", "bias_dropout_fusion": True,
    "ffn_hidden_size": 13696, "fp32_residual_connection": False, "hidden_dropout": 0.0, "hidden_size": 4096,
    "kv_channels": 128, "layernorm_epsilon": 1.5625e-07, "multi_query_attention": True, "multi_query_group_num": 2,
    "num_attention_heads": 32, "num_hidden_layers": 40, "num_layers": 40, "rope_ratio": 500, "original_rope": True,
    "padded_vocab_size": 151552, "post_layer_norm": True, "rmsnorm": True, "seq_length": 131072, "use_cache": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.44.0", "tie_word_embeddings": False,
    "eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329,
}
GLM4_GENERATION_CONFIG = {"eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329, "do_sample": True,
                          "temperature": 0.8, "max_length": 128000, "top_p": 0.8, "transformers_version": "4.44.0"}
CHATGLM_6B_V1 = {  # THUDM/chatglm-6b (GLM v1)
    "model_type": "chatglm", "architectures": ["ChatGLMModel"], "bos_token_id": 130004, "eos_token_id": 130005,
    "mask_token_id": 130000, "gmask_token_id": 130001, "pad_token_id": 3, "hidden_size": 4096,
    "inner_hidden_size": 16384, "layernorm_epsilon": 1e-05, "max_sequence_length": 2048, "num_attention_heads": 32,
    "num_layers": 28, "position_encoding_2d": True, "torch_dtype": "float16", "use_cache": True, "vocab_size": 130528,
}
LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "num_hidden_layers": 32,
         "num_attention_heads": 32, "intermediate_size": 11008, "vocab_size": 32000}

# state_dict of the official tiny twins (same for both): name -> shape, minus the rotary inv_freq buffer
SHAPES = {
    "transformer.embedding.word_embeddings.weight": (128, 64),
    "transformer.encoder.final_layernorm.weight": (64,),
    **{f"transformer.encoder.layers.{i}.{name}": shape for i in range(2) for name, shape in {
        "input_layernorm.weight": (64,),
        "mlp.dense_4h_to_h.weight": (64, 96),
        "mlp.dense_h_to_4h.weight": (192, 64),
        "post_attention_layernorm.weight": (64,),
        "self_attention.dense.weight": (64, 64),
        "self_attention.query_key_value.bias": (128,),
        "self_attention.query_key_value.weight": (128, 64),
    }.items()},
    "transformer.output_layer.weight": (128, 64),
}
INV_FREQ = "transformer.rotary_pos_emb.inv_freq"  # shape (4,): 1 / 10000 ** (arange(0, 8, 2) / 8)

IDS = [5, 17, 99, 3, 64, 127, 2, 8]
IDS2 = [0, 0, 42, 7, 13, 88, 120, 1]
MASK2 = [0, 0, 1, 1, 1, 1, 1, 1]
POS2 = [0, 0, 0, 1, 2, 3, 4, 5]

REFERENCE = {
    "chatglm3": {
        "last_8": [-0.068156749, 0.0520146675, 0.298468977, -0.379475564, -0.180805296, -0.160585523, -0.108060651,
                   -0.532437146],
        "pos3_100_104": [-0.490123719, 0.0524032302, 0.818512321, 0.676915288],
        "sum": -19.0465624, "sumsq": 166.046415,
        "row1_last_8": [0.115227975, 0.285961747, -0.128677115, -0.420131475, -0.0946285874, 0.58545804, 0.364010781,
                        -0.667041957],
        "row1_pos4_20_24": [-0.239986092, -0.0520891659, -0.581622541, -0.339057356],
        "row1_sum": 16.5125131, "row1_sumsq": 127.165055,
        "greedy": [98, 47, 43, 43, 43, 43], "greedy_row1": [50, 87, 52, 87, 52, 87],
    },
    "glm4": {
        "last_8": [-0.0709069669, 0.0573754199, 0.298386782, -0.381185353, -0.18263869, -0.165592223, -0.101873875,
                   -0.532787085],
        "pos3_100_104": [-0.490419, 0.0549510531, 0.821187496, 0.674532056],
        "sum": -19.1146634, "sumsq": 166.131271,
        "row1_last_8": [0.114104293, 0.283237457, -0.129404172, -0.424058557, -0.0924415439, 0.586248577, 0.353231251,
                        -0.664461553],
        "row1_pos4_20_24": [-0.240420908, -0.0528525189, -0.581262767, -0.338407755],
        "row1_sum": 16.5160254, "row1_sumsq": 127.226723,
        "greedy": [98, 47, 43, 43, 43, 43], "greedy_row1": [50, 87, 52, 87, 52, 87],
    },
}
PUBLISHED = {"chatglm3": CHATGLM3_6B, "glm4": GLM4_9B_CHAT}


def twin(published: dict) -> dict:
    """The tiny twin's config.json. One departure from the official run: GLM-4's pad id 151329 does not fit the
    128-token vocab, and transformers' Glm makes pad_token_id its embedding's padding_idx (which must be in range; it
    only affects gradients, never the forward), so the twin pads with id 0. The official forward never reads it."""
    config = {**published, **TINY}
    if "num_hidden_layers" in config:
        config["num_hidden_layers"] = TINY["num_layers"]
    if config["pad_token_id"] >= config["padded_vocab_size"]:
        config["pad_token_id"] = 0
    return config


def layout_shapes(config: dict) -> dict:
    """The chatglm checkpoint layout for `config`, derived from the architecture (checked against SHAPES)."""
    h, heads, hd = config["hidden_size"], config["num_attention_heads"], config["kv_channels"]
    qkv = (heads + 2 * config["multi_query_group_num"]) * hd
    shapes = {"transformer.embedding.word_embeddings.weight": (config["padded_vocab_size"], h),
              "transformer.encoder.final_layernorm.weight": (h,),
              "transformer.output_layer.weight": (config["padded_vocab_size"], h)}
    for i in range(config["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attention.query_key_value.weight": (qkv, h),
                       p + "self_attention.query_key_value.bias": (qkv,),
                       p + "self_attention.dense.weight": (h, heads * hd),
                       p + "mlp.dense_h_to_4h.weight": (2 * config["ffn_hidden_size"], h),
                       p + "mlp.dense_4h_to_h.weight": (h, config["ffn_hidden_size"])})
    return shapes


def make_weights(shapes: dict) -> dict:
    """One generator seeded 0 walks the sorted names: norms 1 + 0.1 * randn, everything else 0.05 * randn (fp32)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for name in sorted(shapes):
        t = torch.randn(shapes[name], generator=g, dtype=torch.float32)
        out[name] = 1 + 0.1 * t if name.endswith("layernorm.weight") else 0.05 * t
    return out


def inv_freq(config: dict) -> torch.Tensor:
    dim = config["kv_channels"] // 2
    return 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def write_chatglm_folder(path: Path, config: dict, state: dict, shards: int = 1, fmt: str = "safetensors",
                         generation_config: dict | None = None) -> Path:
    """A chatglm-layout checkpoint folder as published: config.json and `shards` weight files (+ index when >1)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    if generation_config is not None:
        (path / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        part = {n: state[n].contiguous() for n in names[i::shards]}  # interleaved: a layer spans shards
        if fmt == "safetensors":
            file = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file(part, str(path / file), metadata={"format": "pt"})
        else:
            file = "pytorch_model.bin" if shards == 1 else f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
            torch.save(part, path / file)
        weight_map.update(dict.fromkeys(part, file))
    if shards > 1:
        index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
        (path / index).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return path


def full_state(config: dict) -> dict:
    return {**make_weights(SHAPES), INV_FREQ: inv_freq(config)}


@pytest.fixture(scope="module", params=["chatglm3", "glm4"])
def converted(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    name = request.param
    config = twin(PUBLISHED[name])
    root = tmp_path_factory.mktemp(name)
    gen = GLM4_GENERATION_CONFIG if name == "glm4" else None
    src = write_chatglm_folder(root / "src", config, full_state(config), generation_config=gen)
    out = glm.convert_folder(src, root / "glm", log=lambda *_: None)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return name, out, model


def test_layout_matches_the_official_state_dict():
    for published in PUBLISHED.values():
        assert layout_shapes(twin(published)) == SHAPES


def test_logits_equal_the_official_code(converted):
    name, out, model = converted
    ref = REFERENCE[name]
    assert type(model).__name__ == "GlmForCausalLM"
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([IDS])).logits
    torch.testing.assert_close(logits[0, -1, :8], torch.tensor(ref["last_8"]), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[0, 3, 100:104], torch.tensor(ref["pos3_100_104"]), atol=1e-5, rtol=0)
    assert float(logits.double().sum()) == pytest.approx(ref["sum"], abs=1e-4)
    assert float(logits.double().pow(2).sum()) == pytest.approx(ref["sumsq"], abs=1e-4)


def test_padded_batch_with_position_ids_equals_the_official_code(converted):
    name, out, model = converted
    ref = REFERENCE[name]
    with torch.no_grad():
        single = model(input_ids=torch.tensor([IDS])).logits
        logits = model(input_ids=torch.tensor([IDS, IDS2]), attention_mask=torch.tensor([[1] * 8, MASK2]),
                       position_ids=torch.tensor([list(range(8)), POS2])).logits
    torch.testing.assert_close(logits[0], single[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[1, -1, :8], torch.tensor(ref["row1_last_8"]), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[1, 4, 20:24], torch.tensor(ref["row1_pos4_20_24"]), atol=1e-5, rtol=0)
    real = logits[1, 2:].double()
    assert float(real.sum()) == pytest.approx(ref["row1_sum"], abs=1e-4)
    assert float(real.pow(2).sum()) == pytest.approx(ref["row1_sumsq"], abs=1e-4)


def test_greedy_generate_with_the_transformers_cache_equals_the_official_generate(converted):
    name, out, model = converted
    ref = REFERENCE[name]
    for prompt, expected in ((IDS, ref["greedy"]), (IDS2[2:], ref["greedy_row1"])):
        ids = torch.tensor([prompt])
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             use_cache=True)
        assert gen[0, len(prompt):].tolist() == expected


def test_converted_folder_holds_only_config_generation_config_and_weights(converted):
    name, out, model = converted
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert not list(out.parent.glob("*.tmp-*"))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "glm" and config["architectures"] == ["GlmForCausalLM"]
    assert config["dtype"] == {"chatglm3": "float16", "glm4": "bfloat16"}[name]
    generation = json.loads((out / "generation_config.json").read_text())
    if name == "glm4":  # the source's generation_config.json, carried over
        assert generation["eos_token_id"] == [151329, 151336, 151338] and generation["pad_token_id"] == 151329
        assert generation["top_p"] == 0.8 and generation["temperature"] == 0.8
    else:  # none in the source: eos/pad from config.json
        assert generation["eos_token_id"] == 2 and generation["pad_token_id"] == 0


def test_is_chatglm_layout():
    assert glm.is_chatglm_layout(CHATGLM3_6B)
    assert glm.is_chatglm_layout(GLM4_9B_CHAT)
    assert not glm.is_chatglm_layout(CHATGLM_6B_V1)
    assert not glm.is_chatglm_layout(LLAMA)
    with pytest.raises(ModelError, match="GLM v1"):
        glm.glm_config(CHATGLM_6B_V1)
    with pytest.raises(ModelError, match="model_type=llama"):
        glm.glm_config(LLAMA)


def test_config_mapping_of_the_published_configs():
    g4 = glm.glm_config(GLM4_9B_CHAT)
    assert g4.rope_parameters == {"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.5}
    assert (g4.num_attention_heads, g4.num_key_value_heads, g4.head_dim) == (32, 2, 128)
    assert (g4.hidden_size, g4.intermediate_size, g4.num_hidden_layers) == (4096, 13696, 40)
    assert (g4.vocab_size, g4.max_position_embeddings, g4.rms_norm_eps) == (151552, 131072, 1.5625e-07)
    assert g4.eos_token_id == [151329, 151336, 151338] and g4.pad_token_id == 151329
    assert g4.attention_bias is True and g4.tie_word_embeddings is False
    assert g4.dtype == torch.bfloat16 and g4.architectures == ["GlmForCausalLM"]

    g3 = glm.glm_config(CHATGLM3_6B)
    assert g3.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    assert (g3.num_key_value_heads, g3.head_dim, g3.num_hidden_layers, g3.vocab_size) == (2, 128, 28, 65024)
    assert (g3.max_position_embeddings, g3.rms_norm_eps, g3.eos_token_id, g3.pad_token_id) == (8192, 1e-5, 2, 0)
    assert g3.dtype == torch.float16

    # no multi-query attention: one key/value head per query head
    assert glm.glm_config({**CHATGLM3_6B, "multi_query_attention": False}).num_key_value_heads == 32
    # ChatGLM2-6B-32K divides positions by rope_ratio: Glm's linear rope; ChatGLM3-6B-32K scales the base
    linear = glm.glm_config({**CHATGLM3_6B, "rope_ratio": 16}, rope_ratio_mode="positions").rope_parameters
    assert linear == {"rope_type": "linear", "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "factor": 16.0}
    assert glm.glm_config({**CHATGLM3_6B, "rope_ratio": 50}).rope_parameters["rope_theta"] == 500_000.0
    # eos missing from config.json: taken from generation_config.json, else refused
    no_eos = {k: v for k, v in CHATGLM3_6B.items() if k != "eos_token_id"}
    assert glm.glm_config(no_eos, generation_config={"eos_token_id": [2, 64795]}).eos_token_id == [2, 64795]
    with pytest.raises(ModelError, match="eos_token_id"):
        glm.glm_config(no_eos)
    with pytest.raises(ModelError, match="pad_token_id=151329 is outside the vocabulary"):
        glm.glm_config({**GLM4_9B_CHAT, "padded_vocab_size": 128})


def test_rope_ratio_mode_is_read_from_the_shipped_code(tmp_path):
    (tmp_path / "modeling_chatglm.py").write_text("seq_idx = torch.arange(seq_len) / self.rope_ratio\n")
    assert glm._rope_ratio_mode_of(tmp_path) == "positions"
    (tmp_path / "modeling_chatglm.py").write_text("        base = base * self.rope_ratio\n")
    assert glm._rope_ratio_mode_of(tmp_path) == "base"


@pytest.mark.parametrize("field, value", [
    ("rmsnorm", False),
    ("apply_residual_connection_post_layernorm", True),
    ("post_layer_norm", False),
    ("add_bias_linear", True),
    ("original_rope", False),
])
def test_unsupported_variant_is_refused_naming_the_field(field, value):
    with pytest.raises(ModelError, match=f"{field}={json.dumps(value)}"):
        glm.glm_config({**GLM4_9B_CHAT, field: value})
    with pytest.raises(ModelError, match=field):
        glm.convert_state_dict({}, {**GLM4_9B_CHAT, field: value})


def test_ptuning_and_unknown_keys_are_refused_naming_the_key():
    config = twin(GLM4_9B_CHAT)
    prefix = "transformer.prefix_encoder.embedding.weight"
    with pytest.raises(ModelError, match=f"{prefix}: a P-tuning v2 prefix encoder"):
        glm.convert_state_dict({prefix: torch.zeros(4, 8)}, config)
    with pytest.raises(ModelError, match="pre_seq_len=128"):
        glm.glm_config({**config, "pre_seq_len": 128})
    unknown = "transformer.encoder.layers.0.self_attention.dense.bias"
    with pytest.raises(ModelError, match=unknown):
        glm.convert_state_dict({unknown: torch.zeros(64)}, config)
    with pytest.raises(ModelError, match="classifier_head.weight"):
        glm.convert_state_dict({"classifier_head.weight": torch.zeros(2, 64)}, config)


def test_convert_state_dict_names_and_exact_split():
    config = twin(GLM4_9B_CHAT)
    state = full_state(config)
    out = glm.convert_state_dict(state, config)
    assert set(out) == glm.expected_glm_keys(config)
    qkv = state["transformer.encoder.layers.1.self_attention.query_key_value.weight"]
    assert torch.equal(out["model.layers.1.self_attn.q_proj.weight"], qkv[:64])
    assert torch.equal(out["model.layers.1.self_attn.k_proj.weight"], qkv[64:96])
    assert torch.equal(out["model.layers.1.self_attn.v_proj.weight"], qkv[96:])
    bias = state["transformer.encoder.layers.1.self_attention.query_key_value.bias"]
    assert torch.equal(out["model.layers.1.self_attn.v_proj.bias"], bias[96:])
    assert torch.equal(out["model.layers.0.mlp.gate_up_proj.weight"],
                       state["transformer.encoder.layers.0.mlp.dense_h_to_4h.weight"])
    assert torch.equal(out["lm_head.weight"], state["transformer.output_layer.weight"])
    assert torch.equal(out["model.norm.weight"], state["transformer.encoder.final_layernorm.weight"])


def test_split_without_multi_query_attention_is_per_head_interleaved():
    config = {**twin(CHATGLM3_6B), "multi_query_attention": False}
    # rows of head h: [q_h (16) | k_h (16) | v_h (16)]; mark each row with (head, part, row)
    rows = torch.tensor([[h * 100 + part * 10 + r % 10] for h in range(4) for part in range(3) for r in range(16)])
    out = glm.convert_state_dict({"transformer.encoder.layers.0.self_attention.query_key_value.weight": rows}, config)
    for part, proj in enumerate("qkv"):
        expected = torch.tensor([[h * 100 + part * 10 + r % 10] for h in range(4) for r in range(16)])
        assert torch.equal(out[f"model.layers.0.self_attn.{proj}_proj.weight"], expected)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_two_input_shards_convert_shard_by_shard(tmp_path, fmt):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    config = twin(GLM4_9B_CHAT)
    src = write_chatglm_folder(tmp_path / "src", config, full_state(config), shards=2, fmt=fmt)
    out = glm.convert_folder(src, tmp_path / "glm", log=lambda *_: None)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert sorted(set(index["weight_map"].values())) == files
    assert set(index["weight_map"]) == glm.expected_glm_keys(config)
    # each output shard holds exactly what its input shard became
    source_shards = [sorted(full_state(config))[i::2] for i in range(2)]
    for file, source in zip(files, source_shards):
        with safe_open(str(out / file), "pt") as f:
            assert set(f.keys()) == set(glm.convert_state_dict({k: full_state(config)[k] for k in source}, config))
    sizes = sum(t.numel() * t.element_size() for t in glm.convert_state_dict(full_state(config), config).values())
    assert index["metadata"]["total_size"] == sizes
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([IDS])).logits
    torch.testing.assert_close(logits[0, -1, :8], torch.tensor(REFERENCE["glm4"]["last_8"]), atol=1e-5, rtol=0)


def test_folder_errors_leave_nothing_behind(tmp_path):
    config = twin(GLM4_9B_CHAT)
    state = full_state(config)
    state["transformer.encoder.layers.0.mlp.dense_h_to_4h.bias"] = torch.zeros(192)
    src = write_chatglm_folder(tmp_path / "src", config, state, shards=2)
    with pytest.raises(ModelError, match="layers.0.mlp.dense_h_to_4h.bias: unknown weight"):
        glm.convert_folder(src, tmp_path / "glm", log=lambda *_: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]

    incomplete = {k: v for k, v in full_state(config).items() if k != "transformer.output_layer.weight"}
    src2 = write_chatglm_folder(tmp_path / "src2", config, incomplete)
    with pytest.raises(ModelError, match="lack lm_head.weight"):
        glm.convert_folder(src2, tmp_path / "glm", log=lambda *_: None)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(ModelError, match="not an empty folder"):
        glm.convert_folder(src2, tmp_path / "taken", log=lambda *_: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "src2", "taken"]
