"""Load a base model and its tokenizer from a local folder, a hub id (if cached/reachable) or `bundled`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from chattune.errors import ModelError


def resolve_model_path(spec: str, log=print) -> str:
    """`bundled` -> the cached HF folder of the default model; a folder must hold config.json."""
    if spec in ("bundled", "", None):
        from chattune.models.bundled import ensure_bundled_model

        return str(ensure_bundled_model(log))
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelError(f"model folder {path} has no config.json; point model= at a Hugging Face model folder")
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"model folder {spec} not found; check model= (a folder, a hub id, or `bundled`)")
    return spec  # a hub id: transformers resolves it from the local HF cache (or the hub, where reachable)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _load_error(path, e) from None
    if tok.pad_token is None:
        # Safe because labels never depend on the pad id (see data/encode.py).
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    return tok


def load_model(path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
               attn_implementation: str | None = None, **kwargs):
    from transformers import AutoModelForCausalLM

    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        raise _load_error(path, e) from None
    return model


def _load_error(path: str, e: Exception) -> ModelError:
    text = str(e)
    if "trust_remote_code" in text:
        return ModelError(f"model {path} ships its own code; if you trust it, set model.trust_remote_code=true")
    if not Path(path).exists():
        return ModelError(f"cannot load model {path!r}: not a local folder and not in the Hugging Face cache "
                          f"({text.splitlines()[0] if text else type(e).__name__}).\n"
                          f"fix: download it first (`hf download {path}`) or give a local folder: model=PATH")
    return ModelError(f"cannot load model from {path}: {text.splitlines()[0] if text else type(e).__name__}")


def model_type(path: str) -> str | None:
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def generation_stop_ids(model) -> list[int]:
    """eos ids the model's generation_config declares (some models stop on several tokens)."""
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)
