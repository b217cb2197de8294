"""LoRA through peft. `lora.target=all` = every linear layer except the output head, found by type, so it works
for architectures peft has no defaults for (e.g. ChatGLM's fused `query_key_value`).

`model.load_in_8bit=true` puts the adapters on an 8-bit base (bitsandbytes, CUDA only); the quantization helpers
live in qlora.py, which in turn reuses the target resolution here."""

from __future__ import annotations

import torch

from chattune.errors import MethodError

SUPPORTS_PACKING = True


def preflight(cfg, device: str) -> None:
    from chattune.methods.full import check_deepspeed

    if cfg.model.load_in_8bit:
        from chattune.methods.qlora import require_bitsandbytes

        require_bitsandbytes("model.load_in_8bit=true", device)
    check_deepspeed(cfg, device)


def load_kwargs(cfg, dtype) -> dict:
    if cfg.model.load_in_8bit:
        from chattune.methods.qlora import quantization_kwargs

        return quantization_kwargs(cfg, dtype)
    return {}


def _is_linear(module) -> bool:
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
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=resolve_targets(model, cfg.lora.target), task_type="CAUSAL_LM")


def apply(model, cfg):
    from peft import get_peft_model

    if cfg.model.load_in_8bit:
        from chattune.methods.qlora import prepare

        model = prepare(model, cfg)
    return get_peft_model(model, lora_config(model, cfg))
