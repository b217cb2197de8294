"""Token log-probabilities for `chattune serve`: what they are, and how they are written in OpenAI's two shapes.

What: the log-probabilities of the model's own next-token distribution, `log_softmax` of the raw logits, before
the request's temperature, top_p/top_k/min_p, penalties or the model's repetition penalty (vLLM's default,
`raw_logprobs`). So a token's logprob is the same whatever the request samples with, and a greedy answer's tokens
are the most likely ones wherever no penalty applies. A logprob of -inf (a token the model rules out) is written
as -9999.0, as vLLM does: JSON has no infinities.

Shapes: chat completions' `logprobs.content[{token, logprob, bytes, top_logprobs[{token, logprob, bytes}]}]`
(`chat_logprobs`); plain completions' legacy `{tokens, token_logprobs, top_logprobs, text_offset}`
(`completion_logprobs`), where each `top_logprobs` entry maps token text to logprob and always holds the chosen
token besides the N most likely (so up to N+1 entries, as OpenAI's legacy API and vLLM answer), and the first token
of an echoed prompt has `null` (nothing comes before it).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from chattune.serve.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob

FLOOR = -9999.0  # what -inf is written as


@dataclass(frozen=True)
class TokenScore:
    """One token's logprob and the `top` most likely tokens at its position (most likely first); `logprob` None:
    the first token of a prompt, which nothing comes before."""
    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


def _finite(x: float) -> float:
    return max(x, FLOOR)


def scores_for(logprobs: torch.Tensor, tokens: list[int], top: int) -> list[TokenScore]:
    """`logprobs` [N, V] (log_softmax rows), `tokens` [N]: each row's score of its token and its `top` best."""
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logprobs.device).unsqueeze(1))[:, 0].tolist()
    if top > 0:
        values, ids = logprobs.topk(min(top, logprobs.shape[1]), dim=-1)
        best = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        best = [()] * len(tokens)
    return [TokenScore(t, _finite(c), tuple((i, _finite(v)) for i, v in b)) for t, c, b in zip(tokens, chosen, best)]


def distribution(logits: torch.Tensor) -> torch.Tensor:
    """The model's next-token log-probabilities from its raw logits (any leading shape, vocabulary last)."""
    return torch.log_softmax(logits.float(), dim=-1)


class TokenText:
    """A tokenizer's token strings and bytes, as OpenAI reports them. `bytes` are a token's exact bytes for
    byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM2: a token may hold part of a UTF-8 character, which
    its text shows as U+FFFD); for others, the UTF-8 of the token's text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.byte_map = _byte_decoder() if _is_byte_level(tokenizer) else None
        self.special = set(tokenizer.all_special_ids)
        self.text = lru_cache(maxsize=65536)(self._text)
        self.bytes = lru_cache(maxsize=65536)(self._bytes)

    def _text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def _bytes(self, token: int) -> list[int]:
        if self.byte_map is not None and token not in self.special:
            piece = self.tokenizer.convert_ids_to_tokens(token)
            if isinstance(piece, str) and all(ch in self.byte_map for ch in piece):
                return [self.byte_map[ch] for ch in piece]
        return list(self.text(token).encode("utf-8"))


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and type(decoder).__name__ == "ByteLevel"


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2's reversible byte <-> character map

    return {ch: b for b, ch in bytes_to_unicode().items()}


class Detokenizer:
    """Text of a growing list of tokens, piece by piece, and where each token's text starts.

    Why by hand: each token's offset in the text is needed (`text_offset`, and which tokens a streamed chunk holds),
    and decoding the whole list again at every token costs O(n^2). Each new token is decoded with the few tokens
    before it (so a decoder that treats a text's first token apart, like SentencePiece's leading space, sees the
    same context); a token that ends inside a UTF-8 character gives no text until the character is complete."""

    def __init__(self, tokenizer, skip_special: bool = True, context: int = 6):
        self.tokenizer, self.skip_special, self.context = tokenizer, skip_special, context
        self.ids: list[int] = []
        self.text = ""
        self.offsets: list[int] = []  # where each token's text starts in `text`
        self._prefix = self._read = 0  # ids[_prefix:_read] were decoded last time, ids[_read:] are pending

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def add(self, token: int) -> str:
        """Add one token; returns the text it completes (often empty for a part of a character)."""
        self.offsets.append(len(self.text))
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        piece = after[len(before):]
        self.text += piece
        self._prefix, self._read = max(0, len(self.ids) - self.context), len(self.ids)
        return piece

    def extend(self, tokens: list[int]) -> "Detokenizer":
        for t in tokens:
            self.add(t)
        return self


def offsets(tokenizer, tokens: list[int], skip_special: bool = True) -> list[int]:
    """Where each token's text starts in the text of `tokens`."""
    return Detokenizer(tokenizer, skip_special).extend(tokens).offsets


def chat_logprobs(texts: TokenText, scores: list[TokenScore]) -> ChatLogprobs:
    """Chat completions' shape: one entry per token, with its `top` alternatives."""
    def top(token: int, logprob: float) -> TopLogprob:
        return TopLogprob(token=texts.text(token), logprob=logprob, bytes=texts.bytes(token))

    return ChatLogprobs(content=[TokenLogprob(**top(s.token, s.logprob).model_dump(),
                                              top_logprobs=[top(t, lp) for t, lp in s.top]) for s in scores])


def completion_logprobs(texts: TokenText, scores: list[TokenScore], text_offset: list[int]) -> CompletionLogprobs:
    """The legacy shape; a prompt's first token has null for its logprob and its alternatives."""
    def top(s: TokenScore) -> dict[str, float]:
        out = {texts.text(t): lp for t, lp in s.top}
        out.setdefault(texts.text(s.token), s.logprob)  # the chosen token is always listed
        return out

    return CompletionLogprobs(tokens=[texts.text(s.token) for s in scores],
                              token_logprobs=[s.logprob for s in scores],
                              top_logprobs=[None if s.logprob is None else top(s) for s in scores],
                              text_offset=text_offset)


def answer_scores(tokenizer, result: dict, length: int, cut: bool) -> tuple[list[TokenScore], list[int]]:
    """A finished answer's scored tokens and where each one's text starts. Where a stop string cut the text at
    `length` characters, the tokens after the cut are left out with their text; otherwise every generated token is
    kept, the stop token included (it is what the model chose, and `usage` counts it)."""
    scores = result.get("logprobs") or []
    starts = offsets(tokenizer, result["tokens"][:len(scores)])
    keep = [i for i, start in enumerate(starts) if not cut or start < length]
    return [scores[i] for i in keep], [starts[i] for i in keep]
