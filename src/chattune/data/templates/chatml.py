"""ChatML: `<|im_start|>{role}\n{content}<|im_end|>`, with tools, tool calls and tool results as Qwen2.5 writes
them (Hermes `<tool_call>` blocks).
"""

from __future__ import annotations

import json

from chattune.data.encode import Piece
from chattune.data.formats import Conversation, Message
from chattune.data.templates.base import Template, _args_json, _ids, _merge, _strip_stops, parse_hermes


QWEN_TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
QWEN_TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}"
    "\n</tool_call>"
)


class ChatMLTemplate(Template):
    """`<|im_start|>{role}\\n{content}<|im_end|>\\n`; tools and tool calls in Qwen2.5's format."""

    name = "chatml"

    def _system_text(self, conv: Conversation) -> str | None:
        if not conv.tools:
            return conv.system
        tools = "".join("\n" + json.dumps({"type": "function", "function": t}, ensure_ascii=False) for t in conv.tools)
        head = (conv.system + "\n\n") if conv.system is not None else ""
        return head + QWEN_TOOLS_HEADER + tools + QWEN_TOOLS_FOOTER

    def pieces(self, conv: Conversation, add_generation_prompt: bool = False) -> list[Piece]:
        out: list[Piece] = []
        system = self._system_text(conv)
        if system is not None:
            out += [Piece("<|im_start|>", special=True), Piece(f"system\n{system}"), Piece("<|im_end|>", special=True),
                    Piece("\n")]
        msgs = conv.messages
        for i, m in enumerate(msgs):
            if m.role == "assistant":
                # Qwen2.5 puts an answer's text and all its tool calls in one turn, one `\n` apart: a tool call
                # right after another assistant message continues that turn instead of opening a new one.
                if _continues_turn(msgs, i):
                    out.append(Piece("\n", m.train))
                else:
                    out += [Piece("<|im_start|>", special=True), Piece("assistant\n")]
                out.append(Piece(m.content if m.tool_call is None else hermes_call(m.tool_call), m.train))
                if not _continues_turn(msgs, i + 1):
                    out += [Piece("<|im_end|>", m.train, special=True), Piece("\n")]
            elif m.role == "user":
                out += [Piece("<|im_start|>", special=True), Piece(f"user\n{m.content}"),
                        Piece("<|im_end|>", special=True), Piece("\n")]
            else:  # observation: Qwen2.5 puts consecutive tool results in one user turn
                first = i == 0 or msgs[i - 1].role != "observation"
                last = i == len(msgs) - 1 or msgs[i + 1].role != "observation"
                text = ("user" if first else "") + f"\n<tool_response>\n{m.content}\n</tool_response>"
                out += ([Piece("<|im_start|>", special=True)] if first else []) + [Piece(text)]
                if last:
                    out += [Piece("<|im_end|>", special=True), Piece("\n")]
        if add_generation_prompt:
            out += [Piece("<|im_start|>", special=True), Piece("assistant\n")]
        return _merge(out)

    def stop_tokens(self, tokenizer) -> list[int]:
        return _ids(tokenizer, ["<|im_end|>"])

    def parse_assistant(self, text: str) -> tuple[str, list[dict]]:
        return parse_hermes(_strip_stops(text, ["<|im_end|>", "<|endoftext|>"]), bare_json=False)


def _continues_turn(msgs: list[Message], i: int) -> bool:
    """Message i is a tool call that joins the assistant turn of message i - 1 (ChatML/Qwen2.5 only)."""
    return 0 < i < len(msgs) and msgs[i].role == "assistant" and msgs[i].tool_call is not None \
        and msgs[i - 1].role == "assistant"


def hermes_call(call: dict) -> str:
    """A tool call the Qwen2.5 / Hermes way."""
    return ('<tool_call>\n{"name": ' + json.dumps(call["name"], ensure_ascii=False) + ', "arguments": '
            + _args_json(call["arguments"]) + "}\n</tool_call>")
