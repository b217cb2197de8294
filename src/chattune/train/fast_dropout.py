"""Dropout with cheaper random numbers, for adapter dropout on CPU.

`nn.Dropout` on CPU draws one random number per element from a serial generator (~5 ns each). LoRA puts a
dropout on the input of every adapted layer, so with `lora.dropout>0` the bundled model draws ~150k random numbers
per token: about a quarter of a LoRA step on CPU (measured; docs/benchmarks.md). Here one 64-bit draw gives four
16-bit uniforms, compared with a threshold: the same Bernoulli keep mask and 1/(1-p) scaling (p rounded to a
multiple of 1/65536), from torch's seeded generator, at ~1/3 of the cost. The backward saves the boolean mask only.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class _MaskedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, keep, scale: float):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x * keep * scale

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad * keep * ctx.scale, None, None


def keep_mask(shape: torch.Size, p: float, device) -> torch.Tensor:
    """Boolean mask, True with probability 1 - p (to 1/65536), from the default generator."""
    n = math.prod(shape)
    bits = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    threshold = round((1.0 - p) * 65536) - 32768
    return (bits.view(torch.int16)[:n] < threshold).view(shape)


class FastDropout(nn.Dropout):
    """Drop-in for `nn.Dropout` (same `p`, same train/eval behaviour, same expectation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p >= 1.0:
            return x * 0.0
        return _MaskedScale.apply(x, keep_mask(x.shape, self.p, x.device), 1.0 / (1.0 - self.p))


def apply(model) -> int:
    """Replace the adapters' `nn.Dropout` modules (peft's `lora_dropout`) by FastDropout; returns how many."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, layer in list(dropouts.items()):
            if type(layer) is nn.Dropout:
                dropouts[name] = FastDropout(layer.p)
                swapped += 1
    return swapped
