"""Freeze tuning: train only some decoder layers and/or named modules; every other weight keeps requires_grad=False.

- `freeze.trainable_layers`: N (the last N decoder layers) or a list of layer indices (0 = the first layer);
- `freeze.trainable_modules`: fnmatch patterns matched against parameter names and the names of the modules
  that hold them, e.g. `[lm_head, "model.norm"]` or `["*.mlp.*"]`.
Both together train their union; to train only named modules, set `freeze.trainable_layers=0`.

Decoder layers are found by structure (models/layers.py: `decoder_layers`; `model.layers` for Llama/Qwen/GLM-4,
`transformer.encoder.layers` for ChatGLM, `transformer.h` for GPT-2, never a mixture-of-experts layer's experts),
so remote-code models work too. The output is a full model folder: the frozen weights are saved along with the
trained ones.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Union

from pydantic import Field

from chattune.errors import MethodError
from chattune.methods.base import Method, Section
from chattune.methods.common import refuse_8bit_base


class FreezeConfig(Section):
    trainable_layers: Union[int, list[int]] = Field(2, description="N last decoder layers, or a list of indices")
    trainable_modules: list[str] = Field(default_factory=list, description="name patterns (fnmatch) to train")


def _configured_layers(spec: str) -> int | None:
    """Decoder layer count from a local model folder's config.json, without loading the model (None: unknown)."""
    import json
    from pathlib import Path

    if spec in ("bundled", "", None):
        from chattune.models.bundled import bundled_model_dir, is_ready

        folder = bundled_model_dir() if is_ready() else None
    else:
        folder = Path(spec).expanduser()
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return None
    from chattune.models.layers import layer_count

    return layer_count(config) if isinstance(config, dict) else None


def decoder_layers(model):
    """(path, torch.nn.ModuleList) of the model's decoder blocks (models/layers.py: `decoder_layers`); a MethodError
    where the model has none."""
    from chattune.models.layers import decoder_layers as find

    found = find(model)
    if found is None:
        raise MethodError("method=freeze: found no list of decoder layers in this model; "
                          "use freeze.trainable_layers=0 with freeze.trainable_modules=[...] patterns instead")
    return found


def lowest_trained_layer(layers) -> int | None:
    """Index of the lowest decoder layer holding a trainable parameter (None: none does). The backward pass starts
    there: the layers below it run forward only (Freeze of the last N layers, lora.layers)."""
    return next((i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())), None)


def layer_indices(trainable_layers, n_layers: int, key: str = "freeze.trainable_layers") -> list[int]:
    """The layer indices `key` (N last layers, or a list of indices) selects, checked against the model's layer
    count."""
    if isinstance(trainable_layers, int):
        if trainable_layers > n_layers:
            raise MethodError(f"{key}={trainable_layers}: this model has only {n_layers} decoder "
                              f"layers (valid: 0 to {n_layers})")
        return list(range(n_layers - trainable_layers, n_layers))
    bad = [i for i in trainable_layers if not 0 <= i < n_layers]
    if bad:
        raise MethodError(f"{key}: layer index {', '.join(map(str, bad))} out of range; this "
                          f"model has {n_layers} decoder layers, valid indices are 0 to {n_layers - 1}")
    return sorted(set(trainable_layers))


def _matches(param_name: str, patterns: list[str]) -> bool:
    parts = param_name.split(".")
    names = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]  # the module path prefixes and the name itself
    return any(fnmatchcase(n, p) for p in patterns for n in names)


def select(model, cfg) -> list[str]:
    """Names of the parameters that will train (raises MethodError for impossible selections)."""
    f = cfg.freeze
    # every name, tied ones too: `lm_head` must match in a model whose head shares the embedding matrix
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    chosen: set[str] = set()
    if f.trainable_layers not in (0, []):
        prefix, layers = decoder_layers(model)
        for i in layer_indices(f.trainable_layers, len(layers)):
            chosen.update(n for n in names if n.startswith(f"{prefix}.{i}."))
    for pattern in f.trainable_modules:
        hit = [n for n in names if _matches(n, [pattern])]
        if not hit:
            examples = ", ".join(sorted({n.rsplit(".", 1)[0] for n in names})[:8])
            raise MethodError(f"freeze.trainable_modules: pattern {pattern!r} matches no parameter; names look "
                              f"like: {examples}, ...")
        chosen.update(hit)
    if not chosen:
        raise MethodError("method=freeze: nothing to train (freeze.trainable_layers=0 and no "
                          "freeze.trainable_modules); choose layers or modules to train")
    return [n for n in names if n in chosen]


class Freeze(Method):
    name = "freeze"
    section = "freeze"
    config_class = FreezeConfig
    trains_base_weights = True
    saves_full_model = True
    about = "train only chosen decoder layers / modules, the rest frozen"

    def preflight(self, cfg, device: str) -> None:
        refuse_8bit_base(cfg)
        layers = cfg.freeze.trainable_layers
        if isinstance(layers, int) and layers < 0:
            raise MethodError(f"freeze.trainable_layers={layers}: give a number of last layers (>= 0) or a list of "
                              "indices")
        n_layers = _configured_layers(cfg.model.path)
        if n_layers is not None:  # fail before loading; apply() checks again against the loaded model
            layer_indices(layers, n_layers)
        super().preflight(cfg, device)

    def apply(self, model, cfg, tokenizer=None):
        chosen = set(select(model, cfg))
        params = list(model.named_parameters(remove_duplicate=False))
        trainable = {id(p) for n, p in params if n in chosen}
        for _, param in params:
            param.requires_grad_(id(param) in trainable)
        return model


METHOD = Freeze()
