"""Continuous batching for `chattune serve`: every waiting request decodes in one forward pass per token.

Why by hand: transformers' `generate` runs one fixed batch to its end, with one set of sampling settings and stop
rules for all rows, and no row can join once it has started. A server needs the opposite: requests arrive at any
moment, each with its own temperature, top_p, seed, stop strings and max_tokens, and any may be cancelled. On a
CPU a small model's decode step is bound by reading its weights, so eight rows cost little more than one: batching
is what turns one stream's rate into several times that in aggregate.

How: each request is a row. A newcomer's prompt is prefilled (with the other newcomers of that moment, left-padded)
into a KV cache of its own, then merged into the running batch's cache, left-padding whichever side is shorter;
the 2-D attention mask hides every padded slot and position ids are kept per row, so each row computes what it
would alone. A finished row leaves the batch at once; columns that only hold padding are trimmed. The greedy
tokens of a batch equal one-at-a-time decoding wherever `batching_is_exact` says so, which the worker checks on the
loaded model at start-up (and falls back to one request at a time otherwise, e.g. for P-tuning v2 prefixes, which
peft injects as its own cache, or remote-code models with caches of their own).

Prefill runs through the model's forward; decode steps through it too, or through chattune's own decode step
(models/decode_step.py, `Batch.step(..., decode)`) where `step_matches_transformers` finds its logits equal to
the forward's on the loaded model. `prompt_scores` scores a prompt's own tokens (an echoed completion prompt's
logprobs, serve/logprobs.py) through the model's forward, a chunk of the prompt at a time.

Several LoRA adapters on one base (serve/adapters.py): each row names its adapter, and every forward passes the
rows' names as peft's `adapter_names` (its LoRA layers' mixed-batch forward: each adapter applied to its own rows,
`"__base__"` to none), so rows of different adapters share a batch; `mixed_batching_is_exact` checks on the loaded
model that this gives the logits each row gets alone.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from chattune.evaluate.generate import left_pad
from chattune.models.checks import model_dtype, same_logits
from chattune.models.decode_step import PROBE, base_model
from chattune.sampling import SamplingSettings, choose_token
from chattune.serve.logprobs import TokenScore, distribution, scores_for


def _cache_argument(model) -> str:
    """transformers 5.24 renamed the forward argument `past_key_values` to `cache` (the old name warns, then goes)."""
    return _cache_argument_of(type(base_model(model)))


@functools.lru_cache(maxsize=None)
def _cache_argument_of(model_class) -> str:  # read once per class, not at every token
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _forward(model, ids, mask, positions, cache, adapters: list[str] | None = None):
    """Next-token logits [B, V] for the last position of each row; `cache` (a DynamicCache) grows in place.
    `adapters`: each row's peft adapter (several adapters served), None: the model as it is."""
    extra = {"adapter_names": adapters} if adapters is not None else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                **{_cache_argument(model): cache}, **extra)
    return out.logits[:, -1, :].float(), cache


