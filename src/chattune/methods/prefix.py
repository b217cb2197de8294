"""P-tuning v2 (prefix tuning) through peft's `PrefixTuningConfig`.

A trained key/value prefix of `prefix.num_virtual_tokens` positions is put in front of every attention layer;
the base model stays frozen. peft starts the prefix from random numbers, which at first disturbs every attention
layer (on the bundled model the first losses are 3-4x the base model's). With `prefix.init_text`, the prefix
starts as the key/values the frozen model computes for that text (its tokens repeated or cut to
`num_virtual_tokens`): the tuned model begins exactly as the base model with that text in front of every prompt,
and training moves on from there (Li & Liang's prefix-tuning paper initialises from real words' activations for
the same reason). peft has no such option, hence the code here.

With `prefix.projection=true` the prefix is produced by a small MLP (ChatGLM's P-tuning v2 `prefix_projection`),
`prefix.projection_hidden` wide (default: the prefix width).

Grouped-query attention: the prefix lives in the key/value cache, so its shape is that of the *key/value* heads
(`num_key_value_heads` x `head_dim`), not of the query heads. We derive both from the model config and pass
them explicitly rather than relying on peft's defaults (which read `hidden_size`/`num_attention_heads` and only
correct them where the config names `num_key_value_heads`).

Why no packing: the prefix is one shared past for the whole row; in a packed row only the first sample would
see it at the positions it was trained with. Why no gradient checkpointing: transformers' checkpointed decoder
layers are called with `past_key_values=None`, which would drop the prefix (peft refuses the combination too).

With projection, peft saves only the projected prefix (what inference needs), not the MLP that produced it. So
that `resume=` continues the same MLP, the full prefix encoder state is saved next to the adapter as
`prefix_encoder.safetensors` and loaded back on resume.
"""

from __future__ import annotations

import os
import types

from pydantic import Field

from chattune.errors import MethodError
from chattune.methods.base import Method, Section
from chattune.methods.common import refuse_8bit_base

ENCODER_FILE = "prefix_encoder.safetensors"


class PrefixConfig(Section):
    num_virtual_tokens: int = Field(16, ge=1)
    init_text: str | None = Field(None, min_length=1, description="start the prefix as this text's key/values")
    projection: bool = False
    projection_hidden: int | None = Field(None, ge=1, description="hidden size of the projection MLP")


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def kv_shape(config) -> tuple[int, int, int]:
    """(decoder layers, key/value heads, head dim) from a model config, whatever the attribute names."""
    c = _text_config(config)

    def first(*names):
        for n in names:
            v = getattr(c, n, None)
            if v is not None:
                return v
        return None

    layers = first("num_hidden_layers", "num_layers", "n_layer")
    heads = first("num_attention_heads", "n_head", "num_heads")
    hidden = first("hidden_size", "n_embd", "d_model")
    # ChatGLM names its kv heads `multi_query_group_num` (with `multi_query_attention`).
    kv_heads = first("num_key_value_heads", "num_kv_heads")
    if kv_heads is None and getattr(c, "multi_query_attention", False):
        kv_heads = getattr(c, "multi_query_group_num", None)
    kv_heads = kv_heads or heads
    head_dim = first("head_dim", "kv_channels") or (hidden // heads if hidden and heads else None)
    if not (layers and kv_heads and head_dim):
        raise MethodError("method=prefix: cannot read the number of layers, key/value heads and head size from "
                          f"this model's config ({type(c).__name__}); use method=lora")
    return int(layers), int(kv_heads), int(head_dim)


def prefix_config(model, cfg):
    from peft import PrefixTuningConfig

    layers, kv_heads, head_dim = kv_shape(model.config)
    token_dim = kv_heads * head_dim
    p = cfg.prefix
    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p.num_virtual_tokens,
                              num_layers=layers, num_attention_heads=kv_heads, token_dim=token_dim,
                              prefix_projection=p.projection, encoder_hidden_size=p.projection_hidden or token_dim)


