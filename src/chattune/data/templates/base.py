"""The shape every chat template has (`Template`), and what several families share: piece merging, token ids,
stop tokens stripped from a decoded answer, and tool calls (arguments as JSON text; Hermes `<tool_call>` blocks
and bare JSON calls read back).
"""

from __future__ import annotations

import json
import re

from chattune.data.encode import Piece
from chattune.data.formats import Conversation


class Template:
    name = "base"
    chosen_because = ""  # set by get_template: which template was chosen and why (for the run log)

    def pieces(self, conv: Conversation, add_generation_prompt: bool = False) -> list[Piece]:
        raise NotImplementedError

    def stop_tokens(self, tokenizer) -> list[int]:
        """Token ids that end an assistant turn at generation time."""
        raise NotImplementedError

    def parse_assistant(self, text: str) -> tuple[str, list[dict]]:
        """A generated answer as (content, tool calls `{"name": str, "arguments": dict | str}`).

        The inverse of how this template renders an assistant turn. Text that is not (or not entirely) a
        well-formed tool call comes back as content with no calls; this never raises."""
        raise NotImplementedError


# ---------------------------------------------------------------- pieces and tokens


def _merge(pieces: list[Piece]) -> list[Piece]:
    """Join neighbouring plain-text pieces with the same trainability and kind (data or markup; fewer tokenizer
    calls, and the same tokens as the whole string) unless a piece is marked `keep` (its model tokenizes it on its
    own); drop empty pieces."""
    out: list[Piece] = []
    for p in pieces:
        if not p.text:
            continue
        if out and not p.special and not p.keep and not out[-1].special and out[-1].trainable == p.trainable \
                and out[-1].markup == p.markup:
            out[-1] = Piece(out[-1].text + p.text, p.trainable, keep=out[-1].keep, markup=p.markup)
        else:
            out.append(p)
    return out


def _ids(tokenizer, names: list[str]) -> list[int]:
    out = []
    for name in names:
        tid = tokenizer.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in out:
            out.append(tid)
    return out


def _has_token(tokenizer, token: str) -> bool:
    try:
        tid = tokenizer.convert_tokens_to_ids(token)
    except Exception:  # noqa: BLE001 - an exotic tokenizer: no evidence
        return False
    return isinstance(tid, int) and tid >= 0 and tid != tokenizer.unk_token_id


def _strip_stops(text: str, stops: list[str]) -> str:
    """Drop stop tokens left at the end of an answer decoded with its special tokens."""
    stops = [s for s in stops if s]
    while stops and any(text.endswith(s) for s in stops):
        text = text[: -len(next(s for s in stops if text.endswith(s)))]
    return text


# ---------------------------------------------------------------- tool calls


def _args_json(arguments) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_hermes(text: str, bare_json: bool) -> tuple[str, list[dict]]:
    """(content, calls) from `content\n<tool_call>{json}</tool_call>\n<tool_call>...`; anything else is content.
    With bare_json, an answer that is only a `{"name", "arguments"|"parameters"}` JSON object is one call."""
    start = text.find("<tool_call>")
    if start < 0:
        call = _json_call(text.strip(), strict=True) if bare_json else None
        return ("", [call]) if call else (text, [])
    calls, pos = [], start
    for m in _HERMES_CALL.finditer(text, start):
        call = _json_call(m.group(1), strict=False)
        if call is None or text[pos:m.start()].strip():
            return text, []
        calls.append(call)
        pos = m.end()
    if not calls or text[pos:].strip():  # an unterminated call, or text after the calls
        return text, []
    return text[:start].removesuffix("\n"), calls


def _json_call(text: str, strict: bool = True) -> dict | None:
    """`{"name": str, "arguments"|"parameters": object|JSON string}` as a tool call, else None. strict: the object
    must name its arguments and have no other keys (a bare JSON answer is only taken for a call when it is one)."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    key = next((k for k in ("arguments", "parameters") if k in obj), None)
    if strict and (key is None or set(obj) != {"name", key}):
        return None
    args = obj.get(key, {}) if key else {}
    if isinstance(args, str):
        try:
            decoded = json.loads(args)
        except (ValueError, RecursionError):
            decoded = None
        args = decoded if isinstance(decoded, dict) else args
    return {"name": obj["name"], "arguments": args} if isinstance(args, (dict, str)) else None
