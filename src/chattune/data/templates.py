"""Chat templates: a `Conversation` becomes a list of `Piece`s (text, trainable?).

One template object drives training (`pieces(conv)`), chat and serving (`pieces(conv, add_generation_prompt=True)`
and `stop_tokens`), so the model is prompted at inference exactly as it was trained.

- `auto` (default): the tokenizer's own jinja `chat_template`, split into prompt and answer by rendering
  prefixes of the conversation (see `JinjaTemplate`).
- built-ins with exact strings: `chatml`, `chatglm3`, `glm4`, `llama3`.

Every trained assistant turn includes the token that stops generation (`<|im_end|>`, `<|eot_id|>`, the next
role token for GLM models, or the tokenizer's eos), so a tuned model learns to stop.
"""

from __future__ import annotations

import json

from chattune.data.encode import Piece
from chattune.data.formats import Conversation, Message
from chattune.errors import ConfigError, DataError


def _args_json(arguments) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


class Template:
    name = "base"

    def pieces(self, conv: Conversation, add_generation_prompt: bool = False) -> list[Piece]:
        raise NotImplementedError

    def stop_tokens(self, tokenizer) -> list[int]:
        """Token ids that end an assistant turn at generation time."""
        raise NotImplementedError


def _ids(tokenizer, names: list[str]) -> list[int]:
    out = []
    for name in names:
        tid = tokenizer.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in out:
            out.append(tid)
    return out


# ---------------------------------------------------------------- ChatML (Qwen style tools)

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
        head = (conv.system + "\n\n") if conv.system else ""
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
                out += [Piece("<|im_start|>", special=True), Piece("assistant\n")]
                text = m.content if m.tool_call is None else (
                    '<tool_call>\n{"name": ' + json.dumps(m.tool_call["name"], ensure_ascii=False)
                    + ', "arguments": ' + _args_json(m.tool_call["arguments"]) + "}\n</tool_call>")
                out += [Piece(text, m.train), Piece("<|im_end|>", m.train, special=True), Piece("\n")]
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


# ---------------------------------------------------------------- Llama 3


class Llama3Template(Template):
    """`<|begin_of_text|>` then `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>` (content
    trimmed, as Meta's tokenizer and the HF template do)."""

    name = "llama3"

    def _header(self, role: str) -> list[Piece]:
        return [Piece("<|start_header_id|>", special=True), Piece(role), Piece("<|end_header_id|>", special=True),
                Piece("\n\n")]

    def pieces(self, conv: Conversation, add_generation_prompt: bool = False) -> list[Piece]:
        out = [Piece("<|begin_of_text|>", special=True)]
        system = conv.system
        if conv.tools:
            tools = "\n\n".join(json.dumps({"type": "function", "function": t}, indent=4, ensure_ascii=False)
                                for t in conv.tools)
            system = (system + "\n\n" if system else "") + (
                "You have access to the following functions. To call a function, respond with JSON "
                'for a function call in the format {"name": function name, "parameters": dictionary of '
                "argument name and its value}.\n\n" + tools)
        if system is not None:
            out += self._header("system") + [Piece(system.strip()), Piece("<|eot_id|>", special=True)]
        for m in conv.messages:
            if m.role == "assistant":
                text = m.content if m.tool_call is None else json.dumps(
                    {"name": m.tool_call["name"], "parameters": m.tool_call["arguments"]}, ensure_ascii=False)
                out += self._header("assistant") + [Piece(text.strip(), m.train),
                                                    Piece("<|eot_id|>", m.train, special=True)]
            else:
                role = "user" if m.role == "user" else "ipython"
                out += self._header(role) + [Piece(m.content.strip()), Piece("<|eot_id|>", special=True)]
        if add_generation_prompt:
            out += self._header("assistant")
        return _merge(out)

    def stop_tokens(self, tokenizer) -> list[int]:
        return _ids(tokenizer, ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"])


# ---------------------------------------------------------------- GLM family


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
        return [Piece("<|system|>", special=True), Piece("\n" + conv.system)]

    def tool_call_pieces(self, call: dict, train: bool) -> list[Piece]:
        raise NotImplementedError

    def pieces(self, conv: Conversation, add_generation_prompt: bool = False) -> list[Piece]:
        out = [Piece(p, special=True) for p in self.prefix] + self.system_pieces(conv)
        trained_open = False  # the previous assistant turn waits for its terminating token
        for m in conv.messages:
            out.append(Piece(f"<|{m.role}|>", trainable=trained_open, special=True))
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


GLM4_PERSONA = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
                "你的任务是针对用户的问题和要求提供适当的答复和支持。")


