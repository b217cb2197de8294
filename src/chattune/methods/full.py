"""Full fine-tuning: every weight trains. The output is a full model folder.

Memory: AdamW keeps two fp32 moments per weight, so full tuning needs about 16 bytes per parameter (weights,
gradients, moments) before activations. For models that do not fit one GPU, pass a DeepSpeed config:
`train.deepspeed=ds_zero2.json` (shards optimizer state and gradients) or `ds_zero3.json` (shards the weights
too); `ds_zero3_offload.json` also moves them to CPU memory (shipped configs; a path to your own works too).
Launch several GPUs with `deepspeed --num_gpus N --module chattune train ...` or `torchrun`.
"""

from __future__ import annotations

from chattune.methods.base import Method
from chattune.methods.common import refuse_8bit_base


class Full(Method):
    name = "full"
    trains_base_weights = True
    saves_full_model = True
    about = "every weight trains (full SFT)"

    def preflight(self, cfg, device: str) -> None:
        refuse_8bit_base(cfg)
        super().preflight(cfg, device)

    def apply(self, model, cfg, tokenizer=None):
        for param in model.parameters():
            param.requires_grad_(True)
        return model


METHOD = Full()
