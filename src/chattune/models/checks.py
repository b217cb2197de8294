"""The comparison behind chattune's "run it twice and compare" start-up checks: a fast or batched path must give
the logits of the model's own plain forward to within the rounding of the model's dtype, and never more.

Used by serve's `step_matches_transformers` and `batching_is_exact` (serve/engine.py), the decode step's check
under `generate` (models/decode_step.py: `install_for_generate`) and the packing check (`packing_is_exact`).

The tolerance is on the largest absolute difference, relative to the logits' scale (their largest magnitude, at
least 1): rounding errors grow with the magnitudes summed, not with each logit's own value, so a logit near zero
gets the same absolute allowance as a large one. Numbers, per model dtype (logits compared in fp32):

- fp32, 1e-3: measured differences are ~1e-6 of the scale (bundled model, SmolLM2-135M: 7e-7 to 3e-6 for batched
  vs alone, the decode step vs transformers, packed vs alone), so 1e-3 leaves room for other kernels and deeper
  models and still catches anything that is not float noise.
- bf16, 5e-2: bf16 keeps 8 significant bits (relative rounding 2^-9, 2e-3 per operation), and the roundings of
  30 layers add up: on the bundled model batched vs alone differ by 1.0-1.3e-2 of the scale (|logits| ~34), a
  packed row vs the same sample alone by up to 2.0e-2 (random tokens, 3 seeds); TransNormerLLM's official bf16
  differs from its fp32 by 2.2e-2 (0.072 on |logits| <= 3.3, tests/test_family_transnormer.py). The project's bf16
  tests allow atol=rtol=2e-2 per element (tests/test_decode_step.py, tiny models whose logits stay below 1: 2e-2
  to 4e-2 of a scale of 1) and 0.15 on |logits| <= 3.3 (4.5e-2, test_family_transnormer). 2e-2 of the scale
  would be within the noise measured above, so 5e-2: 2.5x the largest noise measured and still an order of
  magnitude below real faults (a packed row that sees the sample before it moves the logits by 0.57-0.94 of the
  scale; a wrong norm or a missing adapter, more).
- fp16, 1e-2: 11 significant bits, 8x less rounding than bf16; measured 1.7e-3 (batched) to 3.6e-3 (packed) on the
  bundled model.

`same_logits` also asks for the same argmax everywhere: the serve and decode-step checks promise the greedy tokens
of the plain forward. The packing check compares logits at random tokens, where near-ties flip under bf16
rounding (seen on the bundled model), so it asks `within_rounding` only.
"""

from __future__ import annotations

import torch

TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}
HALF_TOLERANCE = TOLERANCE[torch.bfloat16]  # any other low-precision dtype: bf16's, the coarsest of them


def tolerance(dtype: torch.dtype) -> float:
    """The largest difference, relative to the logits' scale, that rounding in `dtype` explains."""
    return TOLERANCE.get(dtype, HALF_TOLERANCE)


def model_dtype(model) -> torch.dtype:
    """The dtype a model computes in: its input embeddings' (a quantized or fp32-adapter model's base dtype)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def relative_difference(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max(1, max |want|), in fp32; equal values count 0 (a logit masked to -inf in both, as
    generate's processors do), a NaN makes it NaN."""
    got, want = got.float(), want.float()
    diff = torch.where(got == want, 0.0, (got - want).abs())
    finite = want[torch.isfinite(want)].abs()
    scale = max(1.0, float(finite.max())) if finite.numel() else 1.0
    return float(diff.max()) / scale


def within_rounding(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> bool:
    """`got` equals `want` (same shape) to within the rounding of a model computing in `dtype` (NaN never does)."""
    if got.shape != want.shape:
        return False
    if got.numel() == 0:
        return True
    return relative_difference(got, want) <= tolerance(dtype)  # a NaN compares False


def same_logits(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> bool:
    """Logits [..., V] `got` are `want`'s: the same shape, the same argmax at every position, every value within
    the rounding of `dtype` (`within_rounding`)."""
    return within_rounding(got, want, dtype) and torch.equal(got.argmax(-1), want.argmax(-1))