class GLM4Template(GLMTemplate):
    """GLM-4-9B-chat: prefix `[gMASK]<sop>`; the finetune demo ends the last turn with `<|user|>`; tools are a
    system block `# 可用工具` as in GLM-4's composite demo; a tool call is `<|assistant|>{name}\n{arguments}`."""

    name = "glm4"
    prefix = ["[gMASK]", "<sop>"]
    final = "<|user|>"
    eos = "<|endoftext|>"

    def system_pieces(self, conv: Conversation) -> list[Piece]:
        out = []
        if conv.tools:
            text = "\n" + GLM4_PERSONA + "\n\n# 可用工具"
            for tool in conv.tools:
                text += (f"\n\n## {tool['name']}\n\n{json.dumps(tool, ensure_ascii=False, indent=4)}"
                         "\n在调用上述函数时，请使用 Json 格式表示调用的参数。")
            out += [Piece("<|system|>", special=True), Piece(text)]
        return out + super().system_pieces(conv)

    def tool_call_pieces(self, call: dict, train: bool) -> list[Piece]:
        return [Piece(f"{call['name']}\n{_args_json(call['arguments'])}", train)]


# ---------------------------------------------------------------- the tokenizer's own template


class JinjaTemplate(Template):
    """The tokenizer's `chat_template`, split into prompt and answer pieces.

    For every trained assistant turn i, render messages[:i] with the generation prompt (P) and messages[:i+1]
    (F): the answer is F minus P. It is trained up to and including the first stop token (eos); whatever the
    template puts after it (e.g. a newline) is not. When the answer has no stop token, eos is appended and
    trained. A template that renders earlier turns differently from later ones cannot be split this way and
    raises an error naming a built-in template to use instead.
    """

    name = "auto"

    def __init__(self, tokenizer, extra_stop_ids: list[int] | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("the tokenizer has no chat_template; choose one: template=chatml|chatglm3|glm4|llama3")
        self.tokenizer = tokenizer
        source = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else str(tokenizer.chat_template)
        self.native_tools = "tools" in source
        self.native_tool_calls = "tool_calls" in source
        stop_ids = ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []) + list(extra_stop_ids or [])
        self._stop_ids = list(dict.fromkeys(stop_ids))
        self.stop_strings = [tokenizer.convert_ids_to_tokens(i) for i in self._stop_ids]

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
            return {"role": "tool", "content": m.content}
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
        return {"role": "assistant", "content": json.dumps(
            {"name": m.tool_call["name"], "arguments": m.tool_call["arguments"]}, ensure_ascii=False)}

    def render(self, msgs: list[dict], tools: list[dict] | None, add_generation_prompt: bool) -> str:
        kwargs = {"tools": [{"type": "function", "function": t} for t in tools]} if tools and self.native_tools else {}
        return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  **kwargs)

    def pieces(self, conv: Conversation, add_generation_prompt: bool = False) -> list[Piece]:
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
            out.append(Piece(full[pos:len(prompt)]))
            answer = upto[len(prompt):]
            cut = self._stop_end(answer)
            if cut is None:
                out += [Piece(answer, True), Piece(self.stop_strings[0], True, special=True)]
            else:
                out += [Piece(answer[:cut], True), Piece(answer[cut:])]
            pos = len(upto)
        out.append(Piece(full[pos:]))
        return _merge(out)

    def _stop_end(self, answer: str) -> int | None:
        hits = [(answer.find(s), s) for s in self.stop_strings if s and s in answer]
        if not hits:
            return None
        at, s = min(hits)
        return at + len(s)


# ---------------------------------------------------------------- helpers


def _merge(pieces: list[Piece]) -> list[Piece]:
    """Join neighbouring plain-text pieces with the same trainability (fewer tokenizer calls, and the same
    tokens as the whole string) unless a piece is marked `keep` (its model tokenizes it on its own); drop empty
    pieces."""
    out: list[Piece] = []
    for p in pieces:
        if not p.text:
            continue
        if out and not p.special and not p.keep and not out[-1].special and out[-1].trainable == p.trainable:
            out[-1] = Piece(out[-1].text + p.text, p.trainable, keep=out[-1].keep)
        else:
            out.append(p)
    return out


BUILTIN = {"chatml": ChatMLTemplate, "chatglm3": ChatGLM3Template, "glm4": GLM4Template, "llama3": Llama3Template}
TEMPLATE_NAMES = ("auto", *BUILTIN)


def get_template(name: str, tokenizer=None, model_type: str | None = None, extra_stop_ids: list[int] | None = None) -> Template:
    """`auto`: the tokenizer's chat template; a model without one falls back on its family's built-in."""
    if name in BUILTIN:
        return BUILTIN[name]()
    if name != "auto":
        raise ConfigError(f"unknown template `{name}`; choose one of: {', '.join(TEMPLATE_NAMES)}")
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return JinjaTemplate(tokenizer, extra_stop_ids)
    family = {"chatglm": "chatglm3", "glm4": "glm4", "glm": "glm4", "llama": None, "qwen2": "chatml"}.get(model_type or "")
    if family:
        return BUILTIN[family]()
    raise ConfigError("the tokenizer has no chat_template; choose one: template=chatml|chatglm3|glm4|llama3")
