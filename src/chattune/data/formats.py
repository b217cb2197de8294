"""Validate training records in the three supported formats, into `Conversation`s (the sources are read by readers.py).

Formats (detected from the keys of each record, or forced with `data.format`; one format per file):
- alpaca:   {"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}
- messages: {"messages": [{"role": system|user|assistant|observation, "content", "tools"?, "loss"?}]}
            (GLM-4 finetune-demo format; an assistant `content` may be a tool call {"name", "arguments"})
- sharegpt: {"conversations": [{"from": human|gpt|function_call|observation|system, "value"}],
             "system"?, "tools"?}

Every problem is reported as `file:line: field: what is wrong` (JSON arrays: `file[index]`; tables: `file:row N`;
a field renamed by data.columns under the data's own name), all at once: every
bad record, and within a record every bad field. Each problem also carries a short reason ("missing field",
"unknown role", ...) so `data.skip_invalid=true` can report how many records were skipped and why.
Validation is hand-written rather than a JSON schema: a schema validator reports the first failing branch of an
`anyOf` in its own words, and cannot check the rules about turn order that most real-data mistakes break.
"""

from __future__ import annotations

import difflib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from chattune.data.readers import RawSource, _Invalid, _json_error, _type_name, open_source
from chattune.errors import DataError

FORMATS = ("alpaca", "messages", "sharegpt")
FIX_RECORDS = "fix: correct the records above, or set data.skip_invalid=true to train on the rest"


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
    problems: list[str] = field(default_factory=list)  # records skipped (data.skip_invalid), one line per record
    format: str = ""
    reasons: list[str] = field(default_factory=list)  # the reason of each skipped record (its first problem)
    source: RawSource | None = None  # what was read: its name, kind, path (readers.py)

    def skip_counts(self) -> dict[str, int]:
        """Skipped records per reason, most frequent first."""
        return dict(Counter(self.reasons).most_common())

    def skip_report(self, examples: int = 3) -> list[str]:
        """Lines for the log when data.skip_invalid=true skipped records (empty when none was skipped): the counts
        by reason, then the first few problems."""
        if not self.reasons:
            return []
        total = len(self.reasons) + len(self.conversations)
        counts = ", ".join(f"{n} {reason}" for reason, n in self.skip_counts().items())
        lines = [f"data.skip_invalid: skipped {len(self.reasons)} of {total} records ({counts}); "
                 f"training on the other {len(self.conversations)}"]
        lines += [f"  {p}" for p in self.problems[:examples]]
        if len(self.problems) > examples:
            lines.append(f"  ... and {len(self.problems) - examples} more (`chattune data inspect FILE` lists them)")
        return lines


class _InvalidRecord(Exception):
    """Every problem found in one record."""

    def __init__(self, problems: list[_Invalid]):
        super().__init__("; ".join(str(p) for p in problems))
        self.problems = problems


class _Checks:
    """Collects the problems of one record, so a record with three bad fields gets three lines, not one."""

    def __init__(self):
        self.found: list[_Invalid] = []

    def run(self, check: Callable, *args, **kwargs):
        try:
            return check(*args, **kwargs)
        except _Invalid as e:
            self.found.append(e)
        except _InvalidRecord as e:
            self.found.extend(e.problems)
        return None

    def add(self, field_name: str, message: str, reason: str) -> None:
        self.found.append(_Invalid(field_name, message, reason))

    def done(self) -> None:
        if self.found:
            raise _InvalidRecord(self.found)


# ---------------------------------------------------------------- records


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


def _not_a_record(rec: Any, in_lines: bool) -> _Invalid:
    hint = ""
    if isinstance(rec, list) and in_lines:
        hint = " (in a .jsonl file every line is one record object, not a list)"
    return _Invalid("(record)", f"expected a JSON object, got {_type_name(rec)}{hint}", "not a JSON object")


