"""`template=auto` with a model's own template: the tokenizer's jinja `chat_template`, rendered through
`apply_chat_template` and split into prompt and answer pieces (`TokenizerTemplate`). Writing chattune's built-in
templates out as jinja files is chattune.data.template_files.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace

from jinja2 import TemplateError

from chattune.data.encode import Piece
from chattune.data.formats import Conversation, Message
from chattune.data.templates.base import Template, _args_json, _has_token, _merge, _strip_stops, parse_hermes
from chattune.errors import ConfigError, DataError


_PLACEHOLDER = re.compile("\ue000(\\d+)\ue001")  # private-use characters around a hidden text's index


def _control_strings(tokenizer) -> list[str]:
    """The tokenizer's special-token strings (those text tokenization would otherwise turn into control tokens)."""
    found = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            found.add(token.content)
    return [t for t in found if t]


class TokenizerTemplate(Template):
    """The tokenizer's `chat_template`, split into prompt and answer pieces.

    For every trained assistant turn i, render messages[:i] with the generation prompt (P) and messages[:i+1]
    (F): the answer is F minus P. It is trained up to and including the first stop token (eos); whatever the
    template puts after it (e.g. a newline) is not. When the answer has no stop token, eos is appended and
    trained. A template that renders earlier turns differently from later ones cannot be split this way and
    raises an error naming a built-in template to use instead.

    The rendered text spells the template's control tokens as text, so it is `markup` (tokenized with special-token
    matching, as a whole, exactly as before). A message whose text itself contains a special-token string is data:
    it is rendered as a placeholder of private-use characters, which then becomes a piece of its own, tokenized with
    the special tokens split. A template that changes such a message's text (e.g. trims it) cannot be split that
    way: that conversation is refused, naming a built-in template, rather than turning the text into control tokens.
    """

    name = "auto"

    def __init__(self, tokenizer, extra_stop_ids: list[int] | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("the tokenizer has no chat_template; choose one: template=chatml|chatglm3|glm4|llama3")
        self.tokenizer = tokenizer
        source = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else str(tokenizer.chat_template)
        self.native_tools = "tools" in source
        self.native_tool_calls = "tool_calls" in source
        # Tool results go to the template as `tool` (the OpenAI form), or as `observation` for a tokenizer that has
        # that role token (GLM models, whose templates write `<|{role}|>` and know no `tool`).
        self.result_role = "observation" if _has_token(tokenizer, "<|observation|>") else "tool"
        stop_ids = ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []) + list(extra_stop_ids or [])
        self._stop_ids = list(dict.fromkeys(stop_ids))
        self.stop_strings = [tokenizer.convert_ids_to_tokens(i) for i in self._stop_ids]
        self.control_strings = _control_strings(tokenizer)  # what a message's text must not turn into

    def stop_tokens(self, tokenizer=None) -> list[int]:
        return list(self._stop_ids)

    def _messages(self, conv: Conversation) -> list[dict]:
        msgs = []
        system = conv.system
        if conv.tools and not self.native_tools:
            tools = "\n".join(json.dumps(t, ensure_ascii=False) for t in conv.tools)
            system = (system + "\n\n" if system else "") + "You can call these tools:\n" + tools + (
                '\nTo call a tool, answer with JSON {"name": ..., "arguments": ...}.')
        if system is not None:
            msgs.append({"role": "system", "content": system})
        for m in conv.messages:
            msgs.append(self._message(m))
        return msgs

    def _message(self, m: Message) -> dict:
        if m.role == "observation":
            return {"role": self.result_role, "content": m.content}
        if m.tool_call is None:
            return {"role": m.role, "content": m.content}
        if self.native_tool_calls:
            args = m.tool_call["arguments"]
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    pass
            return {"role": "assistant", "content": "",
                    "tool_calls": [{"type": "function", "function": {"name": m.tool_call["name"], "arguments": args}}]}
        return {"role": "assistant", "content": '{"name": ' + json.dumps(m.tool_call["name"], ensure_ascii=False)
                + ', "arguments": ' + _args_json(m.tool_call["arguments"]) + "}"}

    def render(self, msgs: list[dict], tools: list[dict] | None, add_generation_prompt: bool) -> str:
        kwargs = {"tools": [{"type": "function", "function": t} for t in tools]} if tools and self.native_tools else {}
        try:
            return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                      **kwargs)
        except (AssertionError, KeyError, ValueError, TypeError, TemplateError) as e:  # e.g. a role it refuses
            roles = sorted({m["role"] for m in msgs})
            raise DataError([f"template: the tokenizer's chat template refused a conversation with roles {roles}: "
                             f"{type(e).__name__}: {e}"],
                            "fix: use a built-in template that takes these roles (template=chatml|llama3|glm4|"
                            "chatglm3), or leave the tool turns out of the data") from e

    def pieces(self, conv: Conversation, add_generation_prompt: bool = False) -> list[Piece]:
        hidden, texts = self._hide_control_text(conv)
        out = self._markup_pieces(hidden, add_generation_prompt)
        if not texts:
            return out
        if self._render_text(hidden, add_generation_prompt, texts) != self._render_text(conv, add_generation_prompt):
            raise DataError([f"{conv.source}: template: a message holds a special-token string, and the tokenizer's "
                             "chat template changes message text, so chattune cannot keep that string as text"],
                            "fix: use a built-in template (template=chatml|llama3|glm4|chatglm3), or take the "
                            "special-token strings out of the text")
        expanded: list[Piece] = []
        for p in out:
            if p.special or not _PLACEHOLDER.search(p.text):
                expanded.append(p)
                continue
            for k, part in enumerate(_PLACEHOLDER.split(p.text)):  # markup, index, markup, index, ...
                if k % 2:
                    expanded.append(Piece(texts[int(part)], p.trainable))  # the user's text: data
                elif part:
                    expanded.append(Piece(part, p.trainable, markup=True))
        return expanded

    def _hide_control_text(self, conv: Conversation) -> tuple[Conversation, list[str]]:
        """`conv` with each text that contains a special-token string (system prompt, message content) replaced
        by a placeholder, and the texts replaced (the placeholder's index)."""
        controls = self.control_strings
        texts: list[str] = []

        def hide(text):
            if text and any(c in text for c in controls):
                texts.append(text)
                return f"\ue000{len(texts) - 1}\ue001"
            return text

        messages = [replace(m, content=hide(m.content)) if m.tool_call is None else m for m in conv.messages]
        return replace(conv, system=hide(conv.system), messages=messages), texts

    def _render_text(self, conv: Conversation, add_generation_prompt: bool, texts: list[str] | None = None) -> str:
        full = self.render(self._messages(conv), conv.tools, add_generation_prompt)
        return _PLACEHOLDER.sub(lambda m: texts[int(m.group(1))], full) if texts else full

    def _markup_pieces(self, conv: Conversation, add_generation_prompt: bool) -> list[Piece]:
        msgs = self._messages(conv)
        offset = len(msgs) - len(conv.messages)  # 1 when a system message was added
        full = self.render(msgs, conv.tools, add_generation_prompt)
        out: list[Piece] = []
        pos = 0
        for i, m in enumerate(conv.messages):
            if m.role != "assistant" or not m.train:
                continue
            k = i + offset
            prompt = self.render(msgs[:k], conv.tools, True)
            upto = self.render(msgs[: k + 1], conv.tools, False)
            if not (upto.startswith(prompt) and full.startswith(upto) and len(prompt) >= pos):
                raise DataError([f"{conv.source}: template: the tokenizer's chat template renders earlier turns "
                                 "differently from the last one, so answers cannot be located"],
                                "fix: use a built-in template (template=chatml|llama3|glm4|chatglm3) or data.train_on=last")
            out.append(Piece(full[pos:len(prompt)], markup=True))
            answer = upto[len(prompt):]
            cut = self._stop_end(answer)
            if cut is None:
                out += [Piece(answer, True, markup=True), Piece(self.stop_strings[0], True, special=True)]
            else:
                out += [Piece(answer[:cut], True, markup=True), Piece(answer[cut:], markup=True)]
            pos = len(upto)
        out.append(Piece(full[pos:], markup=True))
        return _merge(out)

    def parse_assistant(self, text: str) -> tuple[str, list[dict]]:
        # Tool calls in the common Hermes/Qwen form `<tool_call>{json}</tool_call>`, or an answer that is one
        # bare `{"name": ..., "arguments"|"parameters": ...}` JSON object (the form used without native tools).
        return parse_hermes(_strip_stops(text, self.stop_strings), bare_json=True)

    def _stop_end(self, answer: str) -> int | None:
        hits = [(answer.find(s), s) for s in self.stop_strings if s and s in answer]
        if not hits:
            return None
        at, s = min(hits)
        return at + len(s)
