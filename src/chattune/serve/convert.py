"""OpenAI chat requests <-> chattune conversations, with errors in the OpenAI shape.

Requests are checked here, at the edge, so the worker gets a Conversation it can trust: roles (system only
first; user; assistant, possibly with `tool_calls`; `tool`/`function` results become chattune's `observation`),
content as a string or a list of text parts, tools in the OpenAI `{"type": "function", "function": {...}}` form.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from chattune.data.formats import Conversation, Message


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Params:
    stream: bool
    temperature: float
    top_p: float
    max_tokens: int | None
    stop: list[str]
    seed: int | None
    tools: list[dict] | None
    model: str | None
    min_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


def _number(body: dict, key: str, kind, low=None, high=None, default=None):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or \
            (isinstance(value, float) and not math.isfinite(value)):
        raise ApiError(400, f"`{key}` must be {'a number' if kind is float else 'an integer'}, got {value!r}", key)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ApiError(400, f"`{key}` must be between {low} and {high}, got {value}", key)
    return kind(value)


# Request fields this server reads. Every other field is refused by name (400), never silently ignored.
HONOURED = {"messages", "model", "stream", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop",
            "seed", "tools", "tool_choice", "n", "user", "stream_options", "presence_penalty", "frequency_penalty",
            "min_p", "logit_bias", "logprobs", "top_logprobs", "response_format", "parallel_tool_calls"}
# OpenAI fields accepted only at the value that asks for nothing this server would have to do
NEUTRAL = {"logit_bias": ({},), "logprobs": (False,), "top_logprobs": (0,), "parallel_tool_calls": (True,)}


def _refuse_unsupported(body: dict) -> None:
    unknown = sorted(k for k in body if k not in HONOURED)
    if unknown:
        raise ApiError(400, f"unsupported parameter `{unknown[0]}`: this server does not implement it (it reads "
                            f"{', '.join(sorted(HONOURED - {'user'}))})", unknown[0], "unsupported_parameter")
    for key, allowed in NEUTRAL.items():
        value = body.get(key)
        if value is not None and not (value in allowed and type(value) in {type(a) for a in allowed}):
            raise ApiError(400, f"`{key}`={value!r} is not supported by this server (only {allowed[0]!r})", key,
                           "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise ApiError(400, f"`response_format`={fmt!r} is not supported: this server answers in text only "
                            '(`{"type": "text"}`)', "response_format", "unsupported_parameter")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise ApiError(400, "`stream_options` takes only `include_usage` here (the last chunk carries usage)",
                       "stream_options", "unsupported_parameter")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise ApiError(400, "`user` must be a string", "user")


def _tool_choice(body: dict, tools: list[dict] | None) -> list[dict] | None:
    """`auto` (the default) offers the tools; `none` answers without them; forcing a call is not supported."""
    choice = body.get("tool_choice")
    if choice in (None, "auto"):
        return tools
    if choice == "none":
        return None
    raise ApiError(400, f"`tool_choice`={choice!r} is not supported: this server can offer tools (`auto`) or not "
                        "(`none`), not force a call", "tool_choice", "unsupported_parameter")


def parse_params(body: Any) -> Params:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _refuse_unsupported(body)
    n = body.get("n", 1)
    if n not in (1, None):
        raise ApiError(400, f"`n`={n!r} is not supported: this server returns one choice per request", "n",
                       "unsupported_parameter")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"`stream` must be true or false, got {stream!r}", "stream")
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        stops = stop
    else:
        raise ApiError(400, "`stop` must be a string or a list of at most 4 strings", "stop")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "`model` must be a string", "model")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return Params(stream=stream, temperature=_number(body, "temperature", float, 0, 2, 1.0),
                  top_p=_number(body, "top_p", float, 0, 1, 1.0),
                  max_tokens=_number({"max_tokens": max_tokens}, "max_tokens", int, 1, None),
                  stop=[s for s in stops if s], seed=_number(body, "seed", int),
                  tools=_tool_choice(body, parse_tools(body.get("tools"))), model=model,
                  min_p=_number(body, "min_p", float, 0, 1),
                  presence_penalty=_number(body, "presence_penalty", float, -2, 2, 0.0),
                  frequency_penalty=_number(body, "frequency_penalty", float, -2, 2, 0.0))


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
