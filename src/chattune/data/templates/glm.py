"""ChatGLM3 and GLM-4: role tokens (`<|user|>`, `<|assistant|>`, `<|observation|>`) and no end-of-turn token
(`GLMTemplate`), with each model's tool format: ChatGLM3 writes a call as Python `tool_call(...)` code, GLM-4 as
JSON arguments.
"""

from __future__ import annotations

import ast
import io
import json
import re
import tokenize

from chattune.data.encode import Piece
from chattune.data.formats import Conversation
from chattune.data.templates.base import Template, _args_json, _ids, _merge, _strip_stops
from chattune.errors import DataError


class GLMTemplate(Template):
    """ChatGLM3 / GLM-4: a prefix, then per message `<|{role}|>{metadata}\n{content}` with no end-of-turn token.

    An assistant turn ends where the next role token starts (`<|user|>` / `<|observation|>`); after the last
    turn a terminator is appended. That token is trained as part of the assistant turn, as in the official
    finetune demos (their one-position label shift does the same), so the model learns to hand the turn back.
    The assistant's own `<|assistant|>` token is prompt; its metadata/newline and content are trained.
    """

    prefix: list[str] = []
    final: str = ""  # token appended after the last assistant turn
    eos = ""
    name = "glm"

    def system_pieces(self, conv: Conversation) -> list[Piece]:
        if conv.system is None:
            return []
        return [Piece("<|system|>", special=True), Piece("\n"), Piece(conv.system, keep=True)]

    def tool_call_pieces(self, call: dict, train: bool) -> list[Piece]:
        raise NotImplementedError

    def pieces(self, conv: Conversation, add_generation_prompt: bool = False) -> list[Piece]:
        out = [Piece(p, special=True) for p in self.prefix] + self.system_pieces(conv)
        trained_open = False  # the previous assistant turn waits for its terminating token
        for m in conv.messages:
            role = glm_role(m.role, self.name, conv.source)
            out.append(Piece(f"<|{role}|>", trainable=trained_open, special=True))
            if m.role == "assistant":
                if m.tool_call is None:
                    out += [Piece("\n", m.train), Piece(m.content, m.train, keep=True)]
                else:
                    out += self.tool_call_pieces(m.tool_call, m.train)
                trained_open = m.train
            else:
                out += [Piece("\n"), Piece(m.content, keep=True)]
                trained_open = False
        if add_generation_prompt:
            out.append(Piece("<|assistant|>", special=True))
        elif conv.messages and conv.messages[-1].role == "assistant":
            out.append(Piece(self.final, trainable=trained_open, special=True))
        return _merge(out)

    def stop_tokens(self, tokenizer) -> list[int]:
        return _ids(tokenizer, [self.eos, "<|user|>", "<|observation|>"])

    def parse_call_body(self, body: str) -> tuple[dict | str, str] | None:
        """The arguments of one rendered tool call at the start of `body`, and the text after it."""
        raise NotImplementedError

    def parse_assistant(self, text: str) -> tuple[str, list[dict]]:
        # A plain answer is `\n{content}`; a call is `{name}\n{body}` (several calls: one after another, split by
        # `<|assistant|>` when decoded with special tokens, glued together when decoded without).
        text = _strip_stops(text, [self.eos, "<|user|>", "<|observation|>"])
        if text.startswith("\n") or "\n" not in text:
            return text.removeprefix("\n"), []
        calls = []
        for segment in text.split("<|assistant|>"):
            rest = segment
            while rest:
                name, newline, body = rest.partition("\n")
                parsed = self.parse_call_body(body) if newline and _TOOL_NAME.fullmatch(name) else None
                if parsed is None:
                    return text, []
                calls.append({"name": name, "arguments": parsed[0]})
                rest = parsed[1].lstrip()
        return "", calls


def glm_role(role: str, template: str, source: str = "") -> str:
    """The GLM role token name for a message role. Tool results are `observation` (`tool` is taken as such); any
    other role has no token in GLM's vocabulary and is refused here rather than as an unknown special token."""
    if role in ("user", "assistant", "observation"):
        return role
    if role in ("tool", "function", "ipython"):
        return "observation"
    raise DataError([f"{source}: role {role!r}: template {template} has no such role"],
                    "fix: use the roles user, assistant and observation (tool results) in the data")


_TOOL_NAME = re.compile(r"[^\s{}\[\]\"'`<>]+")


# ---------------------------------------------------------------- ChatGLM3


CHATGLM3_TOOLS_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:"


