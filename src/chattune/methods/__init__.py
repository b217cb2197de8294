"""Fine-tuning methods behind one `method=` switch.

Each method is a module with the same shape:
- `preflight(cfg, device)`: raise MethodError for an impossible combination before anything is loaded;
- `load_kwargs(cfg, dtype)`: extra `from_pretrained` arguments (quantization);
- `apply(model, cfg) -> model`: wrap/freeze the base model so only the method's parameters train;
- `SUPPORTS_PACKING`: whether padding-free packing is exact for it.
"""

from __future__ import annotations

import importlib

from chattune.errors import MethodError

METHOD_MODULES = {"lora": "lora", "qlora": "qlora", "prefix": "prefix", "freeze": "freeze", "full": "full"}


def get_method(name: str):
    if name not in METHOD_MODULES:
        raise MethodError(f"unknown method `{name}`; choose one of: {', '.join(METHOD_MODULES)}")
    try:
        return importlib.import_module(f"chattune.methods.{METHOD_MODULES[name]}")
    except ModuleNotFoundError as e:
        if e.name == f"chattune.methods.{METHOD_MODULES[name]}":
            raise MethodError(f"method `{name}` is not available in this version of chattune") from None
        raise


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters, each shared tensor counted once. 4-bit weights count their real size."""
    trainable = total = 0
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit values are packed per stored byte
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
