"""Convert ChatGLM2-6B / ChatGLM3-6B / GLM-4-9B-chat checkpoints to transformers' own `GlmForCausalLM`.

Why: these checkpoints (`model_type: "chatglm"`) ship their architecture as remote code (`modeling_chatglm.py`)
written for transformers 4.3x/4.4x; it does not run under transformers 5. transformers has the same architecture
natively as `transformers.models.glm` (the model of the official `THUDM/glm-4-9b-chat-hf` conversion), so instead of
running the publisher's code we rewrite the folder once: config.json becomes a `GlmConfig`, the weights are renamed and
the fused query/key/value matrix is split. The result loads with plain `AutoModelForCausalLM.from_pretrained(out)`.

The two architectures compute the same function; the facts this relies on (checked against the publisher's code, see
tests/test_family_glm.py for the exact-logits comparison):
- ChatGLM rotates the first half of each head (`rotary_dim = kv_channels // 2`) as interleaved pairs (x[2i], x[2i+1])
  with inv_freq = base^(-2i/rotary_dim); Glm's rotary (partial_rotary_factor 0.5, `rotate_half` on even/odd pairs)
  is the same computation. base = 10000 * rope_ratio for ChatGLM3/GLM-4 (GLM-4-9B-chat: rope_ratio 500, so 5e6).
  ChatGLM2-6B-32K's own code uses rope_ratio differently, as position interpolation (positions / rope_ratio), which is
  Glm's "linear" rope type; `rope_ratio_mode` says which one a checkpoint means (`convert_folder` reads it from the
  shipped modeling_chatglm.py as text, without running it).
- `query_key_value` rows are [all query heads | kv groups of keys | kv groups of values] when multi_query_attention
  is on (every published ChatGLM2/3 and GLM-4 checkpoint), and interleaved per head [q_h, k_h, v_h] when it is off.
- `dense_h_to_4h` is [gate | up] and ChatGLM computes silu(gate) * up, exactly what Glm's fused `gate_up_proj` does,
  so that matrix is copied unchanged.
- The attention scale 1/sqrt(head_dim) (ChatGLM's query-key layer scaling divides by the layer number and multiplies
  it back) and RMSNorm are the same.

Variants Glm cannot represent (LayerNorm instead of RMSNorm, residual taken after the layernorm, no final norm, biases
on the output/MLP projections, quantized weights, a P-tuning prefix encoder) are refused with a `ModelError` naming the
field. `convert_folder` writes only config.json, generation_config.json and the weights: the tokenizer is handled
elsewhere and nothing else from the source folder (remote code, README, tokenizer files) is copied.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from chattune.errors import ModelError
from chattune.outputs import atomic_folder

ROPE_BASE = 10000.0
# Markers of the first ChatGLM-6B generation (GLM v1: 2D positions, GELU MLP, its own layout), which this does not
# convert.
V1_FIELDS = ("position_encoding_2d", "inner_hidden_size")
LAYOUT_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "kv_channels", "padded_vocab_size")

# chatglm layer-local names -> Glm layer-local names (besides query_key_value, which is split)
_LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",  # [gate | up], as Glm's fused gate_up_proj
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
_TOP_RENAMES = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "encoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
_DROPPED = ("rotary_pos_emb.inv_freq",)  # a buffer the model recomputes; never a learned weight
_LAYER_KEY = re.compile(r"encoder\.layers\.(\d+)\.(.+)")


def is_chatglm_layout(config: dict) -> bool:
    """True for the ChatGLM2 / ChatGLM3 / GLM-4 layout (model_type chatglm with kv_channels, padded_vocab_size,
    ffn_hidden_size...), False for GLM v1 (ChatGLM-6B) and for any other model."""
    if config.get("model_type") != "chatglm":
        return False
    if any(field in config for field in V1_FIELDS):
        return False
    return all(field in config for field in LAYOUT_FIELDS)


# ---------------------------------------------------------------------------------------------------------- config


def _refuse_unsupported(config: dict) -> None:
    """ModelError for a flag whose value GlmForCausalLM cannot reproduce. Missing flags take the defaults of the
    publisher's ChatGLMConfig (which are the supported values)."""
    must = {
        "rmsnorm": True,  # False: LayerNorm with a bias; Glm has RMSNorm only
        "apply_residual_connection_post_layernorm": False,  # True: residual taken after the norm
        "post_layer_norm": True,  # False: no final norm; Glm always has one
        "add_bias_linear": False,  # True: biases on o_proj and the MLP; Glm has none there
        # The publisher's ChatGLM2/3 and GLM-4 code ignores this flag (always the interleaved rotary); other copies of
        # the code (e.g. the GLM-4V family) switch to a different rotary when it is false, so false is refused.
        "original_rope": True,
        "fp32_residual_connection": False,  # True: residual stream kept in fp32, which Glm does not do
    }
    for field, supported in must.items():
        value = config.get(field, supported)
        if value != supported:
            raise ModelError(f"config.json: {field}={json.dumps(value)} is a ChatGLM variant that transformers' "
                             f"GlmForCausalLM cannot represent (it needs {field}={json.dumps(supported)}); this "
                             "checkpoint cannot be converted")
    if config.get("pre_seq_len") is not None:
        raise ModelError(f"config.json: pre_seq_len={config['pre_seq_len']} marks a P-tuning v2 checkpoint (a prefix "
                         "encoder feeding every layer), which GlmForCausalLM cannot represent; convert the base model "
                         "instead and train the prefix with chattune's P-tuning method")
    if config.get("quantization_bit"):
        raise ModelError(f"config.json: quantization_bit={config['quantization_bit']} is a quantized ChatGLM "
                         "checkpoint (int4/int8 weights with scales); convert the unquantized model instead")


