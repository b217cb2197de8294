"""Llama 3: `<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>`, with tools, calls and results
as Llama 3.1's template writes them.
"""

from __future__ import annotations

import json

from chattune.data.encode import Piece
from chattune.data.formats import Conversation
from chattune.data.templates.base import Template, _args_json, _ids, _json_call, _merge, _strip_stops


LLAMA31_SYSTEM_HEADER = "Environment: ipython\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
LLAMA31_TOOLS_INTRO = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments that "
    'best answers the given prompt.\n\nRespond in the format {"name": function name, "parameters": dictionary of '
    "argument name and its value}.Do not use variables.\n\n"
)


class Llama3Template(Template):
    """`<|begin_of_text|>` then `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>` (content
    trimmed, as Meta's tokenizer and the HF template do).

    Llama 3 has no tool format; with tools this follows Llama 3.1's template: the system turn starts with
    `Environment: ipython` and the knowledge/today dates, the tools (JSON, indent 4) go into the first user
    turn, a call is `{"name": ..., "parameters": ...}` and a result is an `ipython` turn holding the result as a
    JSON string (Llama 3.1's template applies `tojson` to it)."""

    name = "llama3"

    def _header(self, role: str) -> list[Piece]:
        return [Piece("<|start_header_id|>", special=True), Piece(role), Piece("<|end_header_id|>", special=True),
                Piece("\n\n")]

    def pieces(self, conv: Conversation, add_generation_prompt: bool = False) -> list[Piece]:
        out = [Piece("<|begin_of_text|>", special=True)]
        msgs = list(conv.messages)
        eot = Piece("<|eot_id|>", special=True)
        if conv.tools:
            out += self._header("system") + [Piece(LLAMA31_SYSTEM_HEADER + (conv.system or "").strip()), eot]
            if msgs and msgs[0].role == "user":
                tools = "".join(json.dumps({"type": "function", "function": t}, indent=4, ensure_ascii=False) + "\n\n"
                                for t in conv.tools)
                out += self._header("user") + [Piece(LLAMA31_TOOLS_INTRO + tools + msgs.pop(0).content.strip()), eot]
        elif conv.system is not None:
            out += self._header("system") + [Piece(conv.system.strip()), eot]
        for m in msgs:
            if m.role == "assistant":
                text = m.content.strip() if m.tool_call is None else (
                    '{"name": ' + json.dumps(m.tool_call["name"], ensure_ascii=False) + ', "parameters": '
                    + _args_json(m.tool_call["arguments"]) + "}")
                out += self._header("assistant") + [Piece(text, m.train), Piece("<|eot_id|>", m.train, special=True)]
            elif m.role == "user":
                out += self._header("user") + [Piece(m.content.strip()), eot]
            else:  # Llama 3.1's template writes a tool result with `tojson`, which quotes a string
                out += self._header("ipython") + [Piece(json.dumps(m.content, ensure_ascii=False)), eot]
        if add_generation_prompt:
            out += self._header("assistant")
        return _merge(out)

    def stop_tokens(self, tokenizer) -> list[int]:
        return _ids(tokenizer, ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"])

    def parse_assistant(self, text: str) -> tuple[str, list[dict]]:
        text = _strip_stops(text, ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"])
        call = _json_call(text.strip().removeprefix("<|python_tag|>"))
        return ("", [call]) if call else (text, [])