def prefill(model, prompts: list[list[int]], pad_id: int, adapters: list[str] | None = None):
    """Left-padded prompts through the model: (next-token logits [n, V], cache, attention mask [n, T])."""
    ids, mask = left_pad(prompts, pad_id, next(model.parameters()).device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits, cache = _forward(model, ids, mask, positions, DynamicCache(), adapters)
    return logits, cache, mask


def _plain_layers(cache) -> list[DynamicLayer]:
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        raise TypeError(f"{type(cache).__name__} is not a plain dynamic cache")
    return layers


def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


@dataclass
class Batch:
    """The running rows' shared state: cache, attention mask [B, T], next position id per row [B], and each row's
    peft adapter where several are served (None: the model as it is)."""
    cache: object
    mask: torch.Tensor
    positions: torch.Tensor
    adapters: list[str] | None = None

    @classmethod
    def start(cls, cache, mask, adapters: list[str] | None = None):
        return cls(cache, mask, mask.sum(-1), adapters)

    @property
    def size(self) -> int:
        return self.mask.shape[0]

    def merge(self, other: "Batch") -> None:
        """Append `other`'s rows after this batch's, left-padding the shorter side."""
        a, b = self.mask.shape[1], other.mask.shape[1]
        for mine, theirs in zip(_plain_layers(self.cache), _plain_layers(other.cache)):
            mine.keys = torch.cat([_pad_left(mine.keys, max(0, b - a), 2), _pad_left(theirs.keys, max(0, a - b), 2)])
            mine.values = torch.cat([_pad_left(mine.values, max(0, b - a), 2),
                                     _pad_left(theirs.values, max(0, a - b), 2)])
        self.mask = torch.cat([_pad_left(self.mask, max(0, b - a), 1), _pad_left(other.mask, max(0, a - b), 1)])
        self.positions = torch.cat([self.positions, other.positions])
        if self.adapters is not None or other.adapters is not None:
            self.adapters = list(self.adapters or []) + list(other.adapters or [])

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows`, then drop the leading columns that are padding in every remaining row."""
        index = torch.tensor(rows, device=self.mask.device)
        self.mask, self.positions = self.mask[index], self.positions[index]
        if self.adapters is not None:
            self.adapters = [self.adapters[i] for i in rows]
        used = self.mask.any(0).nonzero()
        start = int(used[0]) if len(used) else self.mask.shape[1]
        self.mask = self.mask[:, start:]
        for layer in _plain_layers(self.cache):
            layer.keys, layer.values = layer.keys[index, :, start:], layer.values[index, :, start:]

    def step(self, model, tokens: list[int], decode=None) -> torch.Tensor:
        """Feed each row its latest token; returns the next-token logits [B, V]. `decode`: a DecodeStep
        (models/decode_step.py) to run in place of the model's forward."""
        device = self.mask.device
        ids = torch.tensor(tokens, device=device).unsqueeze(1)
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.size, 1))], dim=1)
        if decode is not None:
            logits = decode(ids, self.mask, self.positions.unsqueeze(1), self.cache)
        else:
            logits, self.cache = _forward(model, ids, self.mask, self.positions.unsqueeze(1), self.cache,
                                          self.adapters)
        self.positions = self.positions + 1
        return logits


def _prompt_learning(model) -> bool:
    config = getattr(model, "active_peft_config", None)
    return config is not None and bool(getattr(config, "is_prompt_learning", False))


@torch.inference_mode()
def prompt_scores(model, ids: list[int], top: int, chunk: int = 512, adapter: str | None = None) -> list[TokenScore]:
    """The logprob of each prompt token given the ones before it (the first has none) and the `top` most likely
    tokens at each position: what an echoed prompt's `logprobs` report. The prompt goes through the model's
    forward `chunk` tokens at a time over a growing cache, so the logits held at once are [chunk, V], not the whole
    prompt's (a 4k-token prompt's would be 800 MB on a 49k vocabulary). P-tuning v2 (peft feeds its prefix as the
    cache) takes the prompt in one forward. `adapter`: the peft adapter it runs with where several are served."""
    device = next(model.parameters()).device
    out = [TokenScore(ids[0], None)]
    whole = _prompt_learning(model)
    cache = None if whole else DynamicCache()
    size = len(ids) if whole else chunk
    extra = {"adapter_names": [adapter]} if adapter is not None else {}
    for start in range(0, len(ids) - 1, size):
        piece = ids[start:min(start + size, len(ids) - 1)]  # the last token predicts nothing in the prompt
        x = torch.tensor([piece], device=device)
        if cache is None:
            logits = model(input_ids=x, attention_mask=torch.ones_like(x),
                           **extra).logits[0, -len(piece):]  # past any prefix
        else:
            mask = torch.ones((1, start + len(piece)), dtype=torch.long, device=device)
            positions = torch.arange(start, start + len(piece), device=device).unsqueeze(0)
            logits = model(input_ids=x, attention_mask=mask, position_ids=positions, use_cache=True,
                           **{_cache_argument(model): cache}, **extra).logits[0]
        out += scores_for(distribution(logits), ids[start + 1:start + 1 + len(piece)], top)
    return out


class Sampling:
    """One request's sampling in the batch: its settings (chattune.sampling: the same rules and transformers'
    processors as `generate`), built once per request, and its own random generator when it is seeded."""

    def __init__(self, settings: SamplingSettings | None = None, prompt_length: int = 0):
        self.settings = settings or SamplingSettings()
        self.processors = self.settings.processors(prompt_length)
        seeded = not self.settings.greedy and self.settings.seed is not None
        self.generator = torch.Generator().manual_seed(self.settings.seed) if seeded else None

    @property
    def needs_history(self) -> bool:
        """Does `choose` read the prompt and answer so far (`seen`)?"""
        return self.settings.needs_history

    def choose(self, logits: torch.Tensor, seen: list[int]) -> int:
        """The next token from one row's logits [V] (`seen`: prompt and answer so far, for the repetition penalty)."""
        return choose_token(self.settings, self.processors, logits, seen, self.generator)


def _decode_alone(model, prompt: list[int], pad_id: int, steps: int, decode=None,
                  adapter: str | None = None) -> torch.Tensor:
    adapters = [adapter] if adapter is not None else None
    logits, cache, mask = prefill(model, [prompt], pad_id, adapters)
    batch, rows = Batch.start(cache, mask, adapters), [logits[0]]
    for _ in range(steps):
        rows.append(batch.step(model, [int(rows[-1].argmax())], decode)[0])
    return torch.stack(rows)


def _generate_alone(model, prompt: list[int], pad_id: int, steps: int) -> list[int]:
    """transformers' own greedy decoding of `prompt`, the reference the engine must reproduce."""
    ids = torch.tensor([prompt], device=next(model.parameters()).device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps + 1,
                         min_new_tokens=steps + 1, do_sample=False, temperature=None, top_p=None, top_k=None,
                         repetition_penalty=1.0, pad_token_id=pad_id)
    return out[0, len(prompt):].tolist()


@torch.inference_mode()
def step_matches_transformers(model, decode, pad_id: int, steps: int = 4) -> bool:
    """`decode` (a DecodeStep) gives the logits of the model's own forward on two prompts of different lengths
    decoded together, left-padded, over `steps` tokens: the same argmax, differences within the rounding of the
    model's dtype (models/checks.py: `same_logits`). Checked once per loaded model."""
    prompts = list(PROBE)
    feed = [[prompts[0][i % 7], prompts[1][i % 2]] for i in range(steps)]  # the same tokens for both runs
    runs = []
    try:
        for d in (None, decode):
            logits, cache, mask = prefill(model, prompts, pad_id)
            batch = Batch.start(cache, mask)
            runs.append(torch.stack([batch.step(model, tokens, d) for tokens in feed]))
    except Exception:  # noqa: BLE001 - a model the step cannot drive decodes through transformers
        return False
    return same_logits(runs[1], runs[0], model_dtype(model))


@torch.inference_mode()
def batching_is_exact(model, pad_id: int, steps: int = 3, decode=None) -> bool:
    """The engine reproduces transformers' greedy decoding, and two prompts of different lengths decoded together
    give the logits each gives alone (`same_logits`: the same argmax, within the rounding of the model's dtype) —
    with a row joining a running batch and staying on after the other leaves. Checked once per loaded model, with
    the decode step it will use; False for anything the engine cannot drive."""
    if _prompt_learning(model):
        return False  # P-tuning v2: peft supplies the prefix as the model's cache on every forward
    first, second = PROBE
    try:
        expected = [_decode_alone(model, first, pad_id, steps, decode),
                    _decode_alone(model, second, pad_id, steps + 1, decode)]
        if expected[0].argmax(-1).tolist() != _generate_alone(model, first, pad_id, steps):
            return False
        logits, cache, mask = prefill(model, [first], pad_id)  # the first row runs, the second joins it
        batch = Batch.start(cache, mask)
        joined, cache2, mask2 = prefill(model, [second], pad_id)
        batch.merge(Batch.start(cache2, mask2))
        rows = [[logits[0]], [joined[0]]]
        for _ in range(steps):
            out = batch.step(model, [int(r[-1].argmax()) for r in rows], decode)
            for r, row in enumerate(rows):
                row.append(out[r])
        batch.keep([1])  # the first row leaves; the second goes on alone
        rows[1].append(batch.step(model, [int(rows[1][-1].argmax())], decode)[0])
    except Exception:  # noqa: BLE001 - any model this cannot drive is served one request at a time
        return False
    dtype = model_dtype(model)
    return all(same_logits(torch.stack(got), want, dtype) for got, want in zip(rows, expected))


@torch.inference_mode()
def mixed_batching_is_exact(model, pad_id: int, adapters: list[str], steps: int = 3) -> bool:
    """Rows of different peft adapters decoded together (peft's `adapter_names`) give the logits each gives alone
    with its adapter (`same_logits`), with rows joining a running batch and leaving it. Checked once at start-up
    where several adapters are served; False where peft cannot mix them (it refuses e.g. DoRA) or they differ."""
    prompts = [PROBE[i % 2][: 7 - i % 3] for i in range(len(adapters))]  # different lengths: rows are padded
    try:
        expected = [_decode_alone(model, p, pad_id, steps, adapter=a) for p, a in zip(prompts, adapters)]
        logits, cache, mask = prefill(model, prompts[:1], pad_id, adapters[:1])
        batch, rows = Batch.start(cache, mask, adapters[:1]), [[logits[0]]]
        if len(adapters) > 1:  # the others join the running first row
            joined, cache2, mask2 = prefill(model, prompts[1:], pad_id, adapters[1:])
            batch.merge(Batch.start(cache2, mask2, adapters[1:]))
            rows += [[row] for row in joined]
        for _ in range(steps):
            out = batch.step(model, [int(r[-1].argmax()) for r in rows])
            for r, row in enumerate(rows):
                row.append(out[r])
    except Exception:  # noqa: BLE001 - adapters peft cannot mix are served one request at a time
        return False
    dtype = model_dtype(model)
    return all(same_logits(torch.stack(got), want, dtype) for got, want in zip(rows, expected))