class PrefixTuning(Method):
    name = "prefix"
    section = "prefix"
    config_class = PrefixConfig
    supports_packing = False
    about = "P-tuning v2: a trained key/value prefix in every attention layer (peft)"

    def preflight(self, cfg, device: str) -> None:
        if cfg.prefix.init_text and cfg.prefix.projection:
            raise MethodError("prefix.init_text cannot be combined with prefix.projection=true: the projection MLP, "
                              "not the prefix itself, is what trains there. Drop one of the two")
        if cfg.train.gradient_checkpointing:
            raise MethodError("method=prefix cannot be combined with train.gradient_checkpointing=true: "
                              "checkpointed decoder layers drop the key/value prefix, so it would not train. Set "
                              "train.gradient_checkpointing=false (a prefix needs little memory), or use method=lora")
        refuse_8bit_base(cfg, "is for method=lora; use method=qlora for a quantized base")
        if cfg.data.packing and "packing" in cfg.data.model_fields_set:
            raise MethodError("method=prefix cannot pack samples (data.packing=true): the prefix is one shared past "
                              "per row, so packed samples after the first would not see it where it was trained. "
                              "Drop data.packing=true (prefix tuning pads its batches)")
        super().preflight(cfg, device)

    def apply(self, model, cfg, tokenizer=None):
        from peft import get_peft_model

        model_type = getattr(model.config, "model_type", "")
        if not getattr(model, "_supports_cache_class", True) or not _uses_cache(model):
            raise MethodError(f"method=prefix needs a model that takes a key/value cache (`cache` / `past_key_values`); "
                              f"{model_type or type(model).__name__} does not: use method=lora")
        peft_model = get_peft_model(model, prefix_config(model, cfg))
        if cfg.prefix.init_text and tokenizer is not None:
            init_from_text(peft_model, tokenizer, cfg.prefix.init_text)
        if cfg.prefix.projection:
            _keep_encoder_on_save(peft_model)
        return peft_model


METHOD = PrefixTuning()


def init_from_text(peft_model, tokenizer, text: str) -> None:
    """Set the prefix to the frozen model's key/values for `text` at positions 0..num_virtual_tokens-1.

    peft lays the prefix out as one row per virtual token of (layers x [key, value] x kv heads x head dim), the
    order in which `PeftModel.get_prompt` views and splits it back into each layer's (key, value)."""
    import torch

    config = peft_model.active_peft_config
    n = config.num_virtual_tokens
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise MethodError(f"prefix.init_text={text!r} has no tokens; give some text or drop the key")
    ids = (ids * (n // len(ids) + 1))[:n]
    embedding = peft_model.prompt_encoder[peft_model.active_adapter].embedding
    base = peft_model.get_base_model()
    with torch.no_grad():  # the base model alone: no prefix yet
        out = base(input_ids=torch.tensor([ids], device=embedding.weight.device), use_cache=True)
    cache = out.past_key_values
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    if len(layers) != config.num_layers:
        raise MethodError(f"prefix.init_text: the model's cache has {len(layers)} layers, the prefix "
                          f"{config.num_layers}; drop prefix.init_text for this model")
    # each (1, kv heads, n, head dim) -> (n, kv heads * head dim), then per token: layer 0 key, value, layer 1 ...
    rows = torch.cat([t[0].transpose(0, 1).reshape(n, -1) for kv in layers for t in kv], dim=1)
    embedding.weight.data.copy_(rows.to(embedding.weight.dtype))


def _uses_cache(model) -> bool:
    """Whether the model's forward takes a key/value cache: `cache` since transformers 5.24, `past_key_values`
    before (and in remote-code models)."""
    import inspect

    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "cache" in parameters or "past_key_values" in parameters


def _keep_encoder_on_save(peft_model) -> None:
    """Save the whole prefix encoder (embedding + MLP) with every checkpoint and load it back on resume."""
    from safetensors.torch import load_file, save_file

    save_pretrained = peft_model.save_pretrained
    load_adapter = peft_model.load_adapter

    def encoder(self):
        return self.prompt_encoder[self.active_adapter]

    def save_with_encoder(self, save_directory, *args, **kwargs):
        save_pretrained(save_directory, *args, **kwargs)
        state = {k: v.detach().contiguous().cpu() for k, v in encoder(self).state_dict().items()}
        save_file(state, os.path.join(save_directory, ENCODER_FILE))

    def load_with_encoder(self, model_id, adapter_name, *args, is_trainable: bool = False, **kwargs):
        path = os.path.join(str(model_id), ENCODER_FILE)
        if is_trainable and adapter_name == self.active_adapter and os.path.isfile(path):
            encoder(self).load_state_dict(load_file(path), strict=True)
            return None
        return load_adapter(model_id, adapter_name, *args, is_trainable=is_trainable, **kwargs)

    peft_model.save_pretrained = types.MethodType(save_with_encoder, peft_model)
    peft_model.load_adapter = types.MethodType(load_with_encoder, peft_model)