class ChatGLM3Template(GLMTemplate):
    """ChatGLM3-6B (tokenization_chatglm.py): prefix `[gMASK]sop`; metadata and content are encoded separately;
    the finetune demo appends eos `</s>` after the last turn."""

    name = "chatglm3"
    prefix = ["[gMASK]", "sop"]
    final = eos = "</s>"

    def system_pieces(self, conv: Conversation) -> list[Piece]:
        if not conv.tools:
            return super().system_pieces(conv)
        text = (conv.system or CHATGLM3_TOOLS_PROMPT) + "\n" + json.dumps(conv.tools, indent=4, ensure_ascii=False)
        return [Piece("<|system|>", special=True), Piece("\n"), Piece(text, keep=True)]

    def tool_call_pieces(self, call: dict, train: bool) -> list[Piece]:
        # metadata = the tool name; content = the call as Python code, as in ChatGLM3's tool demos.
        args = call["arguments"]
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        kwargs = ", ".join(f"{k}={v!r}" for k, v in args.items()) if isinstance(args, dict) else str(args)
        code = f"```python\ntool_call({kwargs})\n```"
        return [Piece(call["name"] + "\n", train), Piece(code, train, keep=True)]

    def parse_call_body(self, body: str) -> tuple[dict | str, str] | None:
        m = _PYTHON_CALL.match(body)
        kwargs = _python_kwargs(m.group(1)) if m else None
        return None if kwargs is None else (kwargs, body[m.end():])


_PYTHON_CALL = re.compile(r"```python\n(tool_call\(.*?\))\n```", re.DOTALL)


def _python_kwargs(expr: str) -> dict | None:
    """`tool_call(a='x', from='y')` -> {"a": "x", "from": "y"}, or None.

    ChatGLM3's demo `eval`s this code. Argument names may be Python keywords (`from`, `to`: common in real tool
    schemas), which makes the text invalid Python for `ast`, so it is read with Python's tokenizer instead: the
    top-level `name=` become `'name':`, the call becomes a dict literal, and `ast.literal_eval` reads that (literals
    only, so a generated answer can never run anything)."""
    try:
        toks = [t for t in tokenize.generate_tokens(io.StringIO(expr).readline)
                if t.type not in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER)]
    except (tokenize.TokenError, SyntaxError):
        return None
    if len(toks) < 3 or [t.string for t in toks[:2]] != ["tool_call", "("] or toks[-1].string != ")":
        return None
    inner, out, depth = toks[2:-1], [], 0
    for i, t in enumerate(inner):
        is_key = (depth == 0 and t.type == tokenize.NAME and i + 1 < len(inner) and inner[i + 1].string == "="
                  and (i == 0 or inner[i - 1].string == ","))
        if is_key:
            out.append(repr(t.string))
        elif depth == 0 and t.string == "=" and i > 0 and out[-1] == repr(inner[i - 1].string):
            out.append(":")
        else:
            depth += (t.string in ("(", "[", "{")) - (t.string in (")", "]", "}"))
            out.append(t.string)
    try:
        value = ast.literal_eval("{" + " ".join(out) + "}")
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        return None
    return value if isinstance(value, dict) else None


# ---------------------------------------------------------------- GLM-4


GLM4_PERSONA = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
                "你的任务是针对用户的问题和要求提供适当的答复和支持。")


class GLM4Template(GLMTemplate):
    """GLM-4-9B-chat: prefix `[gMASK]<sop>`; the finetune demo ends the last turn with `<|user|>`; tools are a
    system block `# 可用工具` as GLM-4-9B-chat's chat template renders it; a tool call is
    `<|assistant|>{name}\n{arguments}`."""

    name = "glm4"
    prefix = ["[gMASK]", "<sop>"]
    final = "<|user|>"
    eos = "<|endoftext|>"

    def system_pieces(self, conv: Conversation) -> list[Piece]:
        out = []
        if conv.tools:
            # GLM-4-9B-chat's template writes `\n\n## {name}` right after a block tag, and transformers' jinja
            # environment (trim_blocks) drops the first of those newlines: `# 可用工具\n## {name}`.
            text = "\n" + GLM4_PERSONA + "\n\n# 可用工具"
            for tool in conv.tools:
                text += (f"\n## {tool['name']}\n\n{json.dumps(tool, ensure_ascii=False, indent=4)}"
                         "\n在调用上述函数时，请使用 Json 格式表示调用的参数。")
            out += [Piece("<|system|>", special=True), Piece(text)]
        # GLM-4's template renders no message with empty content
        return out + (super().system_pieces(conv) if conv.system else [])

    def tool_call_pieces(self, call: dict, train: bool) -> list[Piece]:
        return [Piece(f"{call['name']}\n{_args_json(call['arguments'])}", train)]

    def parse_call_body(self, body: str) -> tuple[dict | str, str] | None:
        try:
            args, end = json.JSONDecoder().raw_decode(body)
        except (ValueError, RecursionError):
            return None
        return (args, body[end:]) if isinstance(args, (dict, str)) else None
