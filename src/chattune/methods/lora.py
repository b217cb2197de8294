"""LoRA through peft. `lora.target=all` = every linear layer except the output head, found by type, so it works
for architectures peft has no defaults for (e.g. ChatGLM's fused `query_key_value`). The head is never adapted:
it is recognised by what it is (common.output_head), also where a remote-code model does not name it.

`model.load_in_8bit=true` puts the adapters on an 8-bit base (bitsandbytes, CUDA only; helpers in common.py).

peft's LoRA variants are passed through (docs/methods.md, "LoRA variants"): `lora.use_dora`, `lora.use_rslora`,
`lora.init` (peft's `init_lora_weights`) and `lora.modules_to_save`. PiSSA and OLoRA (`lora.init=pissa|pissa_niter_N|
olora`) move the adapter's starting product out of the base weights, so during training the base is a residual that
no other process has; the final output is therefore converted with peft's own conversion into a plain LoRA adapter
relative to the unchanged base (`finish_output`), and checkpoints keep peft's training form for `resume=`."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Literal, Union

from pydantic import Field, field_validator, model_validator

from chattune.errors import MethodError, ModelError
from chattune.methods.base import Method, Section
from chattune.methods.common import input_embedding, output_head, prepare_quantized, quantization_kwargs, \
    require_bitsandbytes

# lora.init: peft's `init_lora_weights` values chattune passes through (`default` = peft's True: B = 0, so the
# untrained adapter changes nothing), and why the others are refused.
INITS = ("default", "gaussian", "orthogonal", "pissa", "pissa_niter_N", "olora")
INIT_REFUSED = {
    "loftq": "peft's LoftQ quantizes every weight with bitsandbytes on a CUDA GPU while it initialises and is meant "
             "for a base you quantize afterwards; chattune does not run it",
    "eva": "EVA initialises from the layer inputs of a pass over the training data (peft's "
           "initialize_lora_eva_weights), which chattune does not run",
    "corda": "CorDA initialises from a calibration pass over data (peft's preprocess_corda), which chattune does not "
             "run",
    "lora_ga": "LoRA-GA initialises from gradients of a pass over data, which chattune does not run",
}
_PLAIN_INITS = ("default", "gaussian", "orthogonal")  # the base weights stay as they are
# Inits that change the base weights (the base becomes W - scaling * B0 @ A0): peft's PiSSA and OLoRA.
_MUTATING = re.compile(r"^(pissa(_niter_\d+)?|olora)$")


class LoraConfig(Section):
    r: int = Field(8, ge=1, description="adapter rank")
    alpha: float = Field(16, gt=0, description="scaling: the update is multiplied by alpha / r")
    dropout: float = Field(0.05, ge=0, lt=1)
    target: Union[str, list[str]] = Field("all", description="`all` linear layers but the head, or names")
    layers: Union[Literal["all"], int, list[int]] = Field(
        "all", description="decoder layers that get adapters: all, N (the last N) or a list of indices (0 = the "
        "first); no gradient flows below the lowest one, so fewer layers train faster")

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, v):
        ok = v == "all" or (isinstance(v, int) and not isinstance(v, bool)) or (
            isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v))
        if not ok:
            raise ValueError("give all, N (the last N decoder layers) or a list of layer indices, e.g. [0, 1, 2]")
        return v

    fuse: Union[bool, Literal["auto"]] = Field(
        "auto", description="adapters that read the same input (q/k/v, gate/up) share one down-projection and "
        "dropout mask: auto/true (where the run allows it), false (peft's own calls, one mask per adapter)")
    use_dora: bool = Field(False, description="DoRA: a trained magnitude per output feature on top of the "
                           "low-rank direction update (peft use_dora)")
    use_rslora: bool = Field(False, description="rank-stabilised scaling: alpha / sqrt(r) instead of alpha / r")
    init: str = Field("default", description="adapter initialisation (peft init_lora_weights): default, gaussian, "
                      "orthogonal, pissa, pissa_niter_N, olora")
    modules_to_save: list[str] = Field(default_factory=list, description="modules trained in full next to the "
                                       "adapters and saved with them, e.g. [lm_head, embed_tokens]")

    @field_validator("init", mode="before")
    @classmethod
    def _init(cls, v):
        if v is True:
            return "default"
        if not isinstance(v, str):
            raise ValueError(f"choose one of {', '.join(INITS)}")
        if v in INIT_REFUSED:
            raise ValueError(f"lora.init={v}: {INIT_REFUSED[v]}; choose one of {', '.join(INITS)}")
        if v not in _PLAIN_INITS and not _MUTATING.match(v):
            raise ValueError(f"lora.init={v}: choose one of {', '.join(INITS)} (N: subspace iterations of the fast "
                             "SVD, e.g. pissa_niter_16)")
        return v

    @field_validator("modules_to_save", mode="before")
    @classmethod
    def _module_list(cls, v):
        if isinstance(v, str):  # lora.modules_to_save=lm_head,embed_tokens
            return [n.strip() for n in v.split(",") if n.strip()]
        return v

    @model_validator(mode="after")
    def _orthogonal_rank(self):
        if self.init == "orthogonal" and self.r % 2:
            raise ValueError(f"lora.init=orthogonal splits one orthogonal basis between A and B and needs an even "
                             f"lora.r (got {self.r})")
        return self

    @property
    def mutates_base(self) -> bool:
        """PiSSA / OLoRA: peft moves the adapter's starting product out of the base weights."""
        return bool(_MUTATING.match(self.init))