def load_conversations(
    path: str | Path,
    split: str = "train",
    fmt: str = "auto",
    skip_invalid: bool = False,
    train_on: str = "all",
    default_system: str | None = None,
    columns: dict[str, str] | None = None,
) -> LoadResult:
    """Parse and validate one data source (readers.open_source: a file, a folder, a saved dataset, `hf:ID`; its
    `columns` renamed to the format's fields). Raises DataError listing every problem unless skip_invalid."""
    source = open_source(path, split, columns)
    file = source.name
    conversations: list[Conversation] = []
    problems: list[str] = []  # every problem, one line each
    skipped: list[str] = []  # one line per invalid record (its first problem)
    reasons: list[str] = []
    first: tuple[str, str] | None = None  # (format, location) of the file's first record: one format per file
    if fmt != "auto" and fmt not in PARSERS:
        raise DataError([f"data.format={fmt}: unknown format"], f"fix: choose auto or one of {', '.join(FORMATS)}")
    for loc, rec in source.records:
        try:
            if isinstance(rec, _Invalid):
                raise rec
            rec_fmt = fmt if fmt != "auto" else detect_format(rec)  # auto: per record, for precise errors
            if rec_fmt is None:
                if not isinstance(rec, dict):
                    raise _not_a_record(rec, not loc.endswith("]"))
                keys = ", ".join(sorted(rec)) or "none"
                raise _Invalid("(record)", f"unknown format (keys: {keys}); expected alpaca (instruction/output), "
                               "messages (messages) or sharegpt (conversations)", "unknown format")
            if first is None:
                first = (rec_fmt, loc)
            if rec_fmt != first[0]:  # its own problems first, then this one
                mixed = _Invalid("(record)", f"a {rec_fmt} record in a file of {first[0]} records (the first "
                                 f"record, {first[1]}, is {first[0]}); keep one format per file", "mixed formats")
                checks = _Checks()
                checks.run(PARSERS[rec_fmt], rec)
                raise _InvalidRecord(checks.found + [mixed])
            conv = PARSERS[rec_fmt](rec)
            conv.source = loc
            if conv.system is None and default_system:
                conv.system = default_system
            if train_on == "last":
                for i in conv.assistant_indices()[:-1]:
                    conv.messages[i].train = False
            conversations.append(conv)
        except (_Invalid, _InvalidRecord) as e:
            found = e.problems if isinstance(e, _InvalidRecord) else [e]
            problems += [f"{loc}: {source.shown(p.field_name)}: {p.message}" for p in found]
            more = f" (and {len(found) - 1} more problems in this record)" if len(found) > 1 else ""
            skipped.append(f"{loc}: {source.shown(found[0].field_name)}: {found[0].message}{more}")
            reasons.append(found[0].reason)
    if problems and not skip_invalid:
        raise DataError(problems, FIX_RECORDS)
    if not conversations:
        if problems:  # data.skip_invalid=true, and nothing was valid
            raise DataError(problems + [f"{file}: ({source.what}): no valid record left ({len(reasons)} invalid)"],
                            "fix: correct the records above; data.skip_invalid only helps when some are valid")
        raise DataError([f"{file}: ({source.what}): no records ({source.empty})"],
                        "fix: point the setting at a file with records")
    return LoadResult(conversations, skipped, first[0] if first else "", reasons, source)


# ---------------------------------------------------------------- field checks


def _require_dict(rec: Any) -> dict:
    if not isinstance(rec, dict):
        raise _Invalid("(record)", f"expected a JSON object, got {_type_name(rec)}", "not a JSON object")
    return rec


def _missing(rec: dict, key: str, where: str) -> _Invalid:
    close = difflib.get_close_matches(key, [k for k in rec if isinstance(k, str) and k != key], n=1, cutoff=0.75)
    hint = f" (found `{close[0]}`: a typo?)" if close else ""
    return _Invalid(where, f"missing{hint}", "missing field")


def _str_field(rec: dict, key: str, where: str | None = None, required: bool = True,
               allow_empty: bool = False) -> str | None:
    where = where or key
    if key not in rec or (rec[key] is None and not required):
        if required:
            raise _missing(rec, key, where)
        return None
    value = rec[key]
    if not isinstance(value, str):
        raise _Invalid(where, f"expected a string, got {_type_name(value)}", "wrong type")
    if required and not allow_empty and not value.strip():
        raise _Invalid(where, "is empty", "empty field")
    return value


def _normalize_tools(tools: Any, where: str) -> list[dict] | None:
    if tools is None:
        return None
    if isinstance(tools, str):  # sharegpt demos store tools as a JSON string
        try:
            tools = json.loads(tools) if tools.strip() else []
        except json.JSONDecodeError as e:
            raise _Invalid(where, f"a string that is not valid JSON: {_json_error(e)}",
                           "malformed tools") from None
    if not isinstance(tools, list):
        raise _Invalid(where, f"expected a list of tool definitions, got {_type_name(tools)}", "malformed tools")
    out, problems = [], []
    for i, tool in enumerate(tools):
        if isinstance(tool, dict) and tool.get("type") == "function" and isinstance(tool.get("function"), dict):
            tool = tool["function"]  # OpenAI style {"type": "function", "function": {...}}
        if not isinstance(tool, dict):
            problems.append(_Invalid(f"{where}[{i}]", f"expected a tool definition object, got {_type_name(tool)}",
                                     "malformed tools"))
        elif not isinstance(tool.get("name"), str) or not tool["name"].strip():
            problems.append(_Invalid(f"{where}[{i}].name", "each tool needs a non-empty string `name`",
                                     "malformed tools"))
        elif "parameters" in tool and not isinstance(tool["parameters"], dict):
            problems.append(_Invalid(f"{where}[{i}].parameters", "expected a JSON-schema object, got "
                                     f"{_type_name(tool['parameters'])}", "malformed tools"))
        else:
            out.append(tool)
    if problems:
        raise _InvalidRecord(problems)
    return out or None


