"""What a GPU run uses that the field uses, chosen once with the reason, refused clearly where a piece is missing:

- `train.optim`: TrainingArguments' optimizer names passed through (transformers builds the optimizer). `auto`:
  `adamw_torch_fused` (torch's AdamW as one fused kernel per step instead of a loop over the parameters; on the CPU
  too, transformers' own default). bitsandbytes' optimizers (`adamw_8bit`, `paged_adamw_8bit`, ...) need bitsandbytes and a CUDA GPU.
- `train.liger=true`: transformers' `use_liger_kernel` (liger-kernel's Triton RMSNorm, RoPE and SwiGLU); needs the
  liger-kernel package and a CUDA GPU (Triton). chattune's loss stays its own chunked, label-only one.
- attention for packed rows: on CUDA in bf16/fp16 with flash-attn 2 installed and a model class that supports it,
  `flash_attention_2`, whose variable-length kernels transformers uses for `position_ids` packing; otherwise
  transformers' default (SDPA), with chattune's per-sample SDPA for packed rows (train/packed_attention.py).
"""

from __future__ import annotations

from chattune.errors import ConfigError

BNB_PREFIXES = ("paged_",)
BNB_NAMES = ("adamw_bnb_8bit", "adamw_8bit", "ademamix_8bit", "lion_8bit", "lion_32bit", "rmsprop_bnb",
             "rmsprop_bnb_8bit", "rmsprop_bnb_32bit", "galore_adamw_8bit", "galore_adamw_8bit_layerwise")


def _optimizer_names() -> list[str]:
    from transformers.training_args import OptimizerNames

    return [o.value for o in OptimizerNames]


def needs_bitsandbytes(name: str) -> bool:
    return name in BNB_NAMES or name.startswith(BNB_PREFIXES)


def choose_optimizer(requested: str, device: str, deepspeed_has_optimizer: bool = False) -> tuple[str, str]:
    """(TrainingArguments.optim, why) for `train.optim` on `device` (cpu | cuda)."""
    cuda = device.startswith("cuda")
    if requested == "auto":
        if deepspeed_has_optimizer:
            return "adamw_torch", "the DeepSpeed config's own optimizer is used"
        return "adamw_torch_fused", "torch's fused AdamW"
    names = _optimizer_names()
    if requested not in names:
        raise ConfigError(f"train.optim={requested}: not an optimizer transformers knows; e.g. auto, adamw_torch, "
                          f"adamw_torch_fused, adamw_8bit, paged_adamw_8bit, adafactor, sgd (all: "
                          f"{', '.join(names)})")
    if deepspeed_has_optimizer:
        raise ConfigError(f"train.optim={requested} and the DeepSpeed config's own `optimizer` both choose the "
                          "optimizer; remove one (train.optim=auto keeps DeepSpeed's)")
    if needs_bitsandbytes(requested):
        from transformers.utils import is_bitsandbytes_available

        if not cuda:
            raise ConfigError(f"train.optim={requested} is one of bitsandbytes' optimizers, which need a CUDA GPU, "
                              "and this run is on the CPU; use train.optim=auto (AdamW)")
        if not is_bitsandbytes_available():
            raise ConfigError(f"train.optim={requested} needs bitsandbytes, which is not installed: pip install "
                              "'chattune[qlora]' (or bitsandbytes), or use train.optim=auto")
    return requested, "as set by train.optim"


def check_liger(enabled: bool, device: str) -> None:
    """train.liger=true needs liger-kernel and a CUDA GPU (its kernels are Triton)."""
    if not enabled:
        return
    if not device.startswith("cuda"):
        raise ConfigError("train.liger=true: liger-kernel's fused layers are Triton kernels and need a CUDA GPU; "
                          "this run is on the CPU: leave train.liger out")
    from transformers.utils import is_liger_kernel_available

    if not is_liger_kernel_available():
        raise ConfigError("train.liger=true needs the liger-kernel package, which is not installed: pip install "
                          "liger-kernel (or leave train.liger out)")


def _supports_flash_attention(model_path: str, trust_remote_code: bool) -> bool:
    """Does transformers' own class for this model declare flash-attention support? (Remote code: not assumed.)"""
    if trust_remote_code:
        return False
    try:
        import transformers
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        model_type = AutoConfig.from_pretrained(model_path).model_type
        cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, ""), None)
    except (OSError, ValueError, KeyError, AttributeError, ImportError):
        return False
    return bool(cls is not None and getattr(cls, "_supports_flash_attn", False))


def training_attention(requested: str | None, device: str, precision: str, packing: bool, model_path: str,
                       trust_remote_code: bool = False) -> tuple[str | None, str]:
    """(attn_implementation for from_pretrained, why) for training. As given, where given (flash_attention_2 then
    needs flash-attn); otherwise flash_attention_2 where it serves packing on a GPU, else None (transformers'
    choice)."""
    from transformers.utils import is_flash_attn_2_available

    if requested == "flash_attention_2" and not is_flash_attn_2_available():
        raise ConfigError("model.attn_implementation=flash_attention_2 needs the flash-attn package on a CUDA GPU, "
                          "which is not available here (pip install flash-attn --no-build-isolation); use sdpa "
                          "(or leave model.attn_implementation out)")
    if requested:
        return requested, "as set by model.attn_implementation"
    if not packing:
        return None, "transformers' default"
    if not device.startswith("cuda"):
        return None, "SDPA, one call per packed sample (chattune's packed attention)"
    if precision not in ("bf16", "fp16"):
        return None, "SDPA per packed sample: flash-attention 2 runs in bf16/fp16 only"
    if not is_flash_attn_2_available():
        return None, "SDPA per packed sample: flash-attn is not installed (pip install flash-attn for its varlen kernels)"
    if not _supports_flash_attention(model_path, trust_remote_code):
        return None, "SDPA per packed sample: this model's class does not declare flash-attention support"
    return "flash_attention_2", "flash-attention 2's variable-length kernels for packed rows (position_ids)"