def _rope_parameters(config: dict, rope_ratio_mode: str | None) -> dict:
    """Glm rope parameters: rotate half of each head; rope_ratio scales the base (ChatGLM3/GLM-4) or divides the
    positions (ChatGLM2-6B-32K, Glm's "linear" type)."""
    ratio = config.get("rope_ratio", 1)
    if not isinstance(ratio, (int, float)) or ratio <= 0:
        raise ModelError(f"config.json: rope_ratio={json.dumps(ratio)} must be a positive number")
    mode = rope_ratio_mode or ("positions" if "chatglm2" in str(config.get("_name_or_path", "")).lower() else "base")
    if mode not in ("base", "positions"):
        raise ModelError(f"rope_ratio_mode={mode!r}: expected 'base' or 'positions'")
    params = {"rope_type": "default", "rope_theta": ROPE_BASE, "partial_rotary_factor": 0.5}
    if ratio == 1:
        return params
    if mode == "base":
        return {**params, "rope_theta": ROPE_BASE * ratio}
    return {**params, "rope_type": "linear", "factor": float(ratio)}


def _first_set(field: str, *sources: dict):
    """The first non-null value of `field` in `sources` (config.json may hold an explicit null)."""
    return next((s[field] for s in sources if s.get(field) is not None), None)


