"""Checks and helpers that several methods share (below every method module, so none imports another's)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from chattune.errors import MethodError


# Leaf names the output head goes by where a model does not say which module it is (ChatGLM: output_layer).
HEAD_NAMES = ("lm_head", "output_layer", "embed_out", "output", "head")


def output_head(model):
    """The module that maps the last hidden states to vocabulary logits (tied or not), or None.

    First `model.get_output_embeddings()`; remote-code models often do not define it (ChatGLM's
    `transformer.output_layer`), so then the head is recognised by what it is: a module other than the input
    embedding whose weight maps hidden size to vocabulary size ([vocab, hidden]; config vocab_size /
    padded_vocab_size, or the input embedding's rows). Of several, the one whose weight is the input embedding's
    (tied), else one named like a head (HEAD_NAMES), else the last one registered; where hidden == vocab the shape
    says nothing, so only a tie or a name counts."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        return head
    embedding = input_embedding(model)
    vocabs, hidden = _vocab_and_hidden(model, embedding)
    if not vocabs or hidden is None:
        return None
    found = [(name, m) for name, m in model.named_modules() if m is not embedding and _maps_to_vocab(m, vocabs, hidden)]
    tied = [m for _, m in found if embedding is not None and m.weight is getattr(embedding, "weight", None)]
    named = [m for name, m in found if name.rsplit(".", 1)[-1] in HEAD_NAMES]
    by_shape = [m for _, m in found] if hidden not in vocabs else []
    for group in (tied, named, by_shape):
        if group:
            return group[-1]
    return None


def input_embedding(model):
    """The model's input embedding, or None where the model does not say (remote code may raise NotImplementedError)."""
    try:
        return model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    except NotImplementedError:
        return None


def _vocab_and_hidden(model, embedding) -> tuple[set[int], int | None]:
    """The vocabulary sizes the config declares (and the input embedding's rows), and the hidden size."""
    config = getattr(model, "config", None)
    configs = [c for c in (config, getattr(config, "text_config", None)) if c is not None]
    vocabs = {v for c in configs for v in (getattr(c, "vocab_size", None), getattr(c, "padded_vocab_size", None))
              if isinstance(v, int)}
    hidden = next((c.hidden_size for c in configs if isinstance(getattr(c, "hidden_size", None), int)), None)
    weight = getattr(embedding, "weight", None)
    if weight is not None and weight.dim() == 2:
        vocabs.add(weight.shape[0])
        hidden = hidden if hidden is not None else weight.shape[1]
    return vocabs, hidden


def _maps_to_vocab(module, vocabs: set[int], hidden: int) -> bool:
    """A module of its own weight [vocab, hidden] (a Linear; GPT-2's Conv1D stores [hidden, vocab])."""
    import torch

    if isinstance(module, torch.nn.Embedding):
        return False
    weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
    if weight is None or weight.dim() != 2:
        return False
    rows, cols = weight.shape
    if module.__class__.__name__ == "Conv1D":
        rows, cols = cols, rows
    return rows in vocabs and cols == hidden


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
