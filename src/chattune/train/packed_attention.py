"""Attention for packed rows without a block-diagonal mask: one causal SDPA call per packed sample.

With padding-free packing, transformers' SDPA path builds a (rows, 1, T, T) block-diagonal causal mask for the
whole packed row. The kernels cannot skip masked blocks, so every sample attends (and back-propagates) over the
whole row: on CPU that made attention 30% of a LoRA step on the bundled model (a 4-sample row of ~830 tokens:
47 ms per layer with the mask, 20 ms with one `is_causal=True` call per sample; docs/benchmarks.md). This is the
CPU/SDPA counterpart of flash-attention's varlen kernels.

It registers as an attention implementation (`chattune_packed_sdpa`) and is used only where it is exact:
a single row whose `position_ids` restart at 0 for every sample (what the packing collator produces), a mask
built by transformers, full-length keys (no KV cache) and no attention extras (sliding window, softcap, sinks,
bias). Anything else goes to transformers' own SDPA function unchanged. `train()` switches a model to it only
when the model used plain `sdpa`, and then re-checks `packing_is_exact`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "chattune_packed_sdpa"

# Keyword arguments that do not change what attention computes (or are only accepted when None/False).
_HARMLESS = {"position_ids", "use_cache", "output_hidden_states", "return_dict", "cu_seq_lens_q", "cu_seq_lens_k",
             "max_length_q", "max_length_k"}
_ONLY_IF_NONE = {"sliding_window", "softcap", "output_attentions", "position_bias", "s_aux", "sinks", "cache",
                 "past_key_values", "head_mask"}

_last: tuple[torch.Tensor, list[int] | None] | None = None  # position_ids -> lengths, shared by all layers


def sample_lengths(position_ids: torch.Tensor | None) -> list[int] | None:
    """Lengths of the samples packed in a one-row `position_ids` that restarts at 0 for each sample, else None."""
    global _last
    if position_ids is None or position_ids.ndim != 2 or position_ids.shape[0] != 1:
        return None
    if _last is not None and _last[0] is position_ids:
        return _last[1]
    pos = position_ids[0]
    starts = pos == 0
    step_ok = torch.ones_like(starts)
    step_ok[1:] = starts[1:] | (pos[1:] == pos[:-1] + 1)
    lengths = None
    if bool(starts[0]) and bool(step_ok.all()):
        idx = torch.nonzero(starts).flatten().tolist() + [pos.numel()]
        lengths = [b - a for a, b in zip(idx[:-1], idx[1:])]
        if len(lengths) < 2:
            lengths = None
    _last = (position_ids, lengths)
    return lengths


@torch.compiler.disable  # under train.compile: the per-sample split sizes are data, not shapes to specialise on
def packed_sdpa_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                  scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """query: (1, heads, T, d); key/value: (1, kv_heads, T, d). Returns (1, T, heads, d) like transformers' SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lengths = sample_lengths(kwargs.get("position_ids"))
    exact = (
        lengths is not None
        and attention_mask is not None  # transformers built the packed (block-diagonal) mask we replace
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2] == sum(lengths)
        and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
        and all(k in _HARMLESS or (k in _ONLY_IF_NONE and not v) for k, v in kwargs.items())
    )
    if not exact:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    outputs = [
        F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa)
        for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))
    ]
    return torch.cat(outputs, 2).transpose(1, 2).contiguous(), None


def register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def enable(model) -> bool:
    """Switch a model that uses transformers' `sdpa` attention to per-sample packed attention. True if switched."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    register()
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, TypeError, AttributeError, ImportError):
        return False
    return model.config._attn_implementation == NAME


def disable(model) -> None:
    if getattr(model.config, "_attn_implementation", None) == NAME:
        model.set_attn_implementation("sdpa")
