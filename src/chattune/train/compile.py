"""`train.compile`: torch.compile each decoder layer, the way torchtune does.

Every decoder layer of a model is the same module class with the same structure, so compiling each layer's
forward in place (`nn.Module.compile`) produces one graph that the other layers reuse: Dynamo treats the layers'
parameters as inputs (torch's `inline_inbuilt_nn_modules`, on by default), and compile time stays that of one
layer, not of the whole model. `dynamic=True` marks sequence lengths dynamic from the first call, so batches of
new lengths (dynamic padding, packed rows) do not recompile. The embedding, the head and the loss stay eager:
chattune's label-only logits and chunked loss already avoid the full-vocabulary work there.

Compiling changes no parameter names (`Module.compile` compiles in place; `torch.compile(module)` would wrap it
and rename every key), so checkpoints, resume and the saved adapter are the same as without it.

`auto` compiles only where it is expected to win its compile time back: on a CUDA GPU, for runs of at least
`AUTO_MIN_STEPS` optimizer steps. On CPU `auto` does not compile. Measured on the project's 2-core AVX2 machine
(fp32, `chattune bench recipes=chattune,compiled`, docs/benchmarks.md): the compiled layers trained at the eager
speed (144.6 vs 147.5 real tokens/s; the matrix products, which inductor does not change, are ~65% of a step) and
cost 22 s of compiling in the first step, so the whole process took 206 s instead of 180 s; they did lower the
peak memory (3.6 vs 4.6 GB: fused kernels keep fewer intermediates). `train.compile=true` compiles anywhere (on
CPU it needs a C++ compiler: inductor generates C++).

packed_attention's per-sample attention runs outside the compiled graph (`torch.compiler.disable`): its split
sizes are data, and compiling them would recompile for every new combination of sample lengths.
"""

from __future__ import annotations

import shutil

import torch

from chattune.errors import ConfigError
from chattune.models.layers import decoder_layers as find_decoder_layers

AUTO_MIN_STEPS = 200


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder layers, each compiled on its own (models/layers.py: `decoder_layers`, found by structure, so
    remote-code models work too and a mixture-of-experts layer's experts are never taken for them); [] where there
    is no such list."""
    found = find_decoder_layers(model)
    return list(found[1]) if found is not None else []


def check_compile(setting, device: str, distributed_engine: bool) -> None:
    """Refuse train.compile=true where it cannot work (before anything is loaded)."""
    if setting is not True:
        return
    if distributed_engine:
        raise ConfigError("train.compile=true cannot be combined with train.deepspeed or train.fsdp here "
                          "(they wrap and re-partition the layers after chattune would compile them); set "
                          "train.compile=false")
    if device == "cpu" and not (shutil.which("c++") or shutil.which("g++") or shutil.which("gcc")):
        raise ConfigError("train.compile=true on CPU needs a C++ compiler (torch.compile generates C++); "
                          "install one (apt-get install g++) or set train.compile=false")


def should_compile(setting, device: str, steps: int | None, distributed_engine: bool) -> tuple[bool, str]:
    """(compile?, why) for train.compile = True | False | "auto" (check_compile has refused what cannot work)."""
    check_compile(setting, device, distributed_engine)
    if setting is False:
        return False, "train.compile=false"
    if setting is True:
        return True, "train.compile=true"
    if distributed_engine:
        return False, "auto: not with DeepSpeed/FSDP"
    if device != "cuda":
        return False, "auto: not on CPU, where it did not pay back its compile time"
    if steps is not None and steps < AUTO_MIN_STEPS:
        return False, f"auto: {steps} steps are too few to pay back the compile time (needs {AUTO_MIN_STEPS})"
    return True, "auto: a GPU run long enough to pay back the compile time"


def compile_layers(model) -> int:
    """Compile every decoder layer in place; returns how many."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
