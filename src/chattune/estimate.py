"""`chattune estimate`: will this run fit? A per-device memory breakdown from the run's own config.

What is counted from the real thing, and what is chattune's own arithmetic (each term is explained in
docs/estimate.md):
- parameters: the model is built on the meta device (accelerate's `init_empty_weights`, no memory, no download)
  from its config, and the method is applied to it, so base and trainable parameters come from the real module
  tree (as `accelerate estimate-memory` counts weights). Architectures transformers cannot build offline (remote
  code: ChatGLM, GLM-4, TransNormerLLM) are built as the native architecture of the same shapes (see
  `stand_in_config`).
- ZeRO-2/3 model states: DeepSpeed's own estimators (`estimate_zero2/3_model_states_mem_needs`) where DeepSpeed is
  installed, else the same formulas, for the method's trainable parameters; its frozen ones add their weights
  only (whole under ZeRO-2, partitioned under ZeRO-3).
- activations (per method, with and without gradient checkpointing; the method's own modules add
  `Method.extra_activations`), logits, LoRA/prefix/freeze subsets and the runtime overhead: chattune's terms; none of the libraries above estimates them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from chattune.errors import ConfigError

GIB = 2**30
CUDA_OVERHEAD = int(0.6 * GIB)  # CUDA context + cuBLAS workspace + allocator slack, measured typical on H100/A100
# Python + torch + transformers + datasets + a training loop: a 3.2M-parameter Llama (13 MB of weights) with the
# bundled tokenizer trains in 0.61-0.66 GiB peak RSS (lora and full, fp32, batch 1 x 32; measured 2026-12-05).
CPU_OVERHEAD = int(0.6 * GIB)
ANSWER_SHARE = 0.5  # share of a sample's tokens that are trained (label-only logits); SFT chats are often ~1/2


@dataclass
class Estimate:
    model: str
    method: str
    device: str
    devices: int
    precision: str
    params: dict
    terms: dict  # name -> bytes per device
    activations_without_checkpointing: int
    activations_with_checkpointing: int
    inference_bytes: int
    notes: list[str] = field(default_factory=list)
    device_memory: int | None = None

    @property
    def total_bytes(self) -> int:
        return sum(self.terms.values())

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.total_bytes <= self.device_memory

    def to_json(self) -> dict:
        return {"model": self.model, "method": self.method, "device": self.device, "devices": self.devices,
                "precision": self.precision, "params": self.params, "terms_bytes": self.terms,
                "total_bytes": self.total_bytes, "total_gib": round(self.total_bytes / GIB, 2),
                "activations_bytes": {"without_checkpointing": self.activations_without_checkpointing,
                                      "with_checkpointing": self.activations_with_checkpointing},
                "inference_bytes": self.inference_bytes, "device_memory_bytes": self.device_memory,
                "fits": self.fits, "notes": self.notes}


# ---------------------------------------------------------------- the model's config


def shipped_model_configs() -> dict[str, Path]:
    from chattune.shipped import SHIPPED_CONFIGS

    return {p.stem: p for p in sorted((SHIPPED_CONFIGS / "models").glob("*.json"))}


def read_model_config(spec: str) -> tuple[dict, str]:
    """The config.json of `spec` as a dict: a shipped model name (`glm-4-9b-chat`), a bare config.json, a model
    folder, `bundled`, or a hub id in the local Hugging Face cache. Nothing is downloaded."""
    shipped = shipped_model_configs()
    if spec in shipped:
        return json.loads(shipped[spec].read_text()), f"{spec} (shipped config)"
    path = Path(spec).expanduser()
    if path.is_file():
        return json.loads(path.read_text()), str(path)
    if spec in ("bundled", "", None):
        from chattune.models.bundled import bundled_model_dir, is_ready

        if not is_ready():
            raise ConfigError("model=bundled is not prepared yet (run `chattune quickstart` once), or give "
                              "model=CONFIG.json")
        path = bundled_model_dir()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model={spec}: no config.json in that folder")
        return json.loads((path / "config.json").read_text()), str(path)
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(spec, local_files_only=True).to_dict(), spec
    except (OSError, ValueError):
        raise ConfigError(f"model={spec}: not a shipped model ({', '.join(shipped)}), a config.json, a model folder "
                          "or a hub id in the local cache; give its config.json: model=path/to/config.json") from None


def stand_in_config(raw: dict):
    """A transformers config for `raw`. Remote-code architectures: ChatGLM2/3 and GLM-4 (`padded_vocab_size`) ->
    Glm (GLM-4's own transformers port, as chattune converts them); ChatGLM-6B (v1, `inner_hidden_size`) and
    TransNormerLLM -> chattune's own models of them (models/families/), the module trees that train."""
    from transformers import AutoConfig, GlmConfig

    raw = {k: v for k, v in raw.items() if not k.startswith("_")}
    mtype = raw.get("model_type")
    if mtype == "chatglm" and "padded_vocab_size" in raw:
        heads = raw["num_attention_heads"]
        kv = raw.get("multi_query_group_num", heads) if raw.get("multi_query_attention") else heads
        return GlmConfig(vocab_size=raw["padded_vocab_size"], hidden_size=raw["hidden_size"],
                         intermediate_size=raw["ffn_hidden_size"], num_hidden_layers=raw["num_layers"],
                         num_attention_heads=heads, num_key_value_heads=kv,
                         head_dim=raw.get("kv_channels", raw["hidden_size"] // heads),
                         attention_bias=raw.get("add_qkv_bias", False), tie_word_embeddings=False, pad_token_id=0)
    from chattune.models.families import OWN
    from chattune.models.native import family_of_config

    family = family_of_config(raw)
    if family in OWN:  # ChatGLM-6B, TransNormerLLM: chattune's own model code, the module tree that trains
        try:
            return OWN[family].model_code.config_from_published(raw)
        except ValueError as e:
            raise ConfigError(f"estimate: {e}") from None
    try:
        return AutoConfig.for_model(mtype, **{k: v for k, v in raw.items() if k != "model_type"})
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"estimate: model_type {mtype!r} is not an architecture this transformers can build "
                          "offline; give the config of a same-shaped model (model=CONFIG.json)") from None


def meta_model(config):
    """The model on the meta device: real module tree, no memory."""
    import warnings

    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    head = model.get_output_embeddings()
    if getattr(text, "tie_word_embeddings", False) and head is not None:
        head.weight = model.get_input_embeddings().weight  # (from_config on meta leaves a tied head untied)
    return model


def _dims(config) -> dict:
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    h = c.hidden_size
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or h // heads
    kv = (getattr(c, "num_key_value_heads", None) or heads) * head_dim
    return {"hidden": h, "kv": kv, "q": heads * head_dim, "inter": getattr(c, "intermediate_size", 4 * h),
            "layers": c.num_hidden_layers, "vocab": c.vocab_size}


# ---------------------------------------------------------------- the estimate


def estimate(cfg, gpus: int | None = None, gpu_memory: int | None = None, log=print) -> Estimate:
    from chattune.hardware import decide_precision
    from chattune.methods import count_parameters, get_method
    from chattune.methods.freeze import decoder_layers

    raw, source = read_model_config(cfg.model.path)
    config = stand_in_config(raw)
    method = get_method(cfg.method)
    model = meta_model(config)
    base_total = sum(p.numel() for p in model.parameters())
    quantized = _quantizable_weights(model)
    _, layers = decoder_layers(model)
    # DeepSpeed's ZeRO-3 estimator wants the parameter count of the largest decoder layer
    largest_layer_params = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    model = method.apply(model, cfg)
    trainable, total = count_parameters(model)
    # the backward pass runs from the lowest decoder layer holding a trainable parameter up (Freeze of the last N
    # layers, LoRA with lora.layers); a prefix lives outside the layers and needs input gradients through all
    backward_layers = _layers_with_backward(model)
    if not method.trains_base_weights and backward_layers == 0:
        backward_layers = _dims(config)["layers"]
    d = _dims(config)
    t = cfg.train

    device = "cuda" if (gpus or gpu_memory) else _this_device()
    n = gpus or 1
    # the precision training would decide (hardware.decide_precision); GPUs given by --gpus/--gpu-memory may not be
    # this machine's: they are assumed to have bf16
    precision, _ = decide_precision(t.precision, device, gpu_bf16=True if (gpus or gpu_memory) else None)
    act_bytes = 4 if precision == "fp32" else 2
    zero = _zero_stage(t.deepspeed)
    notes = []

    # weights: quantized base, fp32 master weights for methods that train them, else the training precision
    bits = method.base_weight_bits(cfg)
    if bits:
        # bitsandbytes quantizes the linear layers' weights, not the head, embeddings, norms or biases; peft's k-bit
        # preparation then casts those to fp32 for training (16-bit at inference). 4-bit constants add 0.5 bit per
        # weight (an fp32 absmax per 64), 0.127 with double quantization; LLM.int8 keeps one fp32 scale per row.
        constants = (0.127 if cfg.qlora.double_quant else 0.5) if bits == 4 else 0
        quantized_bytes = quantized * (bits + constants) / 8
        weight_bytes = quantized_bytes + (base_total - quantized) * 4
        notes.append(f"base weights: {quantized:,} linear-layer weights quantized to {bits} bits (+ constants), "
                     f"the other {base_total - quantized:,} parameters fp32 (peft's k-bit preparation)")
    elif method.trains_base_weights:
        weight_bytes = base_total * 4
    else:
        weight_bytes = base_total * act_bytes
    adapter = trainable if not method.trains_base_weights else 0
    terms = {"weights": int(weight_bytes), "trainable weights (fp32 adapters)": adapter * 4,
             "gradients (fp32)": trainable * 4, "optimizer states (AdamW, fp32 m and v)": trainable * 8}
    if zero:
        frozen_bytes = weight_bytes / base_total if bits else act_bytes  # DeepSpeed keeps them 16-bit
        terms = _zero_terms(zero, trainable, total - trainable, frozen_bytes, largest_layer_params, n, t.deepspeed,
                            notes)

    tokens = t.batch_size * cfg.data.max_length
    per_token_layer = _activation_bytes_per_token_layer(d, model, cfg, method, act_bytes, _compiles(cfg, device))
    without = tokens * backward_layers * per_token_layer
    with_ckpt = tokens * backward_layers * d["hidden"] * act_bytes + tokens * per_token_layer * min(1, backward_layers)
    terms["activations" + (" (gradient checkpointing)" if t.gradient_checkpointing else "")] = \
        int(with_ckpt if t.gradient_checkpointing else without)
    terms["logits"] = int(_logits_bytes(tokens, d["vocab"], t.label_only_logits, act_bytes))
    terms["runtime overhead"] = CUDA_OVERHEAD if device == "cuda" else CPU_OVERHEAD
    # inference: weights as chat/eval/serve load the run (hardware.decide_device_and_dtype with --dtype auto: the
    # precision it trained in, on this kind of device; a quantized base quantized), the adapter loaded with them
    # (P-tuning v2's prefix encoder with projection is ~1B parameters), a KV cache of one max_length sequence, the
    # overhead
    infer_weights = quantized_bytes + (base_total - quantized) * 2 if bits else base_total * act_bytes
    infer_weights += adapter * act_bytes
    kv_cache = 2 * d["layers"] * d["kv"] * cfg.data.max_length * act_bytes
    inference = int(infer_weights + kv_cache + terms["runtime overhead"])
    params = {"base": base_total, "trainable": trainable, "total": total,
              "trainable_percent": round(100 * trainable / total, 4), "largest_layer": largest_layer_params}
    return Estimate(source, cfg.method, device, n, precision, params, terms, int(without), int(with_ckpt), inference,
                    notes, gpu_memory)


def _quantizable_weights(model) -> int:
    """Weights bitsandbytes quantizes when a base is loaded in 4 or 8 bits: every linear layer's weight matrix but
    the output head's (transformers keeps the head, and with it a tied embedding, in 16 bits)."""
    import torch

    from chattune.methods.common import output_head

    head = output_head(model)  # the rule lora.target=all skips the head by
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)


