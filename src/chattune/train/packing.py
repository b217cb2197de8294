"""Packing: whether a model keeps packed samples apart (`packing_is_exact`, checked on the model, not assumed) and the
run's packing decision (data.packing, the method, the model family, per-sample attention where it keeps results
exact, padded batches otherwise)."""

from __future__ import annotations

import inspect

import torch

from chattune.models.checks import model_dtype, within_rounding
from chattune.models.families import packing_off_reason
from chattune.train import packed_attention


def forward_accepts(model, name: str) -> bool:
    """Does the model's forward take the keyword `name` (position_ids here; logits_to_keep, use_cache in the
    trainer)?"""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def packing_is_exact(model) -> bool:
    """Does this model keep packed samples apart (restarted position_ids, no attention mask)? Checked, not
    assumed: remote-code models often ignore position_ids, and packing them would leak across samples."""
    if not forward_accepts(model, "position_ids"):
        return False
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, vocab, (1, 5), generator=g)
    b = torch.randint(0, vocab, (1, 7), generator=g)
    device = model.get_input_embeddings().weight.device
    packed = torch.cat([a, b], 1).to(device)
    pos = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = model(input_ids=b.to(device), use_cache=False).logits.float()
            together = model(input_ids=packed, position_ids=pos, use_cache=False).logits.float()[:, 5:]
    except Exception:  # noqa: BLE001 - any failure means: don't pack this model
        return False
    finally:
        model.train(was_training)
    # Within rounding (models/checks.py: the one tolerance rule by dtype); a leak across samples changes the logits
    # by ~0.6 of their scale. Not `same_logits`: on random tokens a near-tie's argmax may flip in bf16.
    return within_rounding(together, alone, model_dtype(model))


def decide_packing(cfg, method, model, per_sample_attention: bool = True, log=print) -> bool:
    """Pack the training rows (padding-free batches) for this run? data.packing, where the method supports it, NEFTune
    is off (train/neftune.py), the model's family allows it and the model keeps packed samples apart; with `per_sample_attention` (off for `chattune
    bench`'s stock baseline) packed rows attend one causal SDPA call per sample where that stays exact."""
    packing = cfg.data.packing and method.supports_packing
    if packing and cfg.train.neftune_noise_alpha is not None:
        from chattune.train.neftune import PACKING_OFF

        log(f"packing: off ({PACKING_OFF})")
        packing = False
    family_reason = packing_off_reason(model.config)
    if packing and family_reason:
        log(f"packing: off ({family_reason})")
        packing = False
    if packing:  # packing_is_exact: two forward passes, run again only where the attention changed in between
        exact = per_sample_attention and packed_attention.enable(model) and packing_is_exact(model)
        if not exact:
            packed_attention.disable(model)  # per-sample attention is an optimisation; never trade exactness for it
            exact = packing_is_exact(model)
        if not exact:
            log("packing: this model does not keep packed samples apart (position_ids); using padded batches")
            packing = False
    return packing
