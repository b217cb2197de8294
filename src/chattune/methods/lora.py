"""LoRA through peft. `lora.target=all` = every linear layer except the output head, found by type, so it works
for architectures peft has no defaults for (e.g. ChatGLM's fused `query_key_value`).

`model.load_in_8bit=true` puts the adapters on an 8-bit base (bitsandbytes, CUDA only; helpers in common.py)."""

from __future__ import annotations

from typing import Literal, Union

from pydantic import Field

from chattune.errors import MethodError
from chattune.methods.base import Method, Section
from chattune.methods.common import prepare_quantized, quantization_kwargs, require_bitsandbytes


class LoraConfig(Section):
    r: int = Field(8, ge=1, description="adapter rank")
    alpha: float = Field(16, gt=0, description="scaling: the update is multiplied by alpha / r")
    dropout: float = Field(0.05, ge=0, lt=1)
    target: Union[str, list[str]] = Field("all", description="`all` linear layers but the head, or names")
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
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, module in model.named_modules() if _is_linear(module) and module is not head]


def resolve_targets(model, target) -> list[str]:
    names = linear_module_names(model)
    if target == "all":
        if not names:
            raise MethodError("lora.target=all found no linear layers in this model")
        return names
    wanted = [t.strip() for t in (target.split(",") if isinstance(target, str) else target) if t.strip()]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    missing = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise MethodError(f"lora.target: no linear layer named {', '.join(missing)} in this model; "
                          f"its linear layers are: {', '.join(leaves)} (or use lora.target=all)")
    return wanted


def lora_config(model, cfg):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=resolve_targets(model, cfg.lora.target), task_type="CAUSAL_LM")


class LoRA(Method):
    name = "lora"
    section = "lora"
    config_class = LoraConfig
    about = "low-rank adapters on the linear layers (peft)"

    def preflight(self, cfg, device: str) -> None:
        if cfg.model.load_in_8bit:
            require_bitsandbytes("model.load_in_8bit=true", device)
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

    def extra_activations(self, model, cfg) -> int:
        """Each adapted layer's own dropout keeps its mask and its dropped-out input (in_features elements each,
        per token) for backward; with dropout 0 peft uses Identity and the adapter shares the layer's saved input.
        With lora.fuse on, adapters that read one input share one mask (train/shared_lora.py). Counted on one
        decoder layer of the peft model (they are alike)."""
        import torch

        from chattune.methods.freeze import decoder_layers
        from chattune.train import shared_lora

        if cfg.lora.dropout <= 0:
            return 0
        _, layers = decoder_layers(model)
        engine = bool(cfg.train.deepspeed or cfg.train.fsdp)
        if shared_lora.should_fuse(cfg.lora.fuse, cfg.lora.dropout, engine, cfg.train.compile is True)[0]:
            return sum(2 * width for width in shared_lora.masks_kept(layers[0]))
        return sum(2 * module.in_features for module in layers[0].modules()
                   if hasattr(module, "lora_dropout") and hasattr(module, "in_features")
                   and any(isinstance(d, torch.nn.Dropout) for d in module.lora_dropout.values()))


METHOD = LoRA()
