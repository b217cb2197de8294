"""QLoRA: LoRA adapters on a base model quantized by bitsandbytes when it is loaded.

- `method=qlora`: 4-bit base (`qlora.bits=4`, `qlora.quant_type=nf4|fp4`, `qlora.double_quant`), or 8-bit with
  `qlora.bits=8`; the LoRA settings are the `lora.*` keys.
- `method=lora model.load_in_8bit=true`: 8-bit base + LoRA (lora.py calls the helpers below).

A 6-9B model then fits one 16-24 GB GPU. The quantized kernels need a CUDA GPU, so on a machine without one
`preflight` stops before anything is loaded and suggests `method=lora`. The adapter that comes out is an
ordinary LoRA adapter: `chattune export` merges it into the unquantized base (the standard way: merging into
4-bit weights would lose precision), and `chat` loads it on the unquantized base too.
"""

from __future__ import annotations

import importlib.util
import os

from chattune.errors import MethodError

SUPPORTS_PACKING = True


def require_bitsandbytes(what: str, device: str) -> None:
    """Raise MethodError unless bitsandbytes is installed and a CUDA GPU is present."""
    if device != "cuda":
        raise MethodError(f"{what} needs a CUDA GPU (bitsandbytes' quantized kernels) and this machine has none. "
                          "Use method=lora instead: the same adapters on a full-precision base")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MethodError(f"{what} needs bitsandbytes, which is not installed: pip install 'chattune[qlora]' "
                          "(or use method=lora: the same adapters on a full-precision base)")


def _bits(cfg) -> int:
    return 8 if cfg.model.load_in_8bit else cfg.qlora.bits


def describe(cfg) -> str:
    return "model.load_in_8bit=true" if cfg.method == "lora" else f"method=qlora ({_bits(cfg)}-bit)"


def preflight(cfg, device: str) -> None:
    from chattune.methods.full import check_deepspeed

    require_bitsandbytes(describe(cfg), device)
    check_deepspeed(cfg, device)


def quantization_kwargs(cfg, dtype) -> dict:
    """`from_pretrained` arguments that quantize the base while loading, on this process's GPU."""
    import torch
    from transformers import BitsAndBytesConfig

    if _bits(cfg) == 8:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    else:
        compute = dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.qlora.quant_type,
                                   bnb_4bit_use_double_quant=cfg.qlora.double_quant, bnb_4bit_compute_dtype=compute,
                                   bnb_4bit_quant_storage=torch.uint8)
    # Quantized weights cannot be moved after loading: place the whole model on this process's GPU now.
    return {"quantization_config": quant, "device_map": {"": int(os.environ.get("LOCAL_RANK", "0"))}}


def load_kwargs(cfg, dtype) -> dict:
    return quantization_kwargs(cfg, dtype)


def prepare(model, cfg):
    """peft's k-bit preparation: norms/head in fp32, input gradients on (needed with gradient checkpointing)."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})


def apply(model, cfg):
    from peft import get_peft_model

    from chattune.methods.lora import lora_config

    model = prepare(model, cfg)
    return get_peft_model(model, lora_config(model, cfg))
