"""QLoRA: LoRA adapters on a base model quantized by bitsandbytes when it is loaded.

- `method=qlora`: 4-bit base (`qlora.bits=4`, `qlora.quant_type=nf4|fp4`, `qlora.double_quant`), or 8-bit with
  `qlora.bits=8`; the LoRA settings are the `lora.*` keys.
- `method=lora model.load_in_8bit=true` is the other way to an 8-bit base (see lora.py).
- The LoRA variants (`lora.use_dora`, `lora.use_rslora`, `lora.init`, `lora.modules_to_save`) pass through as for
  `method=lora`, except the inits that rewrite the base weights (PiSSA, OLoRA), which need them in full precision.

A 6-9B model then fits one 16-24 GB GPU. The quantized kernels need a CUDA GPU, so on a machine without one
`preflight` stops before anything is loaded and suggests `method=lora`. The adapter that comes out is an
ordinary LoRA adapter: `chattune export` merges it into the unquantized base (the standard way: merging into
4-bit weights would lose precision), while `chat`, `eval` and `serve` load it on a quantized base, as it was
trained (inference.quantized_base: this method's load_kwargs on the run's config.yaml).
"""

from __future__ import annotations

from typing import Literal

from chattune.methods.base import Section
from chattune.methods.common import prepare_quantized, quantization_kwargs, require_bitsandbytes
from chattune.methods.lora import LoRA, check_layers, check_variants, lora_config


class QLoraConfig(Section):
    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True


class QLoRA(LoRA):
    name = "qlora"
    section = "qlora"
    also_reads = ("lora",)  # the adapters are LoRA's
    config_class = QLoraConfig
    about = "LoRA adapters on a 4-bit or 8-bit quantized base (bitsandbytes, CUDA)"

    def preflight(self, cfg, device: str) -> None:
        check_variants(cfg, f"method=qlora ({cfg.qlora.bits}-bit)")  # (the lora.* variants: lora.py)
        require_bitsandbytes(f"method=qlora ({cfg.qlora.bits}-bit)", device)
        check_layers(cfg)
        from chattune.methods.common import check_deepspeed, check_fsdp

        check_deepspeed(cfg, device)
        check_fsdp(cfg, device)

    def load_kwargs(self, cfg, dtype) -> dict:
        q = cfg.qlora
        return quantization_kwargs(q.bits, dtype, q.quant_type, q.double_quant)

    def apply(self, model, cfg, tokenizer=None):
        from peft import get_peft_model

        model = prepare_quantized(model, cfg.train.gradient_checkpointing)
        return get_peft_model(model, lora_config(model, cfg))

    def base_weight_bits(self, cfg) -> int | None:
        return cfg.qlora.bits


METHOD = QLoRA()
