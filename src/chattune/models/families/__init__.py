"""Model code and conversions chattune owns for families transformers lacks or cannot load, and what the rest of
chattune must know about them (one place: the trainer, the methods and the probes ask here).

`register_all()` registers chattune's own model types (ChatGLM-6B's `chattune_chatglm6b`, TransNormerLLM's
`chattune_transnormer`) with transformers' Auto
classes, so `AutoModelForCausalLM.from_pretrained` loads a converted or exported folder of that family. chattune's
loader calls it; other code does `import chattune.models.families; chattune.models.families.register_all()`.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

CHATGLM6B = "chattune_chatglm6b"
TRANSNORMER = "chattune_transnormer"


@dataclass(frozen=True)
class OwnFamily:
    """A family chattune has its own model code for (models/native.py's "chatglm6b" and "transnormer")."""

    model_type: str  # chattune's registered model type
    tokenizer_file: str  # the published tokenizer's data file
    fix: str  # what to use instead when its config.json cannot be reproduced
    family: str

    @property
    def model_code(self):
        return importlib.import_module(f"chattune.models.families.{self.family}")

    @property
    def tokenizer_code(self):
        return importlib.import_module(f"chattune.models.families.{self.family}_tokenizer")

    def has_tokenizer(self, folder) -> bool:
        return getattr(self.tokenizer_code, f"is_{self.family}_tokenizer")(folder)


OWN = {
    "chatglm6b": OwnFamily(CHATGLM6B, "ice_text.model",
                           "use the original THUDM/chatglm-6b checkpoint (fp16 weights, no saved P-tuning prefix)",
                           "chatglm6b"),
    "transnormer": OwnFamily(TRANSNORMER, "tokenizer.model",
                             "use an OpenNLPLab/TransNormerLLM checkpoint (TransNormerLLM 1/2, simplermsnorm)",
                             "transnormer"),
}


def register_all() -> None:
    for own in OWN.values():
        own.model_code.register()


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


def method_refusal(method: str, cfg) -> str | None:
    """Why `method` (with `cfg`'s settings) cannot apply to model=`cfg.model.path`'s family, or None; read from
    its config.json, before the model is loaded (every method's preflight asks)."""
    if method != "prefix":
        return None
    model_type = spec_model_type(cfg.model.path, cfg.model.revision)
    if model_type == TRANSNORMER:
        return ("method=prefix (P-tuning v2) does not apply to TransNormerLLM: it puts trained keys and values in "
                "front of every attention layer, and TransNormerLLM's linear attention keeps no keys and values "
                "(one running state per layer). Use method=lora, freeze or sft")
    if model_type == CHATGLM6B and cfg.prefix.init_text:
        return ("prefix.init_text does not apply to ChatGLM-6B: its forward needs [gMASK] and <sop> in every input, "
                "so a bare text has no key/values to start from. Drop prefix.init_text (the prefix starts random, as "
                "in ChatGLM-6B's own P-tuning v2)")
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
    return OWN[family].model_type if family in OWN else config.get("model_type")
