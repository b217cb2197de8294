"""OpenAI requests -> what the worker runs: chat messages -> a chattune Conversation, completion prompts -> token ids.

The request's fields are typed and checked in serve/protocol.py; the messages are checked here, message by message,
so the worker gets a Conversation it can trust: roles (system only first; user; assistant, possibly with
`tool_calls`; `tool`/`function` results become chattune's `observation`), content as a string or a list of text
parts, tools in the OpenAI `{"type": "function", "function": {...}}` form.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from chattune.data.encode import text_ids
from chattune.data.formats import Conversation, Message
from chattune.serve.protocol import ApiError


@dataclass
class PlainPrompt:
    """A /v1/completions prompt: its token ids, the text `echo` returns, and how that text was decoded."""
    ids: list[int]
    text: str
    skip_special: bool  # text given as text: tokens the server added (a BOS) count no characters


def prompt_prefix(tokenizer) -> list[int]:
    """The tokens a tokenizer puts before any text by default (`tokenizer(text)`): Llama's and Mistral's BOS,
    ChatGLM's `[gMASK]sop`; none for Qwen or SmolLM2. A text prompt gets them, as the model saw text in training."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for at in range(len(full) - len(plain) + 1):
        if full[at:at + len(plain)] == plain:
            return full[:at]
    return []


def plain_prompts(prompts: list[str | list[int]], tokenizer, prefix: list[int], vocab: int) -> list[PlainPrompt]:
    """Completion prompts as token ids. Text is raw text (no chat template): special-token strings in it stay
    text (data/encode.py `text_ids`), after the tokenizer's usual leading tokens (`prompt_prefix`). Token ids are
    taken as given, checked against the model's vocabulary."""
    out = []
    texts = [p for p in prompts if isinstance(p, str)]
    encoded = iter(text_ids(tokenizer, texts) if texts else [])
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            out.append(PlainPrompt(prefix + next(encoded), p, True))
            continue
        bad = next((t for t in p if not 0 <= t < vocab), None)
        if bad is not None:
            where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            raise ApiError(400, f"`{where}`: token id {bad} is not in this model's vocabulary (0..{vocab - 1})",
                           where)
        out.append(PlainPrompt(list(p), tokenizer.decode(p, skip_special_tokens=False), False))
    return out


def chat_tools(req) -> list[dict] | None:
    """The request's tools as the template takes them; `tool_choice: none` answers without them."""
    tools = parse_tools(req.tools)
    return None if req.tool_choice == "none" else tools


def parse_tools(tools: Any) -> list[dict] | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise ApiError(400, "`tools` must be a list", "tools")
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ApiError(400, f"`tools[{i}]` must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}",
                           f"tools[{i}]")
        out.append(fn)
    return out or None


def _text(content: Any, where: str, allow_none: bool = False) -> str:
    if content is None and allow_none:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"`{where}`: only text content parts are supported", where)
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"`{where}` must be a string or a list of text parts, got {type(content).__name__}", where)


def _tool_call(call: Any, where: str) -> dict:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ApiError(400, f"`{where}` must have a `function` with a `name`", where)
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            pass  # kept as the string it is
    return {"name": fn["name"], "arguments": args}


def to_conversation(messages: Any, tools: list[dict] | None) -> Conversation:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty list", "messages")
    system, turns = None, []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"`{where}` must be an object", where)
        role = m.get("role")
        if role in ("system", "developer"):
            if i != 0:
                raise ApiError(400, f"`{where}`: a system message is only allowed first", f"{where}.role")
            system = _text(m.get("content"), f"{where}.content")
        elif role == "user":
            turns.append(Message("user", _text(m.get("content"), f"{where}.content")))
        elif role == "assistant":
            calls = m.get("tool_calls") or []
            if not isinstance(calls, list):
                raise ApiError(400, f"`{where}.tool_calls` must be a list", f"{where}.tool_calls")
            text = _text(m.get("content"), f"{where}.content", allow_none=bool(calls))
            if text or not calls:
                turns.append(Message("assistant", text))
            for j, call in enumerate(calls):
                turns.append(Message("assistant", tool_call=_tool_call(call, f"{where}.tool_calls[{j}]")))
        elif role in ("tool", "function"):
            turns.append(Message("observation", _text(m.get("content"), f"{where}.content")))
        else:
            raise ApiError(400, f"`{where}.role`: unknown role {role!r}; use system, user, assistant or tool",
                           f"{where}.role")
    if not turns or turns[-1].role not in ("user", "observation"):
        raise ApiError(400, "`messages` must end with a user message or a tool result", "messages")
    return Conversation(turns, system=system, tools=tools)
