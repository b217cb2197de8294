"""`lora.fuse`: LoRA adapters that read the same input share one down-projection.

In a Llama-style layer q_proj, k_proj and v_proj read the same normed hidden state, and so do gate_proj and
up_proj. peft runs each adapter on its own: one dropout mask and one rank-r product (`x @ A.T`) per adapter, and in
the backward one weight-gradient and one input-gradient product each, plus the additions that sum the input
gradients. peft has no option to share this work, so it is done here: for a group of adapters that receive the very
same tensor, the first one called computes

    h = dropout(x) @ cat(A_q, A_k, A_v).T        (one mask, one product of width 3r)

and every member takes its r columns of `h` (`torch.split`, whose backward is a single concatenation), then adds
`B(h_i) * scaling` to its base layer's output exactly as peft does. The parameters stay peft's own (`A` matrices are
concatenated per call, a copy of 3 * r * in_features numbers), so the saved adapter, resume and export are
unchanged.

Which modules share an input is observed, not assumed from names: a probe forward pass over a few tokens records
the input tensor each adapted layer receives, and layers that received the same tensor object form a group
(`install`; the probe is models/layers.py's `shared_input_groups`, next to the names known to share an input). At
run time a member uses the group's product only when it is called with that same tensor (same object, unmodified);
anything else (another input, adapters switched off or merged, several or non-vanilla adapters, mixed-batch adapter
names, a dtype cast) falls back to peft's own forward for that call, so the maths never depends on the guess. With
`lora.use_dora` it is not installed at all (`should_fuse`): every DoRA layer is a non-vanilla adapter.

Exactness: with `lora.dropout=0` the result is peft's, up to the summation order of the products (tested to 1e-5
on losses and gradients). With dropout > 0 the members of a group share one dropout mask instead of drawing one
each: each adapter still sees its input with a fraction `p` dropped and scaled by 1/(1-p), as in peft, but q, k and v
see the same positions dropped. That is a different draw of the regulariser, not peft's (chattune's CPU dropout,
fast_dropout.py, already draws its own random numbers); `lora.fuse=auto` uses it, because it measured the same
held-out loss and keeps the mask and dropped-out input of 3 of every 7 adapters less (6-15% lower peak memory on the
bundled model; tokens/s on a 2-core CPU did not change measurably: docs/benchmarks.md), and `lora.fuse=false` keeps
peft's own calls with one mask per adapter. Not used with DeepSpeed/FSDP (ZeRO-3 and FSDP
keep the `A` weights partitioned until their own module is called) or with `train.compile` (the per-call identity
checks are Python that the compiled graph would have to guard).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from chattune.models.layers import known_shared
from chattune.models.layers import shared_input_groups as probe_shared_inputs


def _lora_linear_class():
    from peft.tuners.lora.layer import Linear

    return Linear


def _adapter(module) -> str | None:
    """The one active vanilla adapter of a peft LoRA Linear in a state where peft's forward is
    `base(x) + B(A(dropout(x))) * scaling`, else None."""
    if module.disable_adapters or module.merged:
        return None
    active = module.active_adapters
    if len(active) != 1:
        return None
    name = active[0]
    if name not in module.lora_A or name in getattr(module, "lora_variant", {}):
        return None
    return name


class _SharedProduct:
    """The shared down-projection of adapted layers that read one input: holds, between the members' calls, the
    input it was computed for and the pieces of the product `dropout(x) @ cat(A...).T` that members have not taken
    yet."""

    def __init__(self, members: list):
        self.members = members
        self.x = None
        self.version = -1
        self.pieces: dict[int, torch.Tensor] = {}

    def clear(self) -> None:
        self.x, self.version, self.pieces = None, -1, {}

    def compute(self, x: torch.Tensor, dropout) -> bool:
        names = [_adapter(m) for m in self.members]
        if None in names or len(set(names)) != 1:
            return False
        name = names[0]
        weights = [m.lora_A[name].weight for m in self.members]
        if any(w.dtype != x.dtype or w.device != x.device for w in weights):
            return False
        h = F.linear(dropout(x), torch.cat(weights) if len(weights) > 1 else weights[0])
        self.pieces = dict(enumerate(torch.split(h, [w.shape[0] for w in weights], dim=-1)))
        self.x, self.version = x, x._version
        return True

    def take(self, index: int, x: torch.Tensor, dropout) -> torch.Tensor | None:
        """This member's rank-r piece for input x, or None (the caller falls back to peft's forward)."""
        fresh = self.x is not x or self.version != x._version or index not in self.pieces
        if fresh and not self.compute(x, dropout):
            self.clear()
            return None
        piece = self.pieces.pop(index)
        if not self.pieces:
            self.clear()  # every member served: drop the references to x and h
        return piece


def _shared_forward(module, group: _SharedProduct, index: int):
    original = type(module).forward

    def forward(self, x, *args, **kwargs):
        name = _adapter(self)
        if args or kwargs or name is None:
            return original(self, x, *args, **kwargs)
        piece = group.take(index, x, self.lora_dropout[name])
        if piece is None:
            return original(self, x, *args, **kwargs)
        result = self.base_layer(x)
        return (result + self.lora_B[name](piece) * self.scaling[name]).to(result.dtype)

    return types.MethodType(forward, module)


def _same_dropout(members) -> bool:
    ps = set()
    for m in members:
        name = _adapter(m)
        if name is None:
            return False
        d = m.lora_dropout[name]
        ps.add(float(getattr(d, "p", 0.0)) if isinstance(d, torch.nn.Dropout) else 0.0)
    return len(ps) == 1


def shared_input_groups(model, probe_ids: torch.Tensor) -> list[list]:
    """Groups (of at least two) of active vanilla peft LoRA Linear modules that receive the same input tensor in a
    forward pass over `probe_ids` (models/layers.py's probe), in call order, with one dropout rate each."""
    linear = _lora_linear_class()
    adapted = [m for m in model.modules() if type(m) is linear and _adapter(m) is not None]
    return [members for members in probe_shared_inputs(model, adapted, probe_ids) if _same_dropout(members)]


def install(model, probe_ids: torch.Tensor | None = None) -> int:
    """Give each shared-input group one down-projection; returns the number of adapted layers now sharing."""
    if probe_ids is None:
        from chattune.models.families import probe_ids as family_probe

        device = next(model.parameters()).device
        probe_ids = torch.tensor([family_probe(model.config, [1, 2, 3, 4])], device=device)
    groups = shared_input_groups(model, probe_ids)
    for members in groups:
        group = _SharedProduct(members)
        for index, module in enumerate(members):
            module.forward = _shared_forward(module, group, index)
            module._chattune_shared = group
    return sum(len(g) for g in groups)


def uninstall(model) -> None:
    for module in model.modules():
        if getattr(module, "_chattune_shared", None) is not None:
            del module.forward
            del module._chattune_shared


def masks_kept(layer) -> list[int]:
    """The input widths of the dropout masks (each kept with its dropped-out input for backward) one decoder layer
    holds with shared masks, for `chattune estimate`, which has no weights to run the probe with: one per group of
    adapted siblings named in models/layers.py's KNOWN_SHARED, one per other adapted layer."""
    widths = []
    for parent in layer.modules():
        adapted = {name: child for name, child in parent.named_children()
                   if hasattr(child, "lora_dropout") and hasattr(child, "in_features")}
        for members in known_shared(adapted):
            widths.append(adapted[members[0]].in_features)
            for name in members:
                del adapted[name]
        widths.extend(child.in_features for child in adapted.values())
    return widths


def should_fuse(setting, dropout: float, distributed_engine: bool, compiled: bool,
                use_dora: bool = False) -> tuple[bool, str]:
    """(fuse?, why) for lora.fuse = True | False | "auto". The other LoRA variants keep it: rsLoRA only changes
    `scaling`, which a member reads from peft (`self.scaling`); gaussian/orthogonal/PiSSA/OLoRA inits only change the
    starting A, B and base weights, which a member reads where peft does; modules_to_save copies are no LoRA layers."""
    if setting is False:
        return False, "lora.fuse=false"
    if use_dora:
        return False, ("not with lora.use_dora: DoRA rescales each layer's output by its magnitude over the norm of "
                       "W + BA in peft's own forward, which a shared down-projection would skip")
    if distributed_engine:
        return False, "not with DeepSpeed/FSDP (their partitioned weights are gathered per module call)"
    if compiled:
        return False, "not with train.compile (its graph would have to guard the per-call input checks)"
    if dropout > 0:
        return True, (f"{'lora.fuse=true' if setting is True else 'auto'}: one dropout mask per shared input; "
                      "lora.fuse=false for one per adapter, as peft draws them")
    return True, f"{'lora.fuse=true' if setting is True else 'auto'}: lora.dropout=0, the same maths as peft's"
