"""Run setup that `prepare` (trainer.py) calls before any work: the process' rank, the output_dir and resume checks,
loading the tokenizer, template and model for training, and the log note on where the backward pass stops."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from chattune import outputs
from chattune.config import RunConfig
from chattune.data.templates import get_template
from chattune.errors import ConfigError
from chattune.hardware import torch_dtype
from chattune.methods import get_method
from chattune.models.load import generation_stop_ids, load_model, load_tokenizer, model_type, resolve_model_path
from chattune.train.gpu_options import training_attention


def is_main_process() -> bool:
    """Rank 0 of a torchrun / DeepSpeed launch (or a single process): the one that logs and writes files."""
    return int(os.environ.get("RANK", "0")) == 0


def check_output_dir(cfg: RunConfig) -> bool:
    """Refuse an output_dir holding another run unless resume= or overwrite=true. Returns whether an old run is
    to be cleared; that happens only once model and data have loaded, so a bad input loses nothing."""
    out = Path(cfg.output_dir)
    if cfg.resume is None and outputs.holds_a_run(out):
        if not cfg.overwrite:
            raise ConfigError(f"output_dir {out} already holds a run; continue it with resume=auto, replace it with "
                              "overwrite=true, or choose another output_dir=")
        return True
    return False


def check_resume_matches(cfg: RunConfig, resume_from: Path | None) -> None:
    """A resumed run must be the same run: the same base model and method as the one that wrote the checkpoint."""
    if resume_from is None:
        return
    info = outputs.read_info(cfg.output_dir)
    changed = [f"{key} was {info[key]!r}, now {now!r}" for key, now in
               (("model_spec", cfg.model.path), ("method", cfg.method)) if key in info and info[key] != now]
    if changed:
        raise ConfigError(f"resume={cfg.resume}: {cfg.output_dir} holds a run with another setup ({'; '.join(changed)}); "
                          "resume it with its own settings, or start anew with overwrite=true or another output_dir=")


def load_for_training(cfg: RunConfig, precision: str, log=print, device: str | None = None):
    """Tokenizer, template and model for `cfg`, the method not yet applied. Returns (model, tokenizer, template,
    model_path)."""
    method = get_method(cfg.method)
    path = resolve_model_path(cfg.model.path, log, cfg.model.revision)
    tokenizer = load_tokenizer(path, cfg.model.trust_remote_code, cfg.model.revision)
    # Adapter methods never update the base weights, so they need no fp32 master copy: load them in the training
    # precision (on CPU too: autocast would otherwise re-cast every frozen weight to bf16 at every step, ~10% of a
    # LoRA step, and keep both copies in memory). Methods that train base weights keep fp32 master weights.
    load_dtype = torch.float32 if method.trains_base_weights else torch_dtype(precision)
    attention, why = training_attention(cfg.model.attn_implementation, device or "cpu", precision,
                                        cfg.data.packing and method.supports_packing, path,
                                        cfg.model.trust_remote_code)
    if attention and not cfg.model.attn_implementation:
        log(f"attention: {attention} ({why})")
    model = load_model(path, load_dtype, cfg.model.trust_remote_code, attention, cfg.model.revision,
                       **method.load_kwargs(cfg, load_dtype))
    template = get_template(cfg.template, tokenizer, model_type(path), generation_stop_ids(model))
    log(f"template: {template.name} ({template.chosen_because})")
    return model, tokenizer, template, path


def backward_reach(model) -> str:
    """For the log: where the backward pass starts when the lowest decoder layers train nothing (lora.layers,
    freeze.trainable_layers), else nothing."""
    from chattune.errors import MethodError
    from chattune.methods.freeze import decoder_layers, lowest_trained_layer

    try:
        _, layers = decoder_layers(model)
    except MethodError:
        return ""
    first = lowest_trained_layer(layers)
    if not first:  # None (no layer trains) or 0 (every layer is reached)
        return ""
    below = "layer 0 runs" if first == 1 else f"layers 0-{first - 1} run"
    return f"; backward stops at decoder layer {first} ({below} forward only)"