def _this_device() -> str:
    from chattune.hardware import device_type

    return device_type()


def _compiles(cfg, device: str) -> bool:
    """Whether training would compile the decoder layers (train.compile=auto does on CUDA for runs of enough
    steps; a run given in epochs counts as long enough, as its step count depends on the data)."""
    from chattune.errors import ChattuneError
    from chattune.train.compile import should_compile

    t = cfg.train
    try:
        return should_compile(t.compile, device, t.max_steps if t.max_steps > 0 else None,
                              bool(t.deepspeed or t.fsdp))[0]
    except ChattuneError:  # a combination training refuses: count what the setting asks for
        return t.compile is True


def _activation_bytes_per_token_layer(d: dict, model, cfg, method, act_bytes: int, compiled: bool = False) -> float:
    """Bytes one decoder layer keeps per token for the backward pass (Llama-style block): the two norm inputs in
    fp32 (transformers' RMSNorm/LayerNorm compute in fp32), q/k/v, rotated q/k, the attention output, and in the
    gated MLP gate, up, act(gate) and their product. Adapter methods keep the same (input gradients must flow
    through the frozen layers above the lowest adapted one); the method adds what its own modules keep
    (`Method.extra_activations`: LoRA with dropout keeps each adapted layer's mask and dropped-out input)."""
    h, kv, q, i = d["hidden"], d["kv"], d["q"], d["inter"]
    elems = (q + 2 * kv) + (q + kv) + q + 4 * i
    return 2 * h * 4 + (elems + method.extra_activations(model, cfg, compiled=compiled)) * act_bytes