def _is_linear(module) -> bool:
    import torch

    if isinstance(module, torch.nn.Linear):
        return True
    # transformers' GPT-2 style Conv1D and bitsandbytes' quantized linears are linear layers too.
    return module.__class__.__name__ in ("Conv1D", "Linear4bit", "Linear8bitLt")


def linear_module_names(model) -> list[str]:
    """Every linear layer's full name but the output head's."""
    head = output_head(model)
    return [name for name, module in model.named_modules() if _is_linear(module) and module is not head]


def _in_layers(model, names: list[str], layers) -> list[str]:
    """The names inside the decoder layers `lora.layers` selects (freeze.py's rule: N = the last N, or indices)."""
    from chattune.methods.freeze import decoder_layers, layer_indices

    prefix, blocks = decoder_layers(model)
    chosen = tuple(f"{prefix}.{i}." for i in layer_indices(layers, len(blocks), key="lora.layers"))
    return [n for n in names if n.startswith(chosen)]


def resolve_targets(model, target, layers="all") -> list[str]:
    """The `target_modules` for peft: leaf names (peft matches them in every layer), or with `lora.layers` the full
    names of the matching linear layers inside the chosen decoder layers."""
    names = linear_module_names(model)
    if target == "all":
        if not names:
            raise MethodError("lora.target=all found no linear layers in this model")
        matching = names
    else:
        wanted = [t.strip() for t in (target.split(",") if isinstance(target, str) else target) if t.strip()]
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        missing = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            raise MethodError(f"lora.target: no linear layer named {', '.join(missing)} in this model; "
                              f"its linear layers are: {', '.join(leaves)} (or use lora.target=all)")
        if layers == "all":
            return wanted
        matching = [n for n in names if any(n == t or n.endswith("." + t) for t in wanted)]
    if layers == "all":
        return matching
    _refuse_no_layer(layers)
    chosen = _in_layers(model, matching, layers)
    if not chosen:
        raise MethodError(f"lora.layers={layers}: none of the lora.target layers is inside those decoder layers; "
                          "use lora.layers=all or other indices")
    return chosen


def lora_config(model, cfg):
    from peft import LoraConfig as PeftLoraConfig

    lora = cfg.lora
    targets = resolve_targets(model, lora.target, lora.layers)
    saved = saved_modules(model, lora.modules_to_save, targets)
    # A model without weights (`chattune estimate`, on the meta device) gets the same parameters from the default
    # init: PiSSA/OLoRA would decompose weights that are not there.
    init = True if lora.init == "default" or _on_meta(model) else lora.init
    return PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                          use_dora=lora.use_dora, use_rslora=lora.use_rslora, init_lora_weights=init,
                          modules_to_save=list(lora.modules_to_save) or None,  # (peft appends to it)
                          ensure_weight_tying=_ties_a_saved_module(model, saved), task_type="CAUSAL_LM")


def _on_meta(model) -> bool:
    return any(p.is_meta for p in model.parameters())


def _matches(name: str, wanted: str) -> bool:
    """peft's rule for target and modules_to_save names: the full name, or its last dotted parts."""
    return name == wanted or name.endswith("." + wanted)


