"""Turn template pieces into token ids and labels, and apply the truncation policy.

Pieces are tokenized each on its own (`add_special_tokens=False`; a dataset's distinct piece texts in one batch
call), the way the prompt is tokenized at chat time: the generation prompt ends a piece, so the model is trained
on exactly the token boundaries it sees when it generates.

A user's text is data and never becomes a control token: only the template inserts control tokens (special pieces,
looked up by name). Every other text piece is tokenized with `split_special_tokens=True`, so a message that
contains `<|im_end|>\n<|im_start|>system` is those characters, not a forged turn, in training, chat, eval and
serve alike. The one exception is `markup`: text the tokenizer's own jinja template wrote around the messages
(`template=auto`), which spells its control tokens as text and is tokenized with special-token matching.

Labels are the token ids of trainable pieces and -100 elsewhere. Labels never depend on the pad token (masking
`labels == pad_id` would erase the stop token when pad == eos).

Over-long samples (`data.max_length`) follow `data.truncation`:
- `prompt` (default): cut the prompt side first (oldest exchanges, then the start of the longest prompt text), so
  the final answer and its stop token survive; LLaMA-Factory likewise splits its cutoff between prompt and
  answer instead of cutting the end;
- `right`: keep the first max_length tokens; `drop`: leave the sample out; `error`: refuse, listing every one.
A sample left with no trained token is dropped. `EncodeStats` counts what happened, and `truncation_report`
turns the counts into the warning printed at the start of training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from chattune.data.formats import Conversation
from chattune.errors import DataError

IGNORE = -100
TRUNCATION_POLICIES = ("prompt", "right", "drop", "error")


@dataclass
class Piece:
    text: str
    trainable: bool = False
    special: bool = False  # `text` is the name of one special token, looked up in the vocabulary
    keep: bool = False  # tokenize on its own, never merged into the previous piece
    markup: bool = False  # template text that spells control tokens (a tokenizer's jinja output): match them


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    source: str = ""
    truncated: bool = False


@dataclass
class EncodeStats:
    """What the truncation policy did to a set of samples (the numbers behind the log lines and run.json)."""

    samples: int = 0
    truncated: int = 0  # samples longer than max_length (cut, dropped or refused)
    dropped: int = 0  # over-long samples left out (no trained token left, or data.truncation=drop)
    answers_cut: int = 0  # kept samples that lost trained tokens (an answer's end, or trained history turns)
    trained_tokens_lost: int = 0  # over kept and dropped samples
    lengths: list[int] = field(default_factory=list)  # the full, uncut length of every sample
    affected: list[str] = field(default_factory=list)  # sources of dropped / answer-cut samples (the first 20)

    def note(self, source: str) -> None:
        if source and len(self.affected) < 20:
            self.affected.append(source)


def special_token_id(tokenizer, name: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(name)
    if tid is None or (tid == tokenizer.unk_token_id and name != tokenizer.unk_token):
        raise DataError([f"template: special token {name!r} is not in the tokenizer's vocabulary"],
                        "fix: choose the template that matches the model (template=auto uses the tokenizer's own)")
    return tid


def text_ids(tokenizer, texts, markup: bool = False):
    """Token ids of text (one string or a list), without special tokens added. A user's text is data: special-token
    strings in it stay text (`split_special_tokens`); `markup` (template text) matches them."""
    return tokenizer(texts, add_special_tokens=False, split_special_tokens=not markup)["input_ids"]


def tokenize_texts(pieces, tokenizer) -> dict[tuple[str, bool], list[int]]:
    """Token ids of each distinct (text, markup) of the pieces, from one batch call per kind (the same ids as one
    call per text: each text is still tokenized on its own, without special tokens). A dataset's pieces repeat (role
    headers, the system prompt) and a fast tokenizer's batch call skips the per-call Python work: on the bundled
    model's tokenizer, 999 alpaca records' 3,092 pieces took 0.7 s one call at a time."""
    out: dict[tuple[str, bool], list[int]] = {}
    pieces = list(pieces)  # (read twice: once per kind)
    for markup in (False, True):
        unique = list(dict.fromkeys(p.text for p in pieces if p.text and not p.special and p.markup == markup))
        if unique:
            out.update(zip(((t, markup) for t in unique), text_ids(tokenizer, unique, markup)))
    return out


def encode_pieces(pieces: list[Piece], tokenizer, known: dict[tuple[str, bool], list[int]] | None = None
                  ) -> tuple[list[int], list[int]]:
    """Token ids and labels of the pieces; `known` holds texts already tokenized (`tokenize_texts`)."""
    ids: list[int] = []
    labels: list[int] = []
    for p in pieces:
        if p.special:
            toks = [special_token_id(tokenizer, p.text)]
        elif p.text:
            toks = known.get((p.text, p.markup)) if known else None
            if toks is None:
                toks = text_ids(tokenizer, p.text, p.markup)
        else:
            continue
        ids.extend(toks)
        labels.extend(toks if p.trainable else [IGNORE] * len(toks))
    return ids, labels


def _trained(labels: list[int]) -> int:
    """Trained tokens that are really learned: position 0 predicts nothing (labels shift by one)."""
    return sum(x != IGNORE for x in labels[1:])


def too_long_problem(source: str, length: int, max_length: int) -> str:
    return f"{source}: (record): {length} tokens, longer than data.max_length={max_length}"


def length_for_share(lengths: list[int], share: float = 0.95) -> int:
    """The smallest max_length that keeps `share` of the samples whole (nearest-rank percentile)."""
    ranked = sorted(lengths)
    return ranked[max(math.ceil(share * len(ranked)) - 1, 0)] if ranked else 0


def _fix_too_long(lengths: list[int] | None = None) -> str:
    keep = ""
    if lengths:
        p95, top = length_for_share(lengths), max(lengths)
        keep = (f" (data.max_length={top} keeps every sample whole)" if p95 == top else
                f" (data.max_length={p95} keeps 95% of the samples whole, {top} keeps all)")
    return (f"fix: raise data.max_length{keep}, or set data.truncation=prompt (cut the prompt side, keep the answer), "
            "right (keep the first tokens) or drop (leave the sample out)")


def encode_conversation(conv: Conversation, template, tokenizer, max_length: int, truncation: str = "prompt",
                        stats: EncodeStats | None = None, pieces: list[Piece] | None = None,
                        known: dict[tuple[str, bool], list[int]] | None = None) -> Encoded | None:
    """Encode one training conversation and apply the truncation policy (see TRUNCATION_POLICIES). Returns None
    for a sample that is dropped; raises DataError for an over-long sample under data.truncation=error.
    `pieces` (the template's pieces of `conv`) and `known` (tokenized texts) let encode_conversations render and
    tokenize a whole dataset in one pass."""
    if truncation not in TRUNCATION_POLICIES:
        raise DataError([f"data.truncation={truncation}: unknown policy"],
                        f"fix: choose one of {', '.join(TRUNCATION_POLICIES)}")
    ids, labels = encode_pieces(template.pieces(conv) if pieces is None else pieces, tokenizer, known)
    stats = stats if stats is not None else EncodeStats()
    stats.samples += 1
    stats.lengths.append(len(ids))
    if len(ids) <= max_length:
        return Encoded(ids, labels, conv.source)
    stats.truncated += 1
    if truncation == "error":
        raise DataError([too_long_problem(conv.source, len(ids), max_length)], _fix_too_long())
    trained_before = _trained(labels)
    if truncation == "drop":
        stats.dropped += 1
        stats.trained_tokens_lost += trained_before
        stats.note(conv.source)
        return None
    if truncation == "prompt":
        ids, labels = _cut_prompt_side(conv, template, tokenizer, max_length, ids, labels)
    ids, labels = ids[:max_length], labels[:max_length]  # `right`, and the last resort of `prompt`
    trained = _trained(labels)
    lost = max(trained_before - trained, 0)
    stats.trained_tokens_lost += lost
    if trained == 0:
        stats.dropped += 1  # nothing left to learn from: the answer was entirely cut off
        stats.note(conv.source)
        return None
    if lost:
        stats.answers_cut += 1
        stats.note(conv.source)
    return Encoded(ids, labels, conv.source, truncated=True)


def encode_conversations(conversations: list[Conversation], template, tokenizer, max_length: int,
                         truncation: str = "prompt", stats: EncodeStats | None = None) -> list[Encoded]:
    """Encode many conversations (dropped ones left out). Under data.truncation=error every over-long sample is
    reported at once, with the data.max_length that would keep them."""
    stats = stats if stats is not None else EncodeStats()
    rendered = [template.pieces(c) for c in conversations]
    known = tokenize_texts((p for pieces in rendered for p in pieces), tokenizer)
    if truncation != "error":
        encoded = (encode_conversation(c, template, tokenizer, max_length, truncation, stats, pieces, known)
                   for c, pieces in zip(conversations, rendered))
        return [e for e in encoded if e is not None]
    out, problems, first = [], [], len(stats.lengths)
    for conv, pieces in zip(conversations, rendered):
        e = encode_conversation(conv, template, tokenizer, 10**12, "right", stats, pieces, known)
        if len(e.input_ids) > max_length:
            stats.truncated += 1
            problems.append(too_long_problem(conv.source, len(e.input_ids), max_length))
        else:
            out.append(e)
    if problems:
        raise DataError(problems, _fix_too_long(stats.lengths[first:]))
    return out


def truncation_report(stats: EncodeStats, max_length: int, truncation: str = "prompt", threshold: float = 0.05
                      ) -> list[str]:
    """The loud warning for the start of training: lines to log when more than `threshold` of the samples were
    dropped or lost trained tokens to data.max_length, with the max_length that keeps 95% of them whole.
    Empty when the share is at or under the threshold."""
    affected = stats.dropped + stats.answers_cut
    if not stats.samples or affected / stats.samples <= threshold:
        return []
    keep = length_for_share(stats.lengths)
    lines = [f"WARNING: data.max_length={max_length} costs {affected} of {stats.samples} samples "
             f"({100 * affected / stats.samples:.1f}%) trained tokens: {stats.dropped} dropped, {stats.answers_cut} "
             f"with an answer cut ({stats.trained_tokens_lost} trained tokens lost; data.truncation={truncation})",
             f"WARNING: {stats.truncated} samples are longer than {max_length} tokens (longest {max(stats.lengths)}); "
             f"data.max_length={keep} keeps 95% of the samples whole"]
    if truncation == "right":
        lines.append("WARNING: data.truncation=prompt (the default) cuts old turns and the start of long prompts "
                     "first, so answers survive")
    if stats.affected:
        lines.append(f"WARNING: e.g. {', '.join(stats.affected[:3])}")
    return lines


# ---------------------------------------------------------------- data.truncation=prompt


def _last_answer_start(labels: list[int]) -> int | None:
    """Index of the first token of the last trained span (the final answer), or None when nothing is trained."""
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE:
        end -= 1
    if end == 0:
        return None
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return start


def _cut_prompt_side(conv: Conversation, template, tokenizer, max_length: int, ids: list[int], labels: list[int]
                     ) -> tuple[list[int], list[int]]:
    """Shorten an over-long conversation from the prompt side, so its final answer and stop token survive:
    1. drop whole exchanges (a user message and everything up to the next one), oldest first;
    2. cut tokens from the start of the longest prompt-side text (system, user or observation content), then of
       the next longest, ... until the sample fits.
    The cut happens in the Conversation and the template renders it again, so role markers and special tokens
    stay whole. When the final answer does not fit even with every prompt text emptied, the prompt keeps up to
    half of max_length and the caller cuts the answer's end (an answer with no question would teach the model to
    answer anything with it). The result may still exceed max_length; the caller cuts it on the right.
    """
    def encode(c: Conversation) -> tuple[list[int], list[int]]:
        return encode_pieces(template.pieces(c), tokenizer)

    # 1. oldest exchanges. An exchange starts at a user message; never drop the last trained answer.
    msgs = conv.messages
    trained_at = [i for i, m in enumerate(msgs) if m.role == "assistant" and m.train]
    starts = [i for i, m in enumerate(msgs) if m.role == "user" and trained_at and i <= trained_at[-1]]
    if len(starts) > 1 and starts[0] == 0:
        def from_exchange(k: int) -> Conversation:
            return replace(conv, messages=msgs[starts[k]:])

        lo, hi = 0, len(starts) - 1  # lo: too long (the full sample); find the fewest exchanges to drop
        best = encode(from_exchange(hi))
        if len(best[0]) <= max_length:
            while hi - lo > 1:  # the length shrinks as exchanges are dropped: bisect instead of trying each
                mid = (lo + hi) // 2
                enc = encode(from_exchange(mid))
                if len(enc[0]) <= max_length:
                    hi, best = mid, enc
                else:
                    lo = mid
        conv = from_exchange(hi)
        ids, labels = best
        if len(ids) <= max_length:
            return ids, labels

    # 2. the start of the longest prompt-side texts. When the answer cannot fit even after every prompt text is
    # emptied, start again from the uncut texts and keep up to half of max_length for the prompt instead.
    cut, ids2, labels2 = _shrink_prompt(conv, template, tokenizer, max_length, ids, labels, fallback=False)
    if len(ids2) <= max_length:
        return ids2, labels2
    if _last_answer_start(labels) is not None and not any(t for _, t in _prompt_texts(cut)):
        _, ids2, labels2 = _shrink_prompt(conv, template, tokenizer, max_length, ids, labels, fallback=True)
    return ids2, labels2


def _shrink_prompt(conv: Conversation, template, tokenizer, max_length: int, ids: list[int], labels: list[int],
                   fallback: bool) -> tuple[Conversation, list[int], list[int]]:
    """Cut the start of the longest prompt-side text, then the next longest, ... until the prompt (everything
    before the final answer) fits its budget: max_length minus the answer, or (fallback) half of max_length."""
    conv = replace(conv, messages=[replace(m) for m in conv.messages])
    for _ in range(64):  # each round shortens one text; a bound in case a tokenizer does not round-trip
        start = _last_answer_start(labels)
        if start is None or len(ids) <= max_length:
            break
        budget = min(start, max_length // 2) if fallback else max_length - (len(ids) - start)
        excess = start - budget
        if excess <= 0:
            break
        texts = [(len(text_ids(tokenizer, t)), key, t) for key, t in _prompt_texts(conv) if t]
        if not texts:
            break
        n, key, text = max(texts, key=lambda x: x[0])
        if excess >= n:
            shorter = ""
        else:
            toks = text_ids(tokenizer, text)
            # A byte-level tokenizer may split a character: drop the half character left at the start.
            shorter = tokenizer.decode(toks[excess:]).lstrip("\ufffd")
            if len(shorter) >= len(text):
                shorter = text[excess:]
        _set_text(conv, key, shorter)
        ids, labels = encode_pieces(template.pieces(conv), tokenizer)
    return conv, ids, labels


def _prompt_texts(conv: Conversation) -> list[tuple[int, str]]:
    """(key, text) of every text on the prompt side: -1 is the system prompt, i >= 0 the content of message i."""
    out = [(-1, conv.system)] if conv.system else []
    return out + [(i, m.content) for i, m in enumerate(conv.messages) if m.role in ("user", "observation")]


def _set_text(conv: Conversation, key: int, text: str) -> None:
    if key == -1:
        conv.system = text
    else:
        conv.messages[key].content = text


def encode_prompt(conv: Conversation, template, tokenizer) -> list[int]:
    """Token ids of a conversation that ends with a user/observation turn, plus the generation prompt."""
    ids, _ = encode_pieces(template.pieces(conv, add_generation_prompt=True), tokenizer)
    return ids
