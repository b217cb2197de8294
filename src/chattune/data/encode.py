"""Turn template pieces into token ids and labels, and apply the truncation policy.

Pieces are tokenized one at a time (`add_special_tokens=False`), the way the prompt is tokenized at chat
time: the generation prompt ends a piece, so the model is trained on exactly the token boundaries it sees
when it generates. Labels are the token ids of trainable pieces and -100 elsewhere. Labels never depend on
the pad token (masking `labels == pad_id` would erase the stop token when pad == eos).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from chattune.data.formats import Conversation
from chattune.errors import DataError

IGNORE = -100


@dataclass
class Piece:
    text: str
    trainable: bool = False
    special: bool = False  # `text` is the name of one special token, looked up in the vocabulary
    keep: bool = False  # tokenize on its own, never merged into the previous piece


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    source: str = ""
    truncated: bool = False


@dataclass
class EncodeStats:
    samples: int = 0
    truncated: int = 0
    dropped: int = 0  # over-long samples left with no trained token (or data.truncation=drop)
    lengths: list[int] = field(default_factory=list)


def special_token_id(tokenizer, name: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(name)
    if tid is None or (tid == tokenizer.unk_token_id and name != tokenizer.unk_token):
        raise DataError([f"template: special token {name!r} is not in the tokenizer's vocabulary"],
                        "fix: choose the template that matches the model (template=auto uses the tokenizer's own)")
    return tid


def encode_pieces(pieces: list[Piece], tokenizer) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    for p in pieces:
        if p.special:
            toks = [special_token_id(tokenizer, p.text)]
        elif p.text:
            toks = tokenizer(p.text, add_special_tokens=False)["input_ids"]
        else:
            continue
        ids.extend(toks)
        labels.extend(toks if p.trainable else [IGNORE] * len(toks))
    return ids, labels


def encode_conversation(conv: Conversation, template, tokenizer, max_length: int, truncation: str = "right",
                        stats: EncodeStats | None = None) -> Encoded | None:
    """Encode one training conversation. Returns None for a sample dropped by the truncation policy."""
    ids, labels = encode_pieces(template.pieces(conv), tokenizer)
    stats = stats if stats is not None else EncodeStats()
    stats.samples += 1
    stats.lengths.append(len(ids))
    truncated = len(ids) > max_length
    if truncated:
        stats.truncated += 1
        if truncation == "error":
            raise DataError([f"{conv.source}: (record): {len(ids)} tokens, longer than data.max_length={max_length}"],
                            "fix: raise data.max_length, or set data.truncation=right (cut) or drop (skip)")
        if truncation == "drop":
            stats.dropped += 1
            return None
        ids, labels = ids[:max_length], labels[:max_length]
        if all(x == IGNORE for x in labels[1:]):
            stats.dropped += 1  # nothing left to learn from: the answer was entirely cut off
            return None
    return Encoded(ids, labels, conv.source, truncated)


def encode_prompt(conv: Conversation, template, tokenizer) -> list[int]:
    """Token ids of a conversation that ends with a user/observation turn, plus the generation prompt."""
    ids, _ = encode_pieces(template.pieces(conv, add_generation_prompt=True), tokenizer)
    return ids
