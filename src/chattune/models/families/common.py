"""Pieces the model code chattune owns (chatglm6b.py, transnormer.py) shares."""

from __future__ import annotations

import torch

try:  # transformers' own reading of logits_to_keep (an int, or chattune's boolean label mask in training)
    from transformers.modeling_utils import slice_logits_to_keep
except ImportError:  # older transformers 5.x
    def slice_logits_to_keep(hidden_states: torch.Tensor, logits_to_keep) -> torch.Tensor:
        if isinstance(logits_to_keep, int):
            return hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
        if logits_to_keep.dtype == torch.bool:
            return hidden_states[logits_to_keep]
        return hidden_states[:, logits_to_keep]

__all__ = ["slice_logits_to_keep"]
