"""Batched greedy generation: several prompts per `generate` call, left-padded, with the KV cache.

Left padding keeps every prompt's last token at the end of the row, so one `generate` call continues all of them;
the attention mask hides the padding and transformers derives position ids from it, so each row computes what
it would alone (tested: batched predictions equal one-at-a-time ones, on the tiny and the bundled model). Rows
stop at the template's stop tokens; a finished row is padded until the longest one ends. Used by `chattune eval`,
evaluation during training and `compare`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from chattune.sampling import sampling_settings


@dataclass
class Generated:
    text: str
    new_tokens: int  # generated tokens, the stop token included when one was produced
    stopped: bool  # ended at a stop token (not at max_new_tokens)


# What tokenizers report as model_max_length when they do not know it (transformers' VERY_LARGE_INTEGER, 1e30).
_NO_LENGTH = 10**9
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length")


def model_context(model, tokenizer) -> int | None:
    """The tokens a model attends over: its config's max_position_embeddings (n_positions, seq_length, ... as other
    families call it) and the tokenizer's model_max_length, the smaller where both are known; None where neither is."""
    config = getattr(model, "config", None)
    lengths = [v for k in _CONTEXT_KEYS if isinstance(v := getattr(config, k, None), int) and v > 0][:1]
    tokenizer_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_max, int) and 0 < tokenizer_max < _NO_LENGTH:
        lengths.append(tokenizer_max)
    return min(lengths) if lengths else None


def cut_prompts(prompts: list[list[int]], room: int) -> tuple[list[list[int]], int]:
    """Each prompt's last `room` tokens (its end: the last user turn and the generation prompt), and how many were
    longer."""
    cut = sum(len(p) > room for p in prompts)
    return [p[-room:] if len(p) > room else p for p in prompts], cut


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[list[int]], stop_ids: list[int], max_new_tokens: int = 256,
                   batch_size: int = 8, progress=None) -> list[Generated]:
    """Greedy answers to `prompts` (token ids, each ending with the generation prompt), in input order.
    `progress(done, total, seconds)` is called after each batch."""
    device = next(model.parameters()).device
    greedy = sampling_settings(getattr(model, "generation_config", None)).generate_kwargs()
    pad_id = tokenizer.pad_token_id  # models/load.py always sets one
    # Longest prompts first: rows of similar length waste less padding; results go back to input order.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[Generated | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        for b in range(0, len(order), batch_size):
            chunk = order[b:b + batch_size]
            ids, mask = left_pad([prompts[i] for i in chunk], pad_id, device)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 eos_token_id=stop_ids, pad_token_id=pad_id, **greedy)
            for row, i in enumerate(chunk):
                new = out[row, ids.shape[1]:].tolist()
                cut = next((k for k, t in enumerate(new) if t in stop_ids), None)
                kept = new if cut is None else new[:cut]
                results[i] = Generated(tokenizer.decode(kept, skip_special_tokens=True),
                                       len(new) if cut is None else cut + 1, cut is not None)
            if progress is not None:
                progress(min(b + batch_size, len(order)), len(order), time.perf_counter() - start)
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]
