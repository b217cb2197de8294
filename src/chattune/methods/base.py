"""The one shape every fine-tuning method has, and the config-section base class.

A method is a `Method` instance registered in `chattune.methods.REGISTRY`. `RunConfig.method` and the per-method
config sections (`lora.*`, `prefix.*`, ...) are built from the registry, so adding a method is one module (its
config section + its Method) and one registry line; nothing in `train/`, `inference.py` or the commands names a
method.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from chattune.errors import MethodError


class Section(BaseModel):
    """A config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Method:
    """Defaults for a method; subclasses override what differs.

    - `name`: the value of `method=`; `section` / `config_class`: its config section (None: it has none);
    - `supports_packing`: padding-free packing is exact with it;
    - `trains_base_weights`: the base model's weights get gradients (so they need fp32 master weights);
    - `saves_full_model`: its output is a whole model folder (else a peft adapter);
    - `preflight(cfg, device)`: raise MethodError for impossible combinations before anything is loaded;
    - `load_kwargs(cfg, dtype)`: extra `from_pretrained` arguments (quantization);
    - `apply(model, cfg) -> model`: wrap/freeze the base model so that only the method's parameters train;
    - `base_weight_bits(cfg)`: bits per stored base weight when the method quantizes it (None: the load dtype's);
    - `extra_activations(model, cfg)`: elements per token and decoder layer the method's own modules keep for the
      backward pass on top of the base layer's (LoRA's dropout: mask and dropped-out input of each adapted layer);
      `model` is the method-applied model (on the meta device in `chattune estimate`); `compiled=True` when the
      run would compile its layers (train.compile), which can change what the method's modules keep;
    The last two are the memory terms `chattune estimate` reads from the method.
    - `speed_up(model, cfg, distributed_engine=, compiled=)`: the method's own changes to how its modules run in
      training, applied after `apply` and chattune's other CPU changes (LoRA: shared down-projections); returns a
      line for the log, or None.
    - `finish_output(model, folder)`: rewrite the final output the Trainer saved into `folder` where the form that
      training needs differs from the one other tools load (LoRA with a PiSSA/OLoRA init: a plain adapter relative to
      the unchanged base); checkpoints keep the training form, for `resume=`.

    `preflight` also checks train.deepspeed / train.fsdp (common.py) and, for DeepSpeed started without a
    launcher, sets the one-process rendezvous environment DeepSpeed needs.
    """

    name: ClassVar[str] = ""
    section: ClassVar[str | None] = None
    also_reads: ClassVar[tuple[str, ...]] = ()  # other methods' sections this one reads (qlora: lora.*)
    config_class: ClassVar[type[Section] | None] = None
    supports_packing: ClassVar[bool] = True
    trains_base_weights: ClassVar[bool] = False
    saves_full_model: ClassVar[bool] = False
    about: ClassVar[str] = ""

    def preflight(self, cfg: Any, device: str) -> None:
        from chattune.methods.common import check_deepspeed, check_fsdp
        from chattune.models.families import method_refusal

        refusal = method_refusal(self.name, cfg)  # a model family this method cannot apply to
        if refusal:
            raise MethodError(refusal)
        check_deepspeed(cfg, device)
        check_fsdp(cfg, device)

    def load_kwargs(self, cfg: Any, dtype: Any) -> dict:
        return {}

    def apply(self, model: Any, cfg: Any, tokenizer: Any = None) -> Any:
        """The model with the method applied. `tokenizer` is given in training (not by `estimate`, whose model
        has no weights) for methods that initialise from text."""
        raise NotImplementedError

    def base_weight_bits(self, cfg: Any) -> int | None:
        return None

    def extra_activations(self, model: Any, cfg: Any, compiled: bool = False) -> int:
        return 0

    def speed_up(self, model: Any, cfg: Any, *, distributed_engine: bool, compiled: bool) -> str | None:
        return None

    def finish_output(self, model: Any, folder: Any) -> None:
        return None

    def __repr__(self) -> str:
        return f"<method {self.name}>"
