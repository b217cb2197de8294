"""Read and validate training records in the three supported formats, into `Conversation`s.

Formats (auto-detected per record from its keys, or forced with `data.format`):
- alpaca:   {"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}
- messages: {"messages": [{"role": system|user|assistant|observation, "content", "tools"?, "loss"?}]}
            (GLM-4 finetune-demo format; an assistant `content` may be a tool call {"name", "arguments"})
- sharegpt: {"conversations": [{"from": human|gpt|function_call|observation|system, "value"}],
             "system"?, "tools"?}

Every problem is reported as `file:line: field: what is wrong` (JSON arrays: `file[index]`), all at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from chattune.errors import DataError

FORMATS = ("alpaca", "messages", "sharegpt")
SPLIT_NAMES = {
    "train": ("train",),
    "eval": ("validation", "valid", "dev", "eval"),
    "test": ("test",),
}


@dataclass
class Message:
    role: str  # "user" | "assistant" | "observation"
    content: str = ""
    tool_call: dict | None = None  # assistant only: {"name": str, "arguments": dict | str}
    train: bool = True  # assistant only: whether this turn carries loss


@dataclass
class Conversation:
    messages: list[Message]
    system: str | None = None
    tools: list[dict] | None = None
    source: str = ""  # `file:line` of the record, for messages about it

    def assistant_indices(self) -> list[int]:
        return [i for i, m in enumerate(self.messages) if m.role == "assistant"]


@dataclass
class LoadResult:
    conversations: list[Conversation]
    problems: list[str] = field(default_factory=list)  # records skipped (data.skip_invalid)
    format: str = ""


class _Invalid(Exception):
    def __init__(self, field_name: str, message: str):
        self.field_name, self.message = field_name, message


# ---------------------------------------------------------------- files


def find_split(path: str | Path, split: str) -> Path:
    """A file is used as is; a folder must hold a file for `split` (train / validation|dev|eval / test)."""
    path = Path(path)
    if not path.exists():
        raise DataError([f"{path}: file or folder not found"], "fix: check the path in data.train / data.eval")
    if path.is_file():
        return path
    for stem in SPLIT_NAMES[split]:
        for ext in (".jsonl", ".json"):
            if (path / f"{stem}{ext}").is_file():
                return path / f"{stem}{ext}"
    names = "/".join(SPLIT_NAMES[split])
    raise DataError([f"{path}: no {split} split in this folder (expected {names}.json or .jsonl)"])


def iter_raw_records(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (location, parsed JSON value) for every record; raises DataError on unreadable files."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError([f"{path}: cannot read: {e.strerror}"]) from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a UTF-8 byte order mark is harmless: drop it
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError([f"{path}:{line}: (file): not UTF-8 (byte {raw[e.start]:#04x}); re-save the file as UTF-8"]) from None
    if not text.strip():
        raise DataError([f"{path}: (file): the file is empty"])
    stripped = text.lstrip()
    if path.suffix == ".json" or (stripped.startswith("[") and path.suffix != ".jsonl"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if path.suffix == ".json" and not stripped.startswith("["):
                yield from _iter_jsonl(path, text)  # a .json file that is really JSON lines
                return
            raise DataError([f"{path}:{e.lineno}: (file): invalid JSON: {e.msg} (column {e.colno})"]) from None
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            raise DataError([f"{path}: (file): expected a JSON array of records, got {type(data).__name__}"])
        for i, rec in enumerate(data):
            yield f"{path}[{i}]", rec
    else:
        yield from _iter_jsonl(path, text)


def _iter_jsonl(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        loc = f"{path}:{lineno}"
        try:
            yield loc, json.loads(line)
        except json.JSONDecodeError as e:
            yield loc, _Invalid("(line)", f"invalid JSON: {e.msg} (column {e.colno})")


def detect_format(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record or "output" in record:
        return "alpaca"
    return None


def load_conversations(
    path: str | Path,
    split: str = "train",
    fmt: str = "auto",
    skip_invalid: bool = False,
    train_on: str = "all",
    default_system: str | None = None,
) -> LoadResult:
    """Parse and validate a data file/folder. Raises DataError listing every bad record unless skip_invalid."""
    file = find_split(path, split)
    conversations, problems, seen = [], [], []
    for loc, rec in iter_raw_records(file):
        try:
            if isinstance(rec, _Invalid):
                raise rec
            rec_fmt = fmt if fmt != "auto" else detect_format(rec)  # auto: per record, for precise errors
            if rec_fmt is None:
                if not isinstance(rec, dict):
                    raise _Invalid("(record)", f"expected a JSON object, got {type(rec).__name__}")
                raise _Invalid("(record)", f"unknown format (keys: {', '.join(sorted(rec))}); expected alpaca "
                               "(instruction/output), messages (messages) or sharegpt (conversations)")
            conv = PARSERS[rec_fmt](rec)
            if rec_fmt not in seen:
                seen.append(rec_fmt)
            conv.source = loc
            if conv.system is None and default_system:
                conv.system = default_system
            if train_on == "last":
                for i in conv.assistant_indices()[:-1]:
                    conv.messages[i].train = False
            conversations.append(conv)
        except _Invalid as e:
            problems.append(f"{loc}: {e.field_name}: {e.message}")
    if problems and not skip_invalid:
        raise DataError(problems, "fix the records above, or set data.skip_invalid=true to train on the rest")
    if not conversations:
        raise DataError([f"{file}: no valid records" + (f" ({len(problems)} invalid)" if problems else "")])
    return LoadResult(conversations, problems, "+".join(seen))


# ---------------------------------------------------------------- field checks


def _require_dict(rec: Any) -> dict:
    if not isinstance(rec, dict):
        raise _Invalid("(record)", f"expected a JSON object, got {type(rec).__name__}")
    return rec


def _str_field(rec: dict, key: str, where: str | None = None, required: bool = True, allow_empty: bool = False) -> str | None:
    where = where or key
    if key not in rec or rec[key] is None:
        if required:
            raise _Invalid(where, "missing")
        return None
    value = rec[key]
    if not isinstance(value, str):
        raise _Invalid(where, f"expected a string, got {type(value).__name__}")
    if required and not allow_empty and not value.strip():
        raise _Invalid(where, "is empty")
    return value


def _normalize_tools(tools: Any, where: str) -> list[dict] | None:
    if tools is None:
        return None
    if isinstance(tools, str):  # sharegpt demos store tools as a JSON string
        try:
            tools = json.loads(tools) if tools.strip() else []
        except json.JSONDecodeError as e:
            raise _Invalid(where, f"a string that is not valid JSON: {e.msg}") from None
    if not isinstance(tools, list):
        raise _Invalid(where, f"expected a list of tool definitions, got {type(tools).__name__}")
    out = []
    for i, tool in enumerate(tools):
        if isinstance(tool, dict) and tool.get("type") == "function" and isinstance(tool.get("function"), dict):
            tool = tool["function"]  # OpenAI style {"type": "function", "function": {...}}
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not tool["name"]:
            raise _Invalid(f"{where}[{i}]", "each tool needs a non-empty string `name`")
        out.append(tool)
    return out or None


def _parse_tool_call(value: Any, where: str) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise _Invalid(where, f"a tool call must be JSON {{\"name\", \"arguments\"}}: {e.msg}") from None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        raise _Invalid(where, "a tool call needs a non-empty string `name`")
    args = value.get("arguments", value.get("parameters", {}))
    if not isinstance(args, (dict, str)):
        raise _Invalid(where, f"tool call `arguments` must be an object or a string, got {type(args).__name__}")
    return {"name": value["name"], "arguments": args}


def _check_order(messages: list[Message], where: str) -> None:
    """Roles must alternate sensibly: start with user, every assistant answers a user or an observation,
    an observation follows an assistant message (normally a tool call) or another observation, and the record ends with assistant."""
    if not messages:
        raise _Invalid(where, "no messages besides the system prompt")
    if messages[0].role != "user":
        raise _Invalid(f"{where}[0].role", f"the first message must be from the user, got {messages[0].role}")
    for i, m in enumerate(messages[1:], 1):
        prev = messages[i - 1]
        # Real data (glaive demos) sometimes writes the tool call as assistant text, so an observation may
        # follow any assistant message; after a user message it is an error.
        if m.role == "observation" and prev.role not in ("observation", "assistant"):
            raise _Invalid(f"{where}[{i}].role", "an observation must follow an assistant tool call")
        if m.role == "assistant" and prev.role == "assistant" and prev.tool_call is None:
            raise _Invalid(f"{where}[{i}].role", "two assistant messages in a row")
    if messages[-1].role != "assistant":
        raise _Invalid(f"{where}[{len(messages) - 1}].role", "the conversation must end with an assistant message")


# ---------------------------------------------------------------- parsers


def parse_alpaca(rec: Any) -> Conversation:
    rec = _require_dict(rec)
    instruction = _str_field(rec, "instruction")
    extra = _str_field(rec, "input", required=False) or ""
    output = _str_field(rec, "output", allow_empty=True)  # empty output is legal (e.g. "no triples")
    system = _str_field(rec, "system", required=False) or None
    messages: list[Message] = []
    history = rec.get("history")
    if history is not None:
        if not isinstance(history, list):
            raise _Invalid("history", f"expected a list of [user, assistant] pairs, got {type(history).__name__}")
        for i, pair in enumerate(history):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise _Invalid(f"history[{i}]", "expected a [user, assistant] pair of strings")
            messages += [Message("user", pair[0]), Message("assistant", pair[1])]
    user = instruction + ("\n" + extra if extra.strip() else "")
    messages += [Message("user", user), Message("assistant", output)]
    return Conversation(messages, system=system)


_MESSAGE_ROLES = {"system", "user", "assistant", "observation", "tool"}


def _turns(rec: dict, key: str) -> list[tuple[int, str, dict]]:
    """The non-empty list `rec[key]` of objects, as (index, field path, object)."""
    raw = rec.get(key)
    if not isinstance(raw, list):
        raise _Invalid(key, "missing" if raw is None else f"expected a list, got {type(raw).__name__}")
    if not raw:
        raise _Invalid(key, "is empty")
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise _Invalid(f"{key}[{i}]", f"expected an object, got {type(m).__name__}")
    return [(i, f"{key}[{i}]", m) for i, m in enumerate(raw)]


def parse_messages(rec: Any) -> Conversation:
    rec = _require_dict(rec)
    system, tools, messages = None, None, []
    for i, where, m in _turns(rec, "messages"):
        role = m.get("role")
        if role not in _MESSAGE_ROLES:
            raise _Invalid(f"{where}.role", f"unknown role {role!r}; expected system, user, assistant or observation")
        if "tools" in m and role != "system":
            raise _Invalid(f"{where}.tools", "`tools` is only allowed on the system message")
        if "loss" in m and (role != "assistant" or not isinstance(m["loss"], bool)):
            raise _Invalid(f"{where}.loss", "`loss` must be true/false and only on assistant messages")
        content = m.get("content")
        if role == "system":
            if i != 0:
                raise _Invalid(f"{where}.role", "the system message must be the first message (and only one)")
            system = _str_field(m, "content", f"{where}.content", allow_empty=True)
            tools = _normalize_tools(m.get("tools"), f"{where}.tools")
            continue
        if role == "assistant" and isinstance(content, dict):
            messages.append(Message("assistant", tool_call=_parse_tool_call(content, f"{where}.content"),
                                    train=m.get("loss", True)))
            continue
        text = _str_field(m, "content", f"{where}.content", allow_empty=(role == "assistant"))
        messages.append(Message("observation" if role == "tool" else role, text, train=m.get("loss", True)))
    _check_order(messages, "messages")
    return Conversation(messages, system=system or None, tools=tools)


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "function_call": "function_call", "observation": "observation", "tool": "observation",
                   "system": "system"}


def parse_sharegpt(rec: Any) -> Conversation:
    rec = _require_dict(rec)
    system = _str_field(rec, "system", required=False) or None
    tools = _normalize_tools(rec.get("tools"), "tools")
    messages: list[Message] = []
    for i, where, m in _turns(rec, "conversations"):
        role = _SHAREGPT_ROLES.get(m.get("from"))
        if role is None:
            raise _Invalid(f"{where}.from", f"unknown speaker {m.get('from')!r}; expected human, gpt, "
                           "function_call, observation or system")
        if role == "system":
            if i != 0:
                raise _Invalid(f"{where}.from", "a system turn is only allowed first")
            system = _str_field(m, "value", f"{where}.value", allow_empty=True) or system
            continue
        if role == "function_call":
            messages.append(Message("assistant", tool_call=_parse_tool_call(m.get("value"), f"{where}.value")))
            continue
        text = _str_field(m, "value", f"{where}.value", allow_empty=(role == "assistant"))
        messages.append(Message(role, text))
    _check_order(messages, "conversations")
    return Conversation(messages, system=system, tools=tools)


PARSERS = {"alpaca": parse_alpaca, "messages": parse_messages, "sharegpt": parse_sharegpt}
