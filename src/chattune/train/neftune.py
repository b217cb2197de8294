"""`train.neftune_noise_alpha`: NEFTune (noisy embeddings in training), as transformers runs it.

transformers' Trainer does the work (`TrainingArguments.neftune_noise_alpha`): at the start of `train()` it hooks the
input embedding so that, while the module is in training mode, its output gets uniform noise of magnitude
alpha / sqrt(length * hidden) (length and hidden read from the output's [batch, length, hidden] shape), and it
removes the hook when `train()` returns. Evaluation runs in eval mode, so it sees no noise. The noise comes before
everything chattune changes in a step (label-only logits, the chunked loss, shared LoRA down-projections), which never
look at the embeddings, so those stay as they are.

What chattune adds are the checks that keep it from being silently wrong:
- packing: a packed row holds the whole batch, so `length` would be the batch's total and every sample would get
  sqrt(batch) times less noise than alone (transformers issue #34659, open): packing is turned off
  (`PACKING_OFF`, in train/packing.py's decision), and batches are padded as in the NEFTune paper's code;
- the embedding: transformers finds it with `get_input_embeddings()` (under a peft model, on the wrapped model) and
  reads the shape of its output; a model where that fails, or whose embedding output is not [batch, length, hidden],
  is refused before training with the reason (`checked_alpha`).
"""

from __future__ import annotations

import torch

from chattune.errors import ConfigError

PACKING_OFF = ("train.neftune_noise_alpha: transformers scales NEFTune's noise by the row length, and a packed row "
               "holds the whole batch (transformers issue #34659)")


def checked_alpha(model, alpha: float | None) -> float | None:
    """`alpha` for TrainingArguments, after trying transformers' own hook on `model` once: it must find the input
    embedding, and the embedding's output must be [batch, length, hidden] for the noise scale it reads from it."""
    if alpha is None:
        return None
    from transformers.integrations.neftune import activate_neftune, deactivate_neftune

    try:
        handle = activate_neftune(model, alpha)
    except (AttributeError, NotImplementedError) as e:
        raise ConfigError(f"train.neftune_noise_alpha: transformers finds no input embedding on this model to add "
                          f"NEFTune's noise to ({type(e).__name__}: {e}); drop train.neftune_noise_alpha") from None
    try:
        embedding = next(m for m in model.modules() if hasattr(m, "neftune_noise_alpha"))
        shape = _output_shape(embedding)
    finally:
        deactivate_neftune(model, handle)
    if len(shape) != 3 or shape[:2] != (1, 2):
        raise ConfigError(f"train.neftune_noise_alpha: this model's input embedding returns shape {tuple(shape)} for "
                          "one row of two tokens, not [batch, length, hidden], from which NEFTune reads its noise "
                          "scale; drop train.neftune_noise_alpha")
    return alpha


def _output_shape(embedding) -> tuple[int, ...]:
    """The embedding's output shape for one row of two token ids (eval mode: the noise hook adds nothing)."""
    weight = next(embedding.parameters())
    was_training = embedding.training
    embedding.eval()
    try:
        with torch.no_grad():
            return tuple(embedding(torch.tensor([[0, 1]], device=weight.device)).shape)
    finally:
        embedding.train(was_training)
