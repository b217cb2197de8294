"""How an answer is sampled and where it stops: one definition for chat, eval and serve.

`sampling_settings(generation_config, temperature, top_p, seed)` turns a request's or the command line's options and
the model's generation_config into `SamplingSettings`, which gives both the keyword arguments of transformers'
`generate` (chat, serve one request at a time) and transformers' own logits processors for chattune's batched
engine (serve), so the same request samples the same way on either path. The rules:
- temperature 0 (or none) is greedy decoding;
- top_k (and min_p) is the generation_config's when that file sets it, else off (transformers' built-in default of
  50 is not a choice the model's publisher made, and an OpenAI request has no top_k); a request may set min_p;
- OpenAI's presence and frequency penalties count the answer's tokens only (`AnswerPenalty`);
- the generation_config's repetition_penalty applies on every path (greedy too, as `generate` applies it).

`StopStrings` finds a request's stop strings in generated text: the batched engine checks only the text a new token
could have completed (not the whole answer at every token), and the server cuts the answer at the first one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0
    seed: int | None = None
    min_p: float = 0.0  # 0: off
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token the answer already holds
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence in the answer so far

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def generate_kwargs(self) -> dict:
        """Arguments for transformers' `generate` (every one given, so the generation_config adds nothing else)."""
        common = {"repetition_penalty": self.repetition_penalty}
        if self.greedy:
            return {**common, "do_sample": False, "temperature": None, "top_p": None, "top_k": None, "min_p": None}
        return {**common, "do_sample": True, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "min_p": self.min_p or None}

    def answer_processors(self, prompt_length: int):
        """What `generate` needs besides `generate_kwargs` (its `logits_processor=`): OpenAI's presence and
        frequency penalties over the answer so far (the tokens after `prompt_length`)."""
        from transformers import LogitsProcessorList

        out = LogitsProcessorList()
        if self.presence_penalty or self.frequency_penalty:
            out.append(AnswerPenalty(self.presence_penalty, self.frequency_penalty, prompt_length))
        return out

    def processors(self, prompt_length: int = 0):
        """transformers' logits processors for these settings, applied to one row at a time by the batched engine
        (the same classes, in the same order, as `generate` with `generate_kwargs` and `answer_processors`)."""
        from transformers import (LogitsProcessorList, MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                  TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

        out = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            out.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        out.extend(self.answer_processors(prompt_length))
        if not self.greedy:
            if self.temperature != 1.0:
                out.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k > 0:
                out.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                out.append(TopPLogitsWarper(self.top_p))  # keeps at least one token, even at top_p=0
            if self.min_p > 0:
                out.append(MinPLogitsWarper(self.min_p))
        return out

    @property
    def needs_history(self) -> bool:
        """Do the processors read the tokens so far (the repetition, presence or frequency penalties)?"""
        return self.repetition_penalty != 1.0 or bool(self.presence_penalty or self.frequency_penalty)


class AnswerPenalty:
    """OpenAI's presence and frequency penalties: logit[t] -= frequency * count(t) + presence * (count(t) > 0), the
    counts over the answer so far (not the prompt). transformers has only the multiplicative repetition penalty
    (over prompt and answer alike), hence this small processor, in transformers' LogitsProcessor call form."""

    def __init__(self, presence: float, frequency: float, prompt_length: int):
        self.presence, self.frequency, self.prompt_length = presence, frequency, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        answer = input_ids[:, self.prompt_length:]
        if answer.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, answer, torch.ones_like(answer, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def _explicit(generation_config, name: str):
    """A value the model's generation_config.json sets (not transformers' built-in default), or None."""
    if generation_config is None:
        return None
    try:
        return generation_config.to_diff_dict().get(name)
    except Exception:  # noqa: BLE001 - an unusual config object: read the attribute as it is
        return getattr(generation_config, name, None)


def sampling_settings(generation_config=None, temperature: float | None = 0.0, top_p: float | None = 1.0,
                      seed: int | None = None, min_p: float | None = None, presence_penalty: float = 0.0,
                      frequency_penalty: float = 0.0) -> SamplingSettings:
    """The sampling settings for one answer: the caller's temperature/top_p/seed (and a request's min_p and
    penalties), the model's top_k, min_p and repetition_penalty where its generation_config sets them (see the
    module note)."""
    top_k = _explicit(generation_config, "top_k")
    if min_p is None:
        min_p = _explicit(generation_config, "min_p")
    penalty = getattr(generation_config, "repetition_penalty", None) if generation_config is not None else None
    return SamplingSettings(temperature=float(temperature or 0.0), top_p=1.0 if top_p is None else float(top_p),
                            top_k=int(top_k or 0), repetition_penalty=float(penalty or 1.0), seed=seed,
                            min_p=float(min_p or 0.0), presence_penalty=float(presence_penalty or 0.0),
                            frequency_penalty=float(frequency_penalty or 0.0))


def choose_token(settings: SamplingSettings, processors, logits: torch.Tensor, seen: list[int],
                 generator: torch.Generator | None = None) -> int:
    """The next token from one row's logits [V]; `seen`: the prompt and answer so far (for the repetition
    penalty), `processors`: `settings.processors()`, built once per request."""
    if len(processors):
        ids = torch.tensor([seen], dtype=torch.long, device=logits.device).reshape(1, len(seen))
        logits = processors(ids, logits.unsqueeze(0).float())[0]
    if settings.greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits.float(), dim=-1)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        return int(logits.argmax())  # a temperature so small the distribution overflowed: its limit is greedy
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


class StopStrings:
    """A request's stop strings (OpenAI's `stop`): where the first one starts in a text."""

    def __init__(self, stops: list[str] | None):
        self.stops = [s for s in (stops or []) if s]
        self.longest = max((len(s) for s in self.stops), default=0)

    def __bool__(self) -> bool:
        return bool(self.stops)

    def find(self, text: str, start: int = 0) -> int:
        """The index of the first stop string in `text` at or after about `start`, or -1. A stop string that ends
        at or after `start` is found even if it begins before it."""
        begin = max(0, start - self.longest + 1)
        hits = [i for i in (text.find(s, begin) for s in self.stops) if i >= 0]
        return min(hits) if hits else -1

    def cut(self, text: str) -> tuple[str, bool]:
        """`text` up to the first stop string, and whether one was found."""
        at = self.find(text)
        return (text, False) if at < 0 else (text[:at], True)
