"""LoRA through peft. `lora.target=all` = every linear layer except the output head, found by type, so it works
for architectures peft has no defaults for (e.g. ChatGLM's fused `query_key_value`). The head is never adapted:
it is recognised by what it is (common.output_head), also where a remote-code model does not name it.

`model.load_in_8bit=true` puts the adapters on an 8-bit base (bitsandbytes, CUDA only; helpers in common.py)."""

from __future__ import annotations

from typing import Literal, Union

from pydantic import Field, field_validator

from chattune.errors import MethodError
from chattune.methods.base import Method, Section
from chattune.methods.common import output_head, prepare_quantized, quantization_kwargs, require_bitsandbytes


class LoraConfig(Section):
    r: int = Field(8, ge=1, description="adapter rank")
    alpha: float = Field(16, gt=0, description="scaling: the update is multiplied by alpha / r")
    dropout: float = Field(0.05, ge=0, lt=1)
    target: Union[str, list[str]] = Field("all", description="`all` linear layers but the head, or names")
    layers: Union[Literal["all"], int, list[int]] = Field(
        "all", description="decoder layers that get adapters: all, N (the last N) or a list of indices (0 = the "
        "first); no gradient flows below the lowest one, so fewer layers train faster")

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, v):
        ok = v == "all" or (isinstance(v, int) and not isinstance(v, bool)) or (
            isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v))
        if not ok:
            raise ValueError("give all, N (the last N decoder layers) or a list of layer indices, e.g. [0, 1, 2]")
        return v

    fuse: Union[bool, Literal["auto"]] = Field(
        "auto", description="adapters that read the same input (q/k/v, gate/up) share one down-projection and "
        "dropout mask: auto/true (where the run allows it), false (peft's own calls, one mask per adapter)")


def _is_linear(module) -> bool:
    import torch

    if isinstance(module, torch.nn.Linear):
        return True
    # transformers' GPT-2 style Conv1D and bitsandbytes' quantized linears are linear layers too.
    return module.__class__.__name__ in ("Conv1D", "Linear4bit", "Linear8bitLt")


def linear_module_names(model) -> list[str]:
    """Every linear layer's full name but the output head's."""
    head = output_head(model)
    return [name for name, module in model.named_modules() if _is_linear(module) and module is not head]


def _in_layers(model, names: list[str], layers) -> list[str]:
    """The names inside the decoder layers `lora.layers` selects (freeze.py's rule: N = the last N, or indices)."""
    from chattune.methods.freeze import decoder_layers, layer_indices

    prefix, blocks = decoder_layers(model)
    chosen = tuple(f"{prefix}.{i}." for i in layer_indices(layers, len(blocks), key="lora.layers"))
    return [n for n in names if n.startswith(chosen)]


def resolve_targets(model, target, layers="all") -> list[str]:
    """The `target_modules` for peft: leaf names (peft matches them in every layer), or with `lora.layers` the full
    names of the matching linear layers inside the chosen decoder layers."""
    names = linear_module_names(model)
    if target == "all":
        if not names:
            raise MethodError("lora.target=all found no linear layers in this model")
        matching = names
    else:
        wanted = [t.strip() for t in (target.split(",") if isinstance(target, str) else target) if t.strip()]
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        missing = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            raise MethodError(f"lora.target: no linear layer named {', '.join(missing)} in this model; "
                              f"its linear layers are: {', '.join(leaves)} (or use lora.target=all)")
        if layers == "all":
            return wanted
        matching = [n for n in names if any(n == t or n.endswith("." + t) for t in wanted)]
    if layers == "all":
        return matching
    _refuse_no_layer(layers)
    chosen = _in_layers(model, matching, layers)
    if not chosen:
        raise MethodError(f"lora.layers={layers}: none of the lora.target layers is inside those decoder layers; "
                          "use lora.layers=all or other indices")
    return chosen


def lora_config(model, cfg):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=resolve_targets(model, cfg.lora.target, cfg.lora.layers), task_type="CAUSAL_LM")


def _refuse_no_layer(layers) -> None:
    """`lora.layers` of 0, a negative N or [] selects no decoder layer (before loading and on the loaded model)."""
    if isinstance(layers, int) and layers < 1 or layers == []:
        raise MethodError(f"lora.layers={layers}: give N >= 1 (the last N decoder layers), a list of indices, "
                          "or lora.layers=all")


def check_layers(cfg) -> None:
    """`lora.layers` checked before the model loads, where the folder's config.json gives the layer count
    (resolve_targets checks again on the loaded model)."""
    from chattune.methods.freeze import _configured_layers, layer_indices

    layers = cfg.lora.layers
    if layers == "all":
        return
    _refuse_no_layer(layers)
    n_layers = _configured_layers(cfg.model.path)
    if n_layers is not None:
        layer_indices(layers, n_layers, key="lora.layers")


class LoRA(Method):
    name = "lora"
    section = "lora"
    config_class = LoraConfig
    about = "low-rank adapters on the linear layers (peft)"

    def preflight(self, cfg, device: str) -> None:
        if cfg.model.load_in_8bit:
            require_bitsandbytes("model.load_in_8bit=true", device)
        check_layers(cfg)
        super().preflight(cfg, device)

    def load_kwargs(self, cfg, dtype) -> dict:
        return quantization_kwargs(8, dtype) if cfg.model.load_in_8bit else {}

    def apply(self, model, cfg, tokenizer=None):
        from peft import get_peft_model

        if cfg.model.load_in_8bit:
            model = prepare_quantized(model, cfg.train.gradient_checkpointing)
        return get_peft_model(model, lora_config(model, cfg))

    def base_weight_bits(self, cfg) -> int | None:
        return 8 if cfg.model.load_in_8bit else None

    def speed_up(self, model, cfg, *, distributed_engine: bool, compiled: bool) -> str | None:
        from chattune.train import shared_lora

        fuse, why = shared_lora.should_fuse(cfg.lora.fuse, cfg.lora.dropout, distributed_engine, compiled)
        if not fuse:
            return f"lora.fuse: off ({why})"
        return f"lora.fuse: {shared_lora.install(model)} adapted layers share a down-projection ({why})"

    def extra_activations(self, model, cfg, compiled: bool = False) -> int:
        """Each adapted layer's own dropout keeps its mask and its dropped-out input (in_features elements each,
        per token) for backward; with dropout 0 peft uses Identity and the adapter shares the layer's saved input.
        With lora.fuse on, adapters that read one input share one mask (train/shared_lora.py). Counted on one
        adapted decoder layer of the peft model (they are alike; with lora.layers the first adapted one).
        `compiled`: the run compiles its layers (train.compile), which keeps peft's own calls and masks."""
        import torch

        from chattune.methods.freeze import decoder_layers
        from chattune.train import shared_lora

        if cfg.lora.dropout <= 0:
            return 0
        _, layers = decoder_layers(model)
        layer = next((m for m in layers if any(hasattr(x, "lora_dropout") for x in m.modules())), layers[0])
        engine = bool(cfg.train.deepspeed or cfg.train.fsdp)
        if shared_lora.should_fuse(cfg.lora.fuse, cfg.lora.dropout, engine, compiled)[0]:
            return sum(2 * width for width in shared_lora.masks_kept(layer))
        return sum(2 * module.in_features for module in layer.modules()
                   if hasattr(module, "lora_dropout") and hasattr(module, "in_features")
                   and any(isinstance(d, torch.nn.Dropout) for d in module.lora_dropout.values()))


METHOD = LoRA()