def saved_modules(model, names: list[str], targets: list[str]) -> list[str]:
    """The full names of the modules `lora.modules_to_save` picks; every name must pick one, and none may hold a
    LoRA target (a module is either adapted or trained in full)."""
    modules = [n for n, _ in model.named_modules() if n]
    missing = [w for w in names if not any(_matches(n, w) for n in modules)]
    if missing:
        embedding, head = input_embedding(model), output_head(model)
        known = [n for n, m in model.named_modules() if n and m in (embedding, head)]
        raise MethodError(f"lora.modules_to_save: no module named {', '.join(missing)} in this model; its input "
                          f"embedding and output head are {', '.join(known) or 'not found'}")
    saved = [n for n in modules if any(_matches(n, w) for w in names)]
    adapted = [n for n in linear_module_names(model) if any(_matches(n, t) for t in targets)]
    clash = sorted({a for a in adapted for s in saved if a == s or a.startswith(s + ".")})
    if clash:
        raise MethodError(f"lora.modules_to_save: {', '.join(clash[:3])} also get LoRA adapters (lora.target); a "
                          "module is either adapted or trained in full: take it out of one of the two")
    return saved


def _ties_a_saved_module(model, saved: list[str]) -> bool:
    """Does `lora.modules_to_save` name the output head or the input embedding of a model that ties the two? Then
    peft's `ensure_weight_tying` trains one shared copy, so the model keeps its tie (and its export stays tied)."""
    embedding, head = input_embedding(model), output_head(model)
    if embedding is None or head is None or getattr(head, "weight", None) is not getattr(embedding, "weight", 0):
        return False
    modules = dict(model.named_modules())
    return any(modules[n] is embedding or modules[n] is head for n in saved)


def _refuse_no_layer(layers) -> None:
    """`lora.layers` of 0, a negative N or [] selects no decoder layer (before loading and on the loaded model)."""
    if isinstance(layers, int) and layers < 1 or layers == []:
        raise MethodError(f"lora.layers={layers}: give N >= 1 (the last N decoder layers), a list of indices, "
                          "or lora.layers=all")


def check_layers(cfg) -> None:
    """`lora.layers` checked before the model loads, where the folder's config.json gives the layer count
    (resolve_targets checks again on the loaded model)."""
    from chattune.methods.freeze import _configured_layers, layer_indices

    layers = cfg.lora.layers
    if layers == "all":
        return
    _refuse_no_layer(layers)
    n_layers = _configured_layers(cfg.model.path)
    if n_layers is not None:
        layer_indices(layers, n_layers, key="lora.layers")


def check_variants(cfg, quantized: str | None) -> None:
    """Combinations of the LoRA variants with the run that cannot work, before anything is loaded. `quantized`: how
    the base is quantized (`method=qlora`, `model.load_in_8bit=true`), or None."""
    lora, t = cfg.lora, cfg.train
    if not lora.mutates_base:
        return
    if quantized:
        raise MethodError(f"lora.init={lora.init} with {quantized}: PiSSA/OLoRA decompose the full-precision base "
                          "weights (peft refuses quantized ones); use method=lora on a full-precision base, or "
                          "another lora.init")
    if t.deepspeed or t.fsdp:
        raise MethodError(f"lora.init={lora.init} with {'train.deepspeed' if t.deepspeed else 'train.fsdp'}: the "
                          "final adapter is converted from the whole initial and trained matrices in one process, "
                          "which sharded weights are not; drop one of the two")


def keep_initial(model, cfg) -> None:
    """PiSSA / OLoRA: save the adapter as peft initialised it (before any training step), for the conversion at the
    end (`save_portable`). In a temporary folder that lives as long as the model."""
    import tempfile

    if not cfg.lora.mutates_base or _on_meta(model):
        return
    holder = tempfile.TemporaryDirectory(prefix="chattune-lora-init-")
    model.save_pretrained(str(Path(holder.name) / "initial"))
    model._chattune_initial = holder