def _layers_with_backward(model) -> int:
    """Decoder layers the backward pass goes through: from the first one holding a trainable parameter to the
    last (Freeze of the last N layers and LoRA with lora.layers=N need no activations below them; 0 when no layer
    holds one)."""
    from chattune.methods.freeze import decoder_layers, lowest_trained_layer

    _, layers = decoder_layers(model)
    first = lowest_trained_layer(layers)
    return 0 if first is None else len(layers) - first


def _logits_bytes(tokens: int, vocab: int, label_only: bool, act_bytes: int) -> float:
    if label_only:
        # the head runs only at trained positions; the loss is computed in fp32 chunks (a few MB)
        return tokens * ANSWER_SHARE * vocab * (act_bytes + act_bytes)  # logits + their gradient
    # every position: logits, their fp32 copy for the loss, and the gradient
    return tokens * vocab * (act_bytes + 4 + 4)


def _zero_stage(path: str | None) -> int:
    if not path:
        return 0
    from chattune.methods.common import resolve_deepspeed_config

    return int(json.loads(resolve_deepspeed_config(path).read_text())["zero_optimization"]["stage"])


def _zero_terms(stage: int, trainable: int, frozen: int, frozen_bytes: float, largest_layer: int, n: int,
                ds_path: str, notes: list) -> dict:
    """Model states per GPU under ZeRO, mixed precision. DeepSpeed's own estimators take every parameter as
    trained, so they get the trainable ones: their 16-bit weights and gradients and the fp32 master weights and
    AdamW moments (partitioned as the stage says). Frozen parameters (a LoRA/prefix base, Freeze's lower layers)
    get no gradient and no optimizer state; they are stored once at `frozen_bytes` each (16-bit, or the quantized
    size): whole on every GPU under ZeRO-2, partitioned over the GPUs under ZeRO-3, in CPU memory with
    `offload_param`."""
    import contextlib
    import io
    import logging

    from chattune.methods.common import resolve_deepspeed_config

    zero = json.loads(resolve_deepspeed_config(ds_path).read_text()).get("zero_optimization") or {}
    offload_opt = (zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme")
    offload_param = (zero.get("offload_param") or {}).get("device") in ("cpu", "nvme")
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    quiet = contextlib.redirect_stdout(io.StringIO())  # (the estimators print their own table)
    try:
        if stage == 3:
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

            with quiet:
                _, gpu, _ = estimate_zero3_model_states_mem_needs(trainable, largest_layer, n, 1, offload_opt,
                                                                  offload_param, True, 1.5)
        else:
            from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

            with quiet:
                _, gpu = estimate_zero2_model_states_mem_needs(trainable, n, 1, offload_opt, 1.5)
        how = "DeepSpeed's estimator"
    except ImportError:  # the same formulas as DeepSpeed 0.19's estimators
        if stage == 3:
            gpu = 4 * largest_layer + (0 if offload_opt and offload_param else
                                       int(2 * trainable / n) if offload_opt else int(18 * trainable / n))
        else:
            gpu = 2 * trainable if offload_opt else 2 * trainable + int(18 * trainable / n)
        how = "DeepSpeed's formulas (DeepSpeed not installed)"
    if stage == 3:
        frozen_gpu = 0 if offload_param else int(frozen * frozen_bytes / n)
    else:
        frozen_gpu = int(frozen * frozen_bytes)
    notes.append(f"ZeRO-{stage} model states of the {trainable:,} trainable parameters from {how}"
                 + (f"; {frozen:,} frozen parameters: weights only, "
                    + ("in CPU memory (offload_param)" if stage == 3 and offload_param else
                       f"partitioned over {n} GPUs" if stage == 3 else "whole on every GPU")
                    if frozen else ""))
    return {f"model states (ZeRO-{stage}: weights, gradients, optimizer)": int(gpu) + frozen_gpu}


# ---------------------------------------------------------------- output


def parse_size(text: str) -> int:
    """`24GB`, `80GiB`, `24` (GB) -> bytes. GB = 10^9, GiB = 2^30."""
    s = text.strip().upper().replace(" ", "")
    for suffix, scale in (("GIB", GIB), ("GB", 10**9), ("G", 10**9), ("MIB", 2**20), ("MB", 10**6)):
        if s.endswith(suffix):
            s, factor = s[: -len(suffix)], scale
            break
    else:
        factor = 10**9
    try:
        return int(float(s) * factor)
    except ValueError:
        raise ConfigError(f"--gpu-memory {text!r}: give a size such as 24GB or 80GiB") from None


def format_estimate(e: Estimate) -> str:
    p = e.params
    lines = [f"model: {e.model}", f"method: {e.method}, precision {e.precision}, {e.devices} x {e.device}",
             f"parameters: {p['base'] / 1e9:.3f}B base, {p['trainable']:,} trainable ({p['trainable_percent']}%)",
             "", "per device:"]
    width = max(len(k) for k in e.terms)
    for k, v in e.terms.items():
        lines.append(f"  {k:<{width}}  {v / GIB:8.2f} GiB")
    lines.append(f"  {'total':<{width}}  {e.total_bytes / GIB:8.2f} GiB  ({e.total_bytes / 1e9:.1f} GB)")
    lines.append(f"activations: {e.activations_without_checkpointing / GIB:.2f} GiB without gradient checkpointing, "
                 f"{e.activations_with_checkpointing / GIB:.2f} GiB with")
    lines.append(f"inference (weights + KV cache of one max_length sequence): {e.inference_bytes / GIB:.2f} GiB")
    if e.device_memory is not None:
        verdict = "fits" if e.fits else "does NOT fit"
        lines.append(f"{verdict} a {e.device_memory / GIB:.1f} GiB device "
                     f"({100 * e.total_bytes / e.device_memory:.0f}% of it)")
    lines += [f"note: {n}" for n in e.notes]
    return "\n".join(lines)