def _parse_tool_call(value: Any, where: str) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise _Invalid(where, f"a tool call must be JSON {{\"name\", \"arguments\"}}: {_json_error(e)}",
                           "malformed tool call") from None
    if not isinstance(value, dict):
        raise _Invalid(where, f"a tool call must be an object {{\"name\", \"arguments\"}}, got {_type_name(value)}",
                       "malformed tool call")
    if not isinstance(value.get("name"), str) or not value["name"].strip():
        raise _Invalid(f"{where}.name", "a tool call needs a non-empty string `name`", "malformed tool call")
    args = value.get("arguments", value.get("parameters", {}))
    if not isinstance(args, (dict, str)):
        raise _Invalid(f"{where}.arguments", f"tool call arguments must be an object or a string, got "
                       f"{_type_name(args)}", "malformed tool call")
    return {"name": value["name"], "arguments": args}


def _check_order(messages: list[tuple[str, Message]]) -> None:
    """Roles must alternate sensibly: start with user, every assistant answers a user or an observation, an
    observation follows an assistant message (normally a tool call) or another observation, and the record ends
    with an assistant message. `messages` holds (field path, message) pairs; every break is reported."""
    checks = _Checks()
    if not messages:
        raise _Invalid("(record)", "no user or assistant message (only a system prompt)", "no assistant answer")
    where, first = messages[0]
    if first.role != "user":
        checks.add(where, f"the first message must be from the user, got {first.role}", "bad turn order")
    for i in range(1, len(messages)):
        where, m = messages[i]
        prev = messages[i - 1][1]
        # Real data (glaive demos) sometimes writes the tool call as assistant text, so an observation may
        # follow any assistant message; after a user message it is an error.
        if m.role == "observation" and prev.role == "user":
            checks.add(where, "an observation must follow an assistant tool call, not a user message",
                       "misplaced observation")
        if m.role == "assistant" and prev.role == "assistant" and prev.tool_call is None:
            checks.add(where, "two assistant messages in a row; merge them or put a user message between",
                       "bad turn order")
    if not any(m.role == "assistant" for _, m in messages):
        checks.add("(record)", "no assistant message: nothing to train on", "no assistant answer")
    elif messages[-1][1].role != "assistant":
        checks.add(messages[-1][0], "the conversation must end with an assistant message, got "
                   f"{messages[-1][1].role}", "bad turn order")
    checks.done()


# ---------------------------------------------------------------- parsers


def _history(history: Any) -> list[Message]:
    if history is None:
        return []
    if not isinstance(history, list):
        raise _Invalid("history", f"expected a list of [user, assistant] pairs, got {_type_name(history)}",
                       "bad history")
    out, checks = [], _Checks()
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            got = (f"a list of {len(pair)}" if isinstance(pair, list) and len(pair) != 2 else
                   f"[{', '.join(_type_name(x) for x in pair)}]" if isinstance(pair, list) else _type_name(pair))
            checks.add(f"history[{i}]", f"expected a [user, assistant] pair of strings, got {got}", "bad history")
        else:
            out += [Message("user", pair[0]), Message("assistant", pair[1])]
    checks.done()
    return out


def parse_alpaca(rec: Any) -> Conversation:
    rec = _require_dict(rec)
    checks = _Checks()
    instruction = checks.run(_str_field, rec, "instruction")
    extra = checks.run(_str_field, rec, "input", required=False) or ""
    output = checks.run(_str_field, rec, "output", allow_empty=True)  # empty output is legal (e.g. "no triples")
    system = checks.run(_str_field, rec, "system", required=False) or None
    messages = checks.run(_history, rec.get("history"))
    checks.done()
    user = instruction + ("\n" + extra if extra.strip() else "")
    return Conversation(messages + [Message("user", user), Message("assistant", output)], system=system)


_MESSAGE_ROLES = {"system", "user", "assistant", "observation", "tool"}


def _turns(rec: dict, key: str) -> list[tuple[int, str, dict]]:
    """The non-empty list `rec[key]` of objects, as (index, field path, object)."""
    raw = rec.get(key)
    if not isinstance(raw, list):
        if raw is None:
            raise _missing(rec, key, key)
        raise _Invalid(key, f"expected a list of turn objects, got {_type_name(raw)}", "wrong type")
    if not raw:
        raise _Invalid(key, "is empty", "empty field")
    checks = _Checks()
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            checks.add(f"{key}[{i}]", f"expected an object, got {_type_name(m)}", "wrong type")
    checks.done()
    return [(i, f"{key}[{i}]", m) for i, m in enumerate(raw)]