def save_portable(model, folder: Path) -> bool:
    """Rewrite the adapter saved in `folder` from a PiSSA/OLoRA-initialised model as a plain LoRA adapter on the
    unchanged base, with peft's conversion (`path_initial_model_for_weight_conversion`: A' = [A; A0], B' = [B, -B0],
    rank 2r, scaling kept). False where the model needs none."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    holder = getattr(model, "_chattune_initial", None)
    if holder is None:
        return False
    kept = get_peft_model_state_dict(model)
    with warnings.catch_warnings():
        # The conversion loads the initial adapter next to the trained one; on a tied model whose tied copies are
        # already wrapped, peft then says it found no tied modules: true of that second load, and harmless.
        warnings.filterwarnings("ignore", message="You have requested `ensure_weight_tying`")
        model.save_pretrained(str(folder), path_initial_model_for_weight_conversion=str(Path(holder.name) / "initial"))
    # peft's conversion (LoraModel.subtract_mutated_init) returns the lora_A/lora_B matrices only, so the converted
    # file would lose the modules_to_save copies and DoRA's magnitudes; both are unchanged by the conversion (DoRA
    # normalises W + scaling * B'A' = the residual + scaling * BA, the same weight as in training): put them back.
    path = folder / "adapter_model.safetensors"
    converted = load_file(str(path))
    rest = {k: v.detach().cpu().clone() for k, v in kept.items() if k not in converted}  # (a tied copy: twice)
    if rest:
        save_file({**converted, **rest}, str(path), metadata={"format": "pt"})
    return True


def refuse_unloadable(folder: Path, adapter_cfg: dict) -> None:
    """A checkpoint of a `lora.init=pissa_niter_N` run is relative to the residual base that run's randomized SVD
    left; peft would redo that SVD when loading it, with other random numbers, and give another model. (Full-SVD
    PiSSA and OLoRA are deterministic: peft's redo rebuilds the same residual, tested.)"""
    init = adapter_cfg.get("init_lora_weights")
    if isinstance(init, str) and init.startswith("pissa_niter"):
        raise ModelError(f"{folder}: a checkpoint of a lora.init={init} run holds the adapter relative to the "
                         "residual base that run's randomized SVD left, which loading cannot rebuild; use the run's "
                         "output_dir (saved as a plain LoRA adapter) or continue the run with resume=")


class LoRA(Method):
    name = "lora"
    section = "lora"
    config_class = LoraConfig
    about = "low-rank adapters on the linear layers (peft)"

    def preflight(self, cfg, device: str) -> None:
        check_variants(cfg, "model.load_in_8bit=true" if cfg.model.load_in_8bit else None)
        if cfg.model.load_in_8bit:
            require_bitsandbytes("model.load_in_8bit=true", device)
        check_layers(cfg)
        super().preflight(cfg, device)

    def load_kwargs(self, cfg, dtype) -> dict:
        return quantization_kwargs(8, dtype) if cfg.model.load_in_8bit else {}

    def apply(self, model, cfg, tokenizer=None):
        from peft import get_peft_model

        if cfg.model.load_in_8bit:
            model = prepare_quantized(model, cfg.train.gradient_checkpointing)
        model = get_peft_model(model, lora_config(model, cfg))
        keep_initial(model, cfg)
        return model

    def finish_output(self, model, folder: Path) -> None:
        save_portable(model, Path(folder))

    def base_weight_bits(self, cfg) -> int | None:
        return 8 if cfg.model.load_in_8bit else None

    def speed_up(self, model, cfg, *, distributed_engine: bool, compiled: bool) -> str | None:
        from chattune.train import shared_lora

        fuse, why = shared_lora.should_fuse(cfg.lora.fuse, cfg.lora.dropout, distributed_engine, compiled,
                                            cfg.lora.use_dora)
        if not fuse:
            return f"lora.fuse: off ({why})"
        return f"lora.fuse: {shared_lora.install(model)} adapted layers share a down-projection ({why})"

    def extra_activations(self, model, cfg, compiled: bool = False) -> int:
        """Each adapted layer's own dropout keeps its mask and its dropped-out input (in_features elements each,
        per token) for backward; with dropout 0 peft uses Identity and the adapter shares the layer's saved input.
        With lora.fuse on, adapters that read one input share one mask (train/shared_lora.py). Counted on one
        adapted decoder layer of the peft model (they are alike; with lora.layers the first adapted one).
        `compiled`: the run compiles its layers (train.compile), which keeps peft's own calls and masks."""
        import torch

        from chattune.methods.freeze import decoder_layers
        from chattune.train import shared_lora

        if cfg.lora.dropout <= 0:
            return 0
        _, layers = decoder_layers(model)
        layer = next((m for m in layers if any(hasattr(x, "lora_dropout") for x in m.modules())), layers[0])
        engine = bool(cfg.train.deepspeed or cfg.train.fsdp)
        if shared_lora.should_fuse(cfg.lora.fuse, cfg.lora.dropout, engine, compiled, cfg.lora.use_dora)[0]:
            return sum(2 * width for width in shared_lora.masks_kept(layer))
        return sum(2 * module.in_features for module in layer.modules()
                   if hasattr(module, "lora_dropout") and hasattr(module, "in_features")
                   and any(isinstance(d, torch.nn.Dropout) for d in module.lora_dropout.values()))


METHOD = LoRA()