def glm_config(config: dict, *, generation_config: dict | None = None, rope_ratio_mode: str | None = None):
    """The `transformers.GlmConfig` equivalent to a chatglm-layout config.json (a dict).

    generation_config: the source's generation_config.json, consulted for eos/pad ids config.json lacks.
    rope_ratio_mode: "base" (ChatGLM3, GLM-4: rope base = 10000 * rope_ratio) or "positions" (ChatGLM2-6B-32K:
    positions / rope_ratio); None guesses "positions" only for a config whose _name_or_path names chatglm2.
    """
    from transformers import GlmConfig

    if not is_chatglm_layout(config):
        is_v1 = any(f in config for f in V1_FIELDS)
        kind = "ChatGLM-6B (GLM v1)" if is_v1 else f"model_type={config.get('model_type')}"
        raise ModelError(f"config.json is {kind}, not the ChatGLM2/ChatGLM3/GLM-4 layout (model_type chatglm with "
                         f"{', '.join(LAYOUT_FIELDS)}); only that layout converts to GlmForCausalLM")
    _refuse_unsupported(config)
    heads = config.get("num_attention_heads")
    if not heads:
        raise ModelError("config.json: num_attention_heads is missing")
    head_dim = config["kv_channels"] or config["hidden_size"] // heads
    kv_heads = config.get("multi_query_group_num", 1) if config.get("multi_query_attention", False) else heads
    if heads % kv_heads:
        raise ModelError(f"config.json: num_attention_heads={heads} is not a multiple of "
                         f"multi_query_group_num={kv_heads}")
    generation_config = generation_config or {}
    eos = _first_set("eos_token_id", config, generation_config)
    if eos is None:
        raise ModelError("config.json (and generation_config.json) have no eos_token_id; add the model's "
                         "end-of-sequence id to config.json")
    pad = _first_set("pad_token_id", config, generation_config)
    if pad is not None and not 0 <= pad < config["padded_vocab_size"]:
        # Glm makes pad_token_id its embedding's padding_idx, which must be a row of the embedding
        raise ModelError(f"config.json: pad_token_id={pad} is outside the vocabulary (padded_vocab_size="
                         f"{config['padded_vocab_size']}); fix pad_token_id in config.json")
    kwargs = {}
    dtype = config.get("dtype", config.get("torch_dtype"))
    if dtype is not None:
        kwargs["dtype"] = dtype
    return GlmConfig(
        architectures=["GlmForCausalLM"],
        vocab_size=config["padded_vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["ffn_hidden_size"],
        num_hidden_layers=config["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        hidden_act="silu",
        attention_dropout=config.get("attention_dropout", 0.0),
        max_position_embeddings=config.get("seq_length", 2048),
        rms_norm_eps=config.get("layernorm_epsilon", 1e-5),
        use_cache=config.get("use_cache", True),
        tie_word_embeddings=False,  # ChatGLM's output_layer is its own matrix, never tied to the embedding
        rope_parameters=_rope_parameters(config, rope_ratio_mode),
        pad_token_id=pad,
        eos_token_id=eos,
        bos_token_id=config.get("bos_token_id"),
        attention_bias=bool(config.get("add_qkv_bias", False)),
        **kwargs,
    )


# ----------------------------------------------------------------------------------------------------------- state


def _split_qkv(name: str, tensor, heads: int, kv_heads: int, head_dim: int, grouped: bool) -> list:
    """Split a fused query_key_value weight (rows) or bias into (q, k, v), cloned so they share no storage."""
    rows = (heads + 2 * kv_heads) * head_dim
    if tensor.shape[0] != rows:
        raise ModelError(f"{name}: {tuple(tensor.shape)[0]} rows, expected {rows} = (num_attention_heads {heads} + "
                         f"2 x key/value heads {kv_heads}) x head_dim {head_dim}; config.json does not match the "
                         "weights")
    if grouped:  # [q heads | k groups | v groups]
        parts = tensor.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=0)
    else:  # no multi-query attention: per head [q_h | k_h | v_h]
        per_head = tensor.reshape(heads, 3, head_dim, *tensor.shape[1:])
        parts = [per_head[:, i].reshape(heads * head_dim, *tensor.shape[1:]) for i in range(3)]
    return [p.clone() for p in parts]


def _convert_key(name: str, tensor, config: dict) -> dict:
    """One chatglm checkpoint entry -> the Glm entries it becomes ({} for a dropped buffer)."""
    local = name.removeprefix("transformer.")
    if local.startswith("prefix_encoder."):
        raise ModelError(f"{name}: a P-tuning v2 prefix encoder; GlmForCausalLM has no prefix encoder, so this "
                         "checkpoint cannot be converted (convert the base model, train the prefix with chattune)")
    if local in _DROPPED:
        return {}
    if local in _TOP_RENAMES:
        return {_TOP_RENAMES[local]: tensor}
    match = _LAYER_KEY.fullmatch(local)
    if match:
        layer, rest = match.groups()
        prefix = f"model.layers.{layer}."
        if rest in _LAYER_RENAMES:
            return {prefix + _LAYER_RENAMES[rest]: tensor}
        if rest in ("self_attention.query_key_value.weight", "self_attention.query_key_value.bias"):
            kind = rest.rsplit(".", 1)[1]
            heads = config["num_attention_heads"]
            head_dim = config["kv_channels"] or config["hidden_size"] // heads
            grouped = bool(config.get("multi_query_attention", False))
            kv_heads = config.get("multi_query_group_num", 1) if grouped else heads
            q, k, v = _split_qkv(name, tensor, heads, kv_heads, head_dim, grouped)
            return {f"{prefix}self_attn.{p}_proj.{kind}": t for p, t in zip("qkv", (q, k, v))}
    raise ModelError(f"{name}: unknown weight for the ChatGLM2/ChatGLM3/GLM-4 layout; this checkpoint has parts "
                     "GlmForCausalLM cannot hold, so it is not converted")


def convert_state_dict(state: dict, config: dict) -> dict:
    """Rename (and split query_key_value of) chatglm-layout weights into GlmForCausalLM's names. Works on any subset
    of the keys, so each shard of a checkpoint converts on its own. Unknown and P-tuning keys are a ModelError."""
    _refuse_unsupported(config)
    out: dict = {}
    for name in sorted(state):
        out.update(_convert_key(name, state[name], config))
    return out


def expected_glm_keys(config: dict) -> set[str]:
    """The weight names GlmForCausalLM built from `glm_config(config)` holds (to check a conversion is complete)."""
    keys = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    projections = ["q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"]
    if config.get("add_qkv_bias", False):
        projections += ["q_proj.bias", "k_proj.bias", "v_proj.bias"]
    for i in range(config["num_layers"]):
        keys |= {f"model.layers.{i}.{n}" for n in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                                    "mlp.gate_up_proj.weight", "mlp.down_proj.weight")}
        keys |= {f"model.layers.{i}.self_attn.{p}" for p in projections}
    return keys