def _message(i: int, where: str, m: dict, seen_system: bool) -> tuple[str, Message | None, list[dict] | None]:
    """Check one `messages` entry. Returns (role, Message or None for the system message, tools)."""
    checks = _Checks()
    role = m.get("role")
    if role is None:
        raise _missing(m, "role", f"{where}.role")
    if role not in _MESSAGE_ROLES:
        shown = repr(role) if isinstance(role, str) else f"of type {_type_name(role)}"
        raise _Invalid(f"{where}.role", f"unknown role {shown}; expected system, user, assistant or observation",
                       "unknown role")
    if "tools" in m and role != "system":
        checks.add(f"{where}.tools", "`tools` is only allowed on the system message", "misplaced tools")
    if "loss" in m:
        if role != "assistant":
            checks.add(f"{where}.loss", "`loss` is only allowed on assistant messages", "bad loss flag")
        elif not isinstance(m["loss"], bool):
            checks.add(f"{where}.loss", f"expected true or false, got {json.dumps(m['loss'])}", "bad loss flag")
    content = m.get("content")
    tools, message = None, None
    if role == "system":
        if seen_system:
            checks.add(f"{where}.role", "a second system message; only one is allowed, as the first message",
                       "misplaced system message")
        elif i != 0:
            checks.add(f"{where}.role", "the system message must be the first message", "misplaced system message")
        checks.run(_str_field, m, "content", f"{where}.content", allow_empty=True)
        tools = checks.run(_normalize_tools, m.get("tools"), f"{where}.tools")
    elif role == "assistant" and isinstance(content, dict):
        call = checks.run(_parse_tool_call, content, f"{where}.content")
        message = Message("assistant", tool_call=call, train=m.get("loss", True) is not False)
    else:
        if role == "assistant" and content is not None and not isinstance(content, str):
            checks.add(f"{where}.content", f"expected a string or a tool call object, got {_type_name(content)}",
                       "wrong type")
        else:
            text = checks.run(_str_field, m, "content", f"{where}.content", allow_empty=(role == "assistant"))
            message = Message("observation" if role == "tool" else role, text or "",
                              train=m.get("loss", True) is not False)
    checks.done()
    return role, message, tools


def parse_messages(rec: Any) -> Conversation:
    rec = _require_dict(rec)
    turns = _turns(rec, "messages")
    checks = _Checks()
    system, tools, messages, seen_system = None, None, [], False
    for i, where, m in turns:
        result = checks.run(_message, i, where, m, seen_system)
        if result is None:
            seen_system = seen_system or m.get("role") == "system"
            continue
        role, message, msg_tools = result
        if role == "system":
            seen_system, system, tools = True, m.get("content") or None, msg_tools
        else:
            messages.append((f"{where}.role", message))
    checks.done()
    _check_order(messages)
    return Conversation([m for _, m in messages], system=system, tools=tools)


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "function_call": "function_call", "observation": "observation", "tool": "observation",
                   "system": "system"}


def _sharegpt_turn(i: int, where: str, m: dict, seen_system: bool) -> tuple[str, Message | None]:
    speaker = m.get("from")
    if speaker is None:
        raise _missing(m, "from", f"{where}.from")
    role = _SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None
    if role is None:
        shown = repr(speaker) if isinstance(speaker, str) else f"of type {_type_name(speaker)}"
        raise _Invalid(f"{where}.from", f"unknown speaker {shown}; expected human, gpt, function_call, "
                       "observation or system", "unknown role")
    if role == "system":
        checks = _Checks()
        if seen_system or i != 0:
            checks.add(f"{where}.from", "a system turn is only allowed first, and once", "misplaced system message")
        checks.run(_str_field, m, "value", f"{where}.value", allow_empty=True)
        checks.done()
        return role, None
    if role == "function_call":
        return role, Message("assistant", tool_call=_parse_tool_call(m.get("value"), f"{where}.value"))
    text = _str_field(m, "value", f"{where}.value", allow_empty=(role == "assistant"))
    return role, Message(role, text or "")


def parse_sharegpt(rec: Any) -> Conversation:
    rec = _require_dict(rec)
    checks = _Checks()
    system = checks.run(_str_field, rec, "system", required=False) or None
    tools = checks.run(_normalize_tools, rec.get("tools"), "tools")
    turns = _turns(rec, "conversations")
    messages, seen_system = [], False
    for i, where, m in turns:
        result = checks.run(_sharegpt_turn, i, where, m, seen_system)
        if m.get("from") == "system":
            seen_system = True
        if result is None:
            continue
        role, message = result
        if role == "system":
            system = m.get("value") or system
        else:
            messages.append((f"{where}.from", message))
    checks.done()
    _check_order(messages)
    return Conversation([m for _, m in messages], system=system, tools=tools)


PARSERS = {"alpaca": parse_alpaca, "messages": parse_messages, "sharegpt": parse_sharegpt}
