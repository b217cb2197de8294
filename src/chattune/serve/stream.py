"""What a streamed answer may send so far: text up to the first stop string, holding back the tail that could
still start one, and (with logprobs) the scores of the tokens whose text is sent, in the same chunk.

Without logprobs the text comes from the worker's text pieces (transformers' TextStreamer). With them it is decoded
here from the scored tokens (serve/logprobs.py `Detokenizer`), so each chunk carries exactly its tokens' logprobs;
the batched engine sends each token's score as it is chosen, while transformers' `generate` (one request at a time)
gives them only at the end, when the whole answer goes out at once.
"""

from __future__ import annotations

from chattune.sampling import StopStrings
from chattune.serve.logprobs import Detokenizer, TokenScore, answer_scores


class StreamText:
    def __init__(self, stops: list[str], tokenizer, logprobs: bool):
        self.stops = StopStrings(stops)
        self.hold = max(self.stops.longest - 1, 0)
        self.tokenizer = tokenizer
        self.detok = Detokenizer(tokenizer) if logprobs else None
        self.buffered = ""  # the answer's text so far
        self.sent = ""  # the part of it already sent
        self.scores: list[TokenScore] = []
        self.scores_sent = 0

    def add(self, kind: str, value) -> None:
        """A worker event: "text" (a piece of the answer) or "logprob" (a token's score)."""
        if kind == "text" and self.detok is None:
            self.buffered += value
        elif kind == "logprob" and self.detok is not None:
            self.scores.append(value)
            self.buffered += self.detok.add(value.token)

    def ready(self) -> tuple[str, list[tuple[TokenScore, int]]]:
        """The text that may go out now (may be empty) and the scores of its tokens, each with its text's offset."""
        text, cut = self.stops.cut(self.buffered)
        ready = text if cut else text[: max(len(self.sent), len(text) - self.hold)]
        if len(ready) <= len(self.sent):
            return "", []
        delta, self.sent = ready[len(self.sent):], ready
        return delta, self._scores_up_to(len(ready))

    def _scores_up_to(self, length: int) -> list[tuple[TokenScore, int]]:
        start = self.scores_sent
        offsets = self.detok.offsets if self.detok is not None else []
        while self.scores_sent < len(self.scores) and offsets[self.scores_sent] < length:
            self.scores_sent += 1
        return [(self.scores[i], offsets[i]) for i in range(start, self.scores_sent)]

    def finish(self, result: dict, text: str, cut: bool) -> list[tuple[TokenScore, int]]:
        """Once the answer is done (`text`: its final text, cut at a stop string where `cut`): the scores not sent
        yet, from the worker's result, which holds all of them on either path. The caller sends the text left."""
        if self.detok is None:
            return []
        scores, starts = answer_scores(self.tokenizer, result, len(text), cut)
        return list(zip(scores, starts))[self.scores_sent:]
