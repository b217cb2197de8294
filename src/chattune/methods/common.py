"""Checks and helpers that several methods share (below every method module, so none imports another's)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from chattune.errors import MethodError


def check_fsdp(cfg, device: str) -> None:
    """`train.fsdp=true`: accelerate runs FSDP on GPUs only (on CPU it would silently fall back to plain DDP)."""
    if not cfg.train.fsdp:
        return
    path = resolve_shipped_json(cfg.train.fsdp_config, "train.fsdp_config")
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise MethodError(f"train.fsdp_config={cfg.train.fsdp_config}: not valid JSON: {e}") from None
    if cfg.train.deepspeed:
        raise MethodError("train.fsdp and train.deepspeed both shard the model: choose one")
    if device != "cuda":
        raise MethodError("train.fsdp=true needs CUDA GPUs (accelerate runs FSDP on GPUs only); on CPU use "
                          "`chattune train --nproc N` for data-parallel training, or drop train.fsdp")


def check_deepspeed(cfg, device: str) -> None:
    """`train.deepspeed=FILE`: the file (a path or a shipped config's name) must exist and be JSON, and DeepSpeed
    must be installed. DeepSpeed runs on CUDA GPUs and, through its CPU accelerator (gloo without Intel's oneCCL),
    on CPU; there it JIT-compiles its CPU ops on first use, which needs ninja and a C++ compiler. A single process
    with no launcher gets the one-process rendezvous environment DeepSpeed needs (see `single_process_env`)."""
    path = cfg.train.deepspeed
    if not path:
        return
    p = resolve_deepspeed_config(path)
    try:
        ds = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:
        raise MethodError(f"train.deepspeed={path}: not valid JSON: {e}") from None
    if importlib.util.find_spec("deepspeed") is None:
        raise MethodError("train.deepspeed is set but DeepSpeed is not installed: pip install 'chattune[deepspeed]' "
                          "(or drop train.deepspeed to train without it)")
    if device not in ("cuda", "cpu"):
        raise MethodError(f"train.deepspeed runs on CUDA GPUs or on CPU, not on {device}; drop train.deepspeed")
    if device == "cpu":
        missing = missing_cpu_op_tools()
        if missing:
            zero = ds.get("zero_optimization") or {}
            offload = any((zero.get(k) or {}).get("device") in ("cpu", "nvme")
                          for k in ("offload_optimizer", "offload_param"))
            ops = "its shared-memory allreduce op" + (" and the CPU Adam op (offload)" if offload else "")
            raise MethodError(f"train.deepspeed on CPU: DeepSpeed compiles {ops} on first use and needs "
                              f"{' and '.join(missing)}, which this machine lacks: pip install ninja / install g++ "
                              "(or drop train.deepspeed: `chattune train --nproc N` trains data-parallel on CPU)")
    single_process_env()


def missing_cpu_op_tools() -> list[str]:
    """What DeepSpeed's JIT build of its CPU ops (torch.utils.cpp_extension) needs and this machine lacks."""
    import shutil

    from torch.utils.cpp_extension import is_ninja_available

    missing = [] if is_ninja_available() else ["ninja"]
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        missing.append("a C++ compiler (c++ / $CXX)")
    return missing


def single_process_env() -> None:
    """DeepSpeed always initializes a process group; started without a launcher (no WORLD_SIZE) it would look for
    MPI (mpi4py) instead. Give a plain `chattune train` the one-process rendezvous DeepSpeed's docs set for a
    notebook: rank 0 of 1 on a free local port. Launchers' (torchrun, deepspeed) variables are left as they are."""
    if "WORLD_SIZE" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(port))):
        os.environ.setdefault(key, value)


def resolve_shipped_json(path: str, key: str) -> Path:
    """A JSON config file: a path, or the name of a shipped one (`ds_zero2.json`, `fsdp.json`)."""
    from chattune.shipped import shipped_config

    p = Path(path)
    if p.is_file():
        return p
    shipped = shipped_config(p.name, ("", ".json"))
    if shipped is not None and p.parent == Path("."):
        return shipped
    hint = f" (a shipped one is at {shipped})" if shipped else ""
    raise MethodError(f"{key}={path}: file not found{hint}")


def resolve_deepspeed_config(path: str) -> Path:
    return resolve_shipped_json(path, "train.deepspeed")


def refuse_8bit_base(cfg, what: str = "cannot train full weights (8-bit weights take no gradient); use it with "
                                      "method=lora, or use method=qlora") -> None:
    if cfg.model.load_in_8bit:
        raise MethodError(f"model.load_in_8bit=true {what}")


def require_bitsandbytes(what: str, device: str) -> None:
    """Raise MethodError unless bitsandbytes is installed and a CUDA GPU is present."""
    if device != "cuda":
        raise MethodError(f"{what} needs a CUDA GPU (bitsandbytes' quantized kernels) and this machine has none. "
                          "Use method=lora instead: the same adapters on a full-precision base")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MethodError(f"{what} needs bitsandbytes, which is not installed: pip install 'chattune[qlora]' "
                          "(or use method=lora: the same adapters on a full-precision base)")


def quantization_kwargs(bits: int, dtype, quant_type: str = "nf4", double_quant: bool = True) -> dict:
    """`from_pretrained` arguments that quantize the base while loading, on this process's GPU."""
    import torch
    from transformers import BitsAndBytesConfig

    if bits == 8:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    else:
        compute = dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                   bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute,
                                   bnb_4bit_quant_storage=torch.uint8)
    # Quantized weights cannot be moved after loading: place the whole model on this process's GPU now.
    return {"quantization_config": quant, "device_map": {"": int(os.environ.get("LOCAL_RANK", "0"))}}


def prepare_quantized(model, gradient_checkpointing: bool):
    """peft's k-bit preparation: norms/head in fp32, input gradients on (needed with gradient checkpointing)."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})
