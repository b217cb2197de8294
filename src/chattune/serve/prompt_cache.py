"""The serve engine's prompt cache: the keys and values of finished requests, so that a new prompt that starts with
one of them (the same prompt again, or the next turn of a conversation, which repeats the whole history) only
prefills the tokens after the shared prefix.

Why by hand: transformers has no cache of this kind (its prefix caching is for one `generate` call), and the
engine keeps its own batched cache (serve/engine.py). llama.cpp's server does the same per slot (its prompt cache,
on by default), vLLM with automatic prefix caching.

What is kept: for each finished request (not cancelled, not failed), its prompt and the answer tokens that were
fed back, with their keys and values for every layer, one row, copied out of the batch. Entries are keyed by the
served model (adapter) and dropped least recently used first once their size passes the budget
(`chattune serve --prompt-cache MB`; 0 turns it off). A prompt reuses the entry with the longest common prefix when
that prefix is at least `MIN_PREFIX` tokens; at least its last token is always fed, for the next-token logits.

Exactness: the reused keys and values are the ones the model computed for those tokens; feeding the rest gives the
logits of a full prefill up to the order of float sums (as batching does), checked at start-up on the loaded model
(`reuse_is_exact`) and turned off with the reason where it is not. Seeded sampling requests, which promise the same
answer every time, never reuse a prefix.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch

from chattune.serve.engine import Batch, prefill

MIN_PREFIX = 8  # fewer shared tokens than this: a plain prefill (a hit saves too little to be worth the lookup)


@dataclass
class Entry:
    tokens: list[int]
    keys: list[torch.Tensor]  # per layer [1, kv_heads, n, hd]
    values: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PromptCache:
    """Finished requests' keys and values by served model, least recently used dropped first past `budget` bytes."""

    def __init__(self, budget: int):
        self.budget = budget
        self.entries: collections.OrderedDict[tuple, Entry] = collections.OrderedDict()
        self.size = 0
        self.hits = self.reused_tokens = 0

    def __bool__(self) -> bool:
        return self.budget > 0

    def put(self, model: str | None, tokens: list[int], keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        entry = Entry(list(tokens), keys, values)
        if not self or entry.nbytes > self.budget or len(tokens) < MIN_PREFIX:
            return
        key = (model, tuple(tokens))
        old = self.entries.pop(key, None)
        if old is not None:
            self.size -= old.nbytes
        for other in [k for k in self.entries if k[0] == model and k[1] == key[1][:len(k[1])]]:
            self.size -= self.entries.pop(other).nbytes  # a prefix of this one: this entry serves every hit it would
        self.entries[key] = entry
        self.size += entry.nbytes
        while self.size > self.budget:
            self.size -= self.entries.popitem(last=False)[1].nbytes

    def find(self, model: str | None, prompt: list[int]) -> tuple[Entry, int] | None:
        """The entry sharing the longest prefix with `prompt` and how many tokens to reuse (at most all but the
        prompt's last token), or None below MIN_PREFIX."""
        best, length = None, 0
        for (name, _), entry in self.entries.items():
            if name == model:
                n = min(common_prefix(entry.tokens, prompt), len(prompt) - 1)
                if n > length:
                    best, length = entry, n
        if best is None or length < MIN_PREFIX:
            return None
        self.entries.move_to_end((model, tuple(best.tokens)))
        self.hits += 1
        self.reused_tokens += length
        return best, length


def row_cache(cache, row: int, length: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Copies of one batch row's last `length` cached keys and values, every layer: [1, kv_heads, length, hd]."""
    keys = [layer.keys[row:row + 1, :, layer.keys.shape[2] - length:].clone() for layer in cache.layers]
    values = [layer.values[row:row + 1, :, layer.values.shape[2] - length:].clone() for layer in cache.layers]
    return keys, values


STEP_TOKENS = 4  # a rest this short is fed token by token through the engine's decode step, not one forward


def prefill_after(model, entry: Entry, length: int, prompt: list[int], forward, decode=None):
    """Prefill `prompt` reusing `entry`'s first `length` tokens: (next-token logits [1, V], cache, mask [1, n]).
    With `decode` (the engine's decode step, serve/engine.py `Batch.step`'s) a rest of at most STEP_TOKENS tokens
    goes through it a token at a time: on a CPU one decode step is several times faster than a forward call."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    cache = DynamicCache()
    for i, (k, v) in enumerate(zip(entry.keys, entry.values)):
        cache.update(k[:, :, :length].clone(), v[:, :, :length].clone(), i)
    rest = prompt[length:]
    if decode is not None and len(rest) <= STEP_TOKENS:
        batch = Batch.start(cache, torch.ones(1, length, dtype=torch.long, device=device))
        for token in rest:
            logits = batch.step(model, [token], decode)
        return logits, batch.cache, batch.mask
    ids = torch.tensor([rest], device=device)
    mask = torch.ones(1, len(prompt), dtype=torch.long, device=device)
    positions = torch.arange(length, len(prompt), device=device).unsqueeze(0)
    logits, cache = forward(model, ids, mask, positions, cache)
    return logits, cache, mask


@torch.inference_mode()
def reuse_is_exact(model, pad_id: int, forward, decode=None) -> bool:
    """Prefilling a probe prompt after a reused prefix gives the logits of a full prefill (`same_logits`): its
    rest in one forward, and a token at a time through `decode`."""
    from chattune.models.checks import model_dtype, same_logits

    prompt = [(7 * i + 5) % 30 + 1 for i in range(MIN_PREFIX + 6)]
    try:
        want, cache, _ = prefill(model, [prompt], pad_id)
        keys, values = row_cache(cache, 0, len(prompt))
        got = [prefill_after(model, Entry(prompt, keys, values), n, prompt, forward, decode)[0]
               for n in (MIN_PREFIX, len(prompt) - 2)]
    except Exception:  # noqa: BLE001 - a model this cannot drive prefills every prompt in full
        return False
    return all(same_logits(g, want, model_dtype(model)) for g in got)
