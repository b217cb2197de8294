"""What chattune knows of any decoder model's layers, found by structure so that remote-code models and chattune's
own families (models/families/) work as transformers' models do:

- `decoder_layers`: the `nn.ModuleList` of the model's repeated decoder blocks, and its path (freeze's and
  `lora.layers`' layer indices, `train.compile`'s per-layer compile, the decode step's layers, estimate's and
  bench's per-layer figures); `layer_count`: the decoder layer count a config states.
- Which projections read one input: `KNOWN_SHARED`, the sibling names that do in common architectures (the decode
  step stacks q/k/v and gate/up into one matmul each; estimate counts `lora.fuse`'s shared dropout masks by
  them), and `shared_input_groups`, the probe that observes it on a loaded model (`lora.fuse`,
  train/shared_lora.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: `layer_count` serves checks made before anything loads
    import torch
    from torch import nn

# config fields that state the decoder layer count: transformers' name, ChatGLM's, GPT-2's
LAYER_COUNT_KEYS = ("num_hidden_layers", "num_layers", "n_layer")

# Sibling projections that read one input in common architectures, each in the order its outputs are laid out:
# Llama/Mistral/Qwen attention and MLP, Mixtral-style w1/w3, BERT-style query/key/value.
KNOWN_SHARED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"), ("query", "key", "value"))
ATTENTION_INPUT, MLP_INPUT = KNOWN_SHARED[0], KNOWN_SHARED[1]  # a Llama-layout layer's two shared inputs


def layer_count(config) -> int | None:
    """The decoder layer count `config` states (a transformers config, or config.json read as a dict; a multimodal
    config's text part), None when it states none."""
    if isinstance(config, dict):
        config = config.get("text_config") or config
        values = [config.get(key) for key in LAYER_COUNT_KEYS]
    else:
        text = getattr(config, "get_text_config", None)
        if callable(text):
            try:
                config = text()
            except (ValueError, TypeError, AttributeError):
                pass
        values = [getattr(config, key, None) for key in LAYER_COUNT_KEYS]
    return next((v for v in values if isinstance(v, int) and not isinstance(v, bool)), None)


def _size(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """(path, list) of the model's decoder layers, or None when it has no such list. Works through peft wrappers
    (the path is then the wrapped one, e.g. `base_model.model.model.layers`).

    The layers are a non-empty `nn.ModuleList` of blocks that hold parameters, not inside another ModuleList (so
    never a mixture-of-experts layer's list of experts, nor any other list within a layer). Of those, the lists
    whose length is the config's layer count (`layer_count`) come first; without one (no count stated, or no list
    of that length) only lists whose blocks are all of one class qualify. Among the qualifying lists the one with
    the most parameters wins (a language model's layers over, say, a vision tower's)."""
    from torch import nn

    lists = [(name, m) for name, m in model.named_modules() if name and isinstance(m, nn.ModuleList) and len(m)]
    names = [name for name, _ in lists]
    outer = [(name, m) for name, m in lists
             if not any(name.startswith(other + ".") for other in names)
             and all(next(block.parameters(), None) is not None for block in m)]
    count = layer_count(getattr(model, "config", None))
    pool = [(name, m) for name, m in outer if len(m) == count] \
        or [(name, m) for name, m in outer if len({type(block) for block in m}) == 1]
    if not pool:
        return None
    return max(pool, key=lambda item: _size(item[1]))


def known_shared(names) -> list[tuple[str, ...]]:
    """The KNOWN_SHARED groups with at least two members among the sibling module names `names`: those members, in
    the group's order."""
    present = set(names)
    return [tuple(n for n in group if n in present) for group in KNOWN_SHARED if len(present.intersection(group)) > 1]


def shared_input_groups(model: nn.Module, modules, probe_ids: torch.Tensor) -> list[list[nn.Module]]:
    """Groups (of at least two) of `modules` that receive the very same input tensor object in one forward pass of
    `model` over `probe_ids` (eval mode, no gradients; the model's mode is restored), in call order. Observed, not
    assumed from names: a module called more than once with one tensor puts that tensor's group out."""
    import torch

    seen: dict[int, list] = {}
    keep = []  # hold the inputs, so that no id is reused during the probe
    hooks = []

    def record(module, args):
        if args:
            keep.append(args[0])
            seen.setdefault(id(args[0]), []).append(module)

    for module in modules:
        hooks.append(module.register_forward_pre_hook(record))
    if not hooks:
        return []
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(input_ids=probe_ids)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    groups = []
    for members in seen.values():
        unique = list(dict.fromkeys(members))
        if len(unique) >= 2 and len(unique) == len(members):
            groups.append(unique)
    return groups
