"""Model code and conversions chattune owns for families transformers lacks or cannot load, and what the rest of
chattune must know about them (one place: the trainer, the methods and the probes ask here).

`register_all()` registers chattune's own model types (ChatGLM-6B's `chattune_chatglm6b`, TransNormerLLM's
`chattune_transnormer`) with transformers' Auto
classes, so `AutoModelForCausalLM.from_pretrained` loads a converted or exported folder of that family. chattune's
loader calls it; other code does `import chattune.models.families; chattune.models.families.register_all()`.
"""

from __future__ import annotations

import json
from pathlib import Path

CHATGLM6B = "chattune_chatglm6b"
TRANSNORMER = "chattune_transnormer"


def register_all() -> None:
    from chattune.models.families import chatglm6b, transnormer

    chatglm6b.register()
    transnormer.register()


def _model_type(config) -> str:
    return getattr(config, "model_type", None) or ""


def probe_ids(config, ids: list[int]) -> list[int]:
    """Token ids for a start-up probe forward (which layers share an input, ...) that this model accepts: ChatGLM-6B
    needs `[gMASK]` and `<sop>` in every sequence, so they are put after the first two ids."""
    if _model_type(config) == CHATGLM6B:
        return ids[:2] + [config.gmask_token_id, config.bos_token_id] + ids[2:]
    return list(ids)


def packing_off_reason(config) -> str | None:
    """Why this family trains on padded batches, never packed ones (None: packing is checked as for any model)."""
    if _model_type(config) == CHATGLM6B:
        return ("ChatGLM-6B attends bidirectionally over each sample's prompt (up to its <sop>), which packed "
                "samples cannot keep apart; using padded batches")
    if _model_type(config) == TRANSNORMER:
        return ("TransNormerLLM's linear attention carries one running state through the whole row, so a packed "
                "sample would see the ones before it; using padded batches")
    return None


def method_refusal(method: str, model_type: str | None) -> str | None:
    """Why `method` cannot apply to this family (checked before the model is loaded), or None."""
    if method == "prefix" and model_type == TRANSNORMER:
        return ("method=prefix (P-tuning v2) does not apply to TransNormerLLM: it puts trained keys and values in "
                "front of every attention layer, and TransNormerLLM's linear attention keeps no keys and values "
                "(one running state per layer). Use method=lora, freeze or sft")
    return None


def spec_model_type(spec: str | None, revision: str | None = None) -> str | None:
    """The model_type in the config.json of model=`spec` (a folder, or a hub id in the local cache), read without
    loading or converting anything; None when it cannot be read. A published checkpoint gives its own type
    (ChatGLM-6B: "chatglm" with GLM v1 fields, reported here as chattune's "chattune_chatglm6b")."""
    from chattune.models import native

    if not spec or spec == "bundled":
        return None
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        from chattune.models.load import _hub_snapshot

        try:
            folder = _hub_snapshot(spec, revision)
        except Exception:  # noqa: BLE001 - no cache entry: nothing known before loading
            folder = None
        if folder is None:
            return None
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    family = native.family_of_config(config)
    if family == "chatglm6b":
        return CHATGLM6B
    if family == "transnormer":
        return TRANSNORMER
    return config.get("model_type")