# ---------------------------------------------------------------------------------------------------------- folder


def _weight_shards(src: Path) -> list[Path]:
    """The checkpoint's weight files in order: safetensors (index or single file) first, else pytorch .bin."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (src / index).is_file():
            try:
                weight_map = json.loads((src / index).read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise ModelError(f"{src / index}: not a weight index ({e}); re-download the model") from e
            shards = [src / f for f in sorted(set(weight_map.values()))]
            missing = [str(p) for p in shards if not p.is_file()]
            if missing:
                raise ModelError(f"{src / index} lists shards that are not there: {', '.join(missing)}; "
                                 "re-download the model")
            return shards
        if (src / single).is_file():
            return [src / single]
    raise ModelError(f"{src}: no weights (model.safetensors[.index.json] or pytorch_model.bin[.index.json])")


def _load_shard(path: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        try:  # mmap: a .bin shard is paged in as needed instead of read whole next to its converted copy
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a legacy (pre-zip) torch.save file cannot be mapped
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable shard is the same user-facing problem
        raise ModelError(f"{path}: cannot read the weights ({type(e).__name__}: {e}); re-download the model") from e


def _rope_ratio_mode_of(src: Path) -> str | None:
    """How the shipped modeling_chatglm.py uses rope_ratio, read as text (never run): "positions" when it divides the
    positions (ChatGLM2-6B-32K), "base" when it scales the base; None when there is no such file or no rope_ratio."""
    code = src / "modeling_chatglm.py"
    if not code.is_file():
        return None
    text = code.read_text(errors="replace")
    if re.search(r"/\s*self\.rope_ratio", text):
        return "positions"
    if re.search(r"base\s*\*\s*self\.rope_ratio", text):
        return "base"
    return None


def _generation_config(src: Path, config: dict):
    from transformers import GenerationConfig

    path = src / "generation_config.json"
    data = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except ValueError as e:
            raise ModelError(f"{path}: not JSON ({e})") from e
        data.pop("transformers_version", None)
    for field in ("eos_token_id", "pad_token_id", "bos_token_id"):
        if data.get(field) is None and config.get(field) is not None:
            data[field] = config[field]
    return GenerationConfig(**data)


def _shard_name(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def convert_folder(src: Path, out: Path, log=print) -> Path:
    """Convert the chatglm-layout checkpoint folder `src` into a GlmForCausalLM folder `out` and return `out`.

    One output safetensors shard is written per input shard (so peak memory is about one shard, not the model), with
    a fresh model.safetensors.index.json when there are several; config.json is a GlmConfig, generation_config.json
    comes from the source's (else eos/pad from config.json). Everything is written into `out.tmp-XXXX` next to `out`
    and renamed at the end, so `out` is either complete or absent. The tokenizer and every other file of `src` (remote
    code, README...) are not copied. `out` must not exist or be an empty folder.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    src, out = Path(src), Path(out)
    config_path = src / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError as e:
        raise ModelError(f"{src}: no config.json; point at the model folder") from e
    except ValueError as e:
        raise ModelError(f"{config_path}: not JSON ({e})") from e
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelError(f"{out} already exists and is not an empty folder; choose another output folder")
    gen = _generation_config(src, config)
    glm = glm_config(config, generation_config=gen.to_dict(), rope_ratio_mode=_rope_ratio_mode_of(src))
    shards = _weight_shards(src)

    with atomic_folder(out, "tmp") as tmp:  # out is absent or an empty folder (checked above)
        weight_map: dict[str, str] = {}
        total = 0
        for i, shard in enumerate(tqdm(shards, desc="converting to Glm", unit="shard", leave=False)):
            converted = convert_state_dict(_load_shard(shard), config)
            name = _shard_name(i, len(shards))
            clash = sorted(set(converted) & set(weight_map))
            if clash:
                raise ModelError(f"{shard}: {clash[0]} is also in another shard; the checkpoint is inconsistent")
            converted = {k: v.contiguous() for k, v in converted.items()}
            save_file(converted, str(tmp / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(converted, name))
            total += sum(t.numel() * t.element_size() for t in converted.values())
            del converted
        missing = sorted(expected_glm_keys(config) - set(weight_map))
        if missing:
            raise ModelError(f"{src}: the weights lack {', '.join(missing[:5])}"
                             f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}; the checkpoint is "
                             "incomplete, re-download it")
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        glm.save_pretrained(tmp)
        gen.save_pretrained(tmp)
    log(f"converted {src} ({len(shards)} shard{'s' * (len(shards) > 1)}) to GlmForCausalLM in {out}")
    return out
