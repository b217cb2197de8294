"""Chat templates: a `Conversation` becomes a list of `Piece`s (text, trainable?).

One template object drives training (`pieces(conv)`), chat and serving (`pieces(conv, add_generation_prompt=True)`
and `stop_tokens`), so the model is prompted at inference exactly as it was trained.

- `auto` (default): the tokenizer's own jinja `chat_template`, split into prompt and answer by rendering
  prefixes of the conversation (see `JinjaTemplate`).
- built-ins with exact strings: `chatml`, `chatglm6b`, `chatglm2`, `chatglm3`, `glm4`, `llama3`, `transnormer`.
  For the ChatGLM family and TransNormerLLM `auto`
  picks the family's built-in even when the tokenizer has a jinja template (see `get_template`).

Every trained assistant turn includes the token that stops generation (`<|im_end|>`, `<|eot_id|>`, the next
role token for GLM models, or the tokenizer's eos), so a tuned model learns to stop.

Each template also reads a generated answer back (`parse_assistant(text) -> (content, tool_calls)`), the exact
inverse of how it renders an assistant turn, so a server can return `tool_calls` in the model's own format.
Tool-call arguments are rendered the same way everywhere: a dict as `json.dumps(..., ensure_ascii=False)`, a
string as is (it is taken to be JSON text already, as OpenAI-style `arguments` are).
"""

from __future__ import annotations

import ast
import io
import json
import re
import tokenize

from jinja2 import TemplateError

from chattune.data.encode import Piece
from chattune.data.formats import Conversation, Message
from chattune.errors import ConfigError, DataError


def _args_json(arguments) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


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


# ---------------------------------------------------------------- Llama 3


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


class ChatGLM2Template(Template):
    """ChatGLM2-6B: `[gMASK]sop` then `[Round N]\n\n问：{query}\n\n答：{answer}\n\n` counting from 1, as its
    tokenizer's `build_prompt` writes it; no system prompt, no tools.

    As in its official finetune (ptuning/main.py), the prompt is one string (earlier rounds and their answers in
    it, tokenized together) and the last answer is tokenized on its own and followed by eos `</s>`; both are
    trained. Earlier answers are part of that prompt string, exactly as `build_prompt` gives them to the model at
    chat time, so only the last answer is trained (its `loss` flag decides whether it is)."""

    name = "chatglm2"
    prefix = ["[gMASK]", "sop"]
    eos = "</s>"
    family = "ChatGLM2"

    def _rounds(self, conv: Conversation) -> list[tuple[str, Message | None]]:
        problems = []
        if conv.system is not None:
            problems.append(f"{conv.source}: system: {self.family} has no system prompt")
        if conv.tools:
            problems.append(f"{conv.source}: tools: {self.family} has no tool format")
        rounds: list[tuple[str, Message | None]] = []
        for m in conv.messages:
            if m.role == "user" and (not rounds or rounds[-1][1] is not None):
                rounds.append((m.content, None))
            elif m.role == "assistant" and m.tool_call is None and rounds and rounds[-1][1] is None:
                rounds[-1] = (rounds[-1][0], m)
            else:
                problems.append(f"{conv.source}: role {m.role!r}: {self.family} takes alternating user/assistant turns "
                                "(no tool calls or results)")
                break
        if problems:
            raise DataError(problems, f"fix: drop the system prompt and tool turns for {self.family}, or use a model "
                                      "with a tool format (template=chatglm3 or glm4)")
        return rounds

    def pieces(self, conv: Conversation, add_generation_prompt: bool = False) -> list[Piece]:
        rounds = self._rounds(conv)
        answered = rounds and rounds[-1][1] is not None and not add_generation_prompt
        prompt = ""
        for i, (query, answer) in enumerate(rounds, 1):
            prompt += f"[Round {i}]\n\n问：{query}\n\n答："
            if answer is not None and (i < len(rounds) or add_generation_prompt):
                prompt += answer.content + "\n\n"
        out = [Piece(p, special=True) for p in self.prefix] + [Piece(prompt)]
        if answered:
            last = rounds[-1][1]
            out += [Piece(last.content, last.train, keep=True), Piece(self.eos, last.train, special=True)]
        return _merge(out)

    def stop_tokens(self, tokenizer) -> list[int]:
        return _ids(tokenizer, [self.eos])

    def parse_assistant(self, text: str) -> tuple[str, list[dict]]:
        return _strip_stops(text, [self.eos]), []


class ChatGLM6BTemplate(ChatGLM2Template):
    """ChatGLM-6B (GLM v1), as its `chat()` and its official finetune (ptuning/main.py) build a sample: a first
    question alone is the bare query; with earlier rounds, the prompt is `[Round i]\n问：{query}\n答：{answer}\n`
    for each of them (counting from 0) and `[Round n]\n问：{query}\n答：` for the last. Then `[gMASK]` and
    `<sop>` FOLLOW the prompt (GLM v1 attends bidirectionally over everything before `<sop>`), the answer is
    tokenized on its own and ends with `<eop>`. No system prompt, no tools.

    As in ptuning/main.py (`labels = [-100] * context_length + input_ids[context_length:]`), the trained labels
    start at `<sop>`: the model learns `[gMASK] -> <sop>`, then the answer and `<eop>`. Earlier answers are part
    of the prompt (bidirectional context), so only the last answer is trained, as for ChatGLM2."""

    name = "chatglm6b"
    eos = "<eop>"
    family = "ChatGLM-6B"

    def pieces(self, conv: Conversation, add_generation_prompt: bool = False) -> list[Piece]:
        rounds = self._rounds(conv)
        answered = rounds and rounds[-1][1] is not None and not add_generation_prompt
        open_rounds = rounds if not answered else rounds[:-1] + [(rounds[-1][0], None)]
        if len(open_rounds) == 1 and open_rounds[0][1] is None:
            prompt = open_rounds[0][0]
        else:
            prompt = ""
            for i, (query, answer) in enumerate(open_rounds):
                prompt += f"[Round {i}]\n问：{query}\n答："
                if answer is not None:
                    prompt += answer.content + "\n"
        train = answered and rounds[-1][1].train
        out = [Piece(prompt), Piece("[gMASK]", special=True), Piece("<sop>", train, special=True)]
        if answered:
            last = rounds[-1][1]
            out += [Piece(last.content, last.train, keep=True), Piece(self.eos, last.train, special=True)]
        return _merge(out)


class TransNormerTemplate(Template):
    """TransNormerLLM (OpenNLPLab), as its publisher's fine-tune script (fine-tune/train.py) lays out a sample: the
    prompt `Human:\n{query}\nAssistant:\n` and the answer tokenized on its own, followed by eos `</s>` (the script
    appends the eos as text; here it is the eos token itself, the token generation stops on). The script puts an
    instruction that has an input in front of the prompt (`{instruction}\nHuman:\n{input}\n...`); here that place
    is the system prompt's (`{system}\n`), and an alpaca record's instruction and input form the question as for
    every template. Further rounds follow the eos with the next `Human:`; every answer is trained. No tools."""

    name = "transnormer"
    eos = "</s>"

    def pieces(self, conv: Conversation, add_generation_prompt: bool = False) -> list[Piece]:
        problems = []
        if conv.tools:
            problems.append(f"{conv.source}: tools: TransNormerLLM has no tool format")
        expect = "user"
        for m in conv.messages:
            if m.role != expect or m.tool_call is not None:
                problems.append(f"{conv.source}: role {m.role!r}: TransNormerLLM takes alternating user/assistant "
                                "turns (no tool calls or results)")
                break
            expect = "assistant" if expect == "user" else "user"
        if problems:
            raise DataError(problems, "fix: drop the tool turns for TransNormerLLM")
        out = [Piece(conv.system + "\n")] if conv.system is not None else []
        for m in conv.messages:
            if m.role == "user":
                out.append(Piece(f"Human:\n{m.content}\nAssistant:\n"))
            else:
                out += [Piece(m.content, m.train, keep=True), Piece(self.eos, m.train, special=True)]
        return _merge(out)

    def stop_tokens(self, tokenizer) -> list[int]:
        return _ids(tokenizer, [self.eos])

    def parse_assistant(self, text: str) -> tuple[str, list[dict]]:
        return _strip_stops(text, [self.eos]), []


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
        # Tool results go to the template as `tool` (the OpenAI form), or as `observation` for a tokenizer that has
        # that role token (GLM models, whose templates write `<|{role}|>` and know no `tool`).
        self.result_role = "observation" if _has_token(tokenizer, "<|observation|>") else "tool"
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


# ---------------------------------------------------------------- tool calls: rendering and parsing


def hermes_call(call: dict) -> str:
    """A tool call the Qwen2.5 / Hermes way."""
    return ('<tool_call>\n{"name": ' + json.dumps(call["name"], ensure_ascii=False) + ', "arguments": '
            + _args_json(call["arguments"]) + "}\n</tool_call>")


_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_TOOL_NAME = re.compile(r"[^\s{}\[\]\"'`<>]+")
_PYTHON_CALL = re.compile(r"```python\n(tool_call\(.*?\))\n```", re.DOTALL)


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


def _strip_stops(text: str, stops: list[str]) -> str:
    """Drop stop tokens left at the end of an answer decoded with its special tokens."""
    stops = [s for s in stops if s]
    while stops and any(text.endswith(s) for s in stops):
        text = text[: -len(next(s for s in stops if text.endswith(s)))]
    return text


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


BUILTIN = {"chatml": ChatMLTemplate, "chatglm6b": ChatGLM6BTemplate, "chatglm2": ChatGLM2Template,
           "chatglm3": ChatGLM3Template, "glm4": GLM4Template, "llama3": Llama3Template,
           "transnormer": TransNormerTemplate}
TEMPLATE_NAMES = ("auto", *BUILTIN)


def _has_token(tokenizer, token: str) -> bool:
    try:
        tid = tokenizer.convert_tokens_to_ids(token)
    except Exception:  # noqa: BLE001 - an exotic tokenizer: no evidence
        return False
    return isinstance(tid, int) and tid >= 0 and tid != tokenizer.unk_token_id


def glm_family(tokenizer, model_type: str | None = None) -> tuple[str | None, str]:
    """("chatglm6b" | "chatglm2" | "chatglm3" | "glm4" | None, the evidence) from the tokenizer and config model_type.

    A tokenizer chattune converted says so in its config (`chattune_glm_family`). Otherwise only a tokenizer of
    class ChatGLM*Tokenizer or a model of model_type chatglm/glm/glm4 with a `[gMASK]` token counts. Then GLM-4
    has `<sop>`, ChatGLM3 `sop` and `<|user|>`, ChatGLM2 `sop` and no role tokens."""
    cls = type(tokenizer).__name__ if tokenizer is not None else ""
    marked = (getattr(tokenizer, "init_kwargs", None) or {}).get("chattune_glm_family")
    if marked in ("chatglm6b", "chatglm2", "chatglm3", "glm4"):  # written by chattune's conversion (families/)
        return marked, f"the tokenizer was converted by chattune from a {marked} tokenizer"
    glm_type = (model_type or "") in ("chatglm", "glm", "glm4")
    if tokenizer is None or not (glm_type or "ChatGLM" in cls) or not _has_token(tokenizer, "[gMASK]"):
        return None, ""
    if _has_token(tokenizer, "<sop>") or "ChatGLM4" in cls:
        return "glm4", "the tokenizer has GLM-4's `<sop>` token" if "ChatGLM4" not in cls else f"tokenizer class {cls}"
    if _has_token(tokenizer, "sop"):
        if _has_token(tokenizer, "<|user|>"):
            return "chatglm3", "the tokenizer has ChatGLM3's `sop` and `<|user|>` tokens"
        return "chatglm2", "the tokenizer has ChatGLM2's `sop` token and no role tokens"
    return None, ""


def get_template(name: str, tokenizer=None, model_type: str | None = None,
                 extra_stop_ids: list[int] | None = None) -> Template:
    """`auto`: the tokenizer's chat template; a model without one falls back on its family's built-in.

    For the ChatGLM family (ChatGLM2/3, GLM-4) `auto` always takes chattune's exact built-in, also when the
    tokenizer has a jinja template: the published ones are wrong for training (ChatGLM3's writes `[gMASK]sop` as
    text, which its tokenizer splits into ordinary tokens; GLM-4's ends answers with `<|endoftext|>` where the
    GLM-4 finetune demo trains the next `<|user|>`). The returned template's `chosen_because` says why."""
    if name in BUILTIN:
        return _chosen(BUILTIN[name](), f"template={name}")
    if name != "auto":
        raise ConfigError(f"unknown template `{name}`; choose one of: {', '.join(TEMPLATE_NAMES)}")
    marked = (getattr(tokenizer, "init_kwargs", None) or {}).get("chattune_family")
    if marked in BUILTIN:  # a seed model's tokenizer converted by chattune (models/families/)
        return _chosen(BUILTIN[marked](), f"template=auto: the tokenizer was converted by chattune from a {marked} "
                                          "tokenizer; seed models use chattune's exact built-in")
    family, why = glm_family(tokenizer, model_type)
    if family:
        return _chosen(BUILTIN[family](), f"template=auto: {why}; ChatGLM models use chattune's exact built-in")
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return _chosen(JinjaTemplate(tokenizer, extra_stop_ids), "template=auto: the tokenizer's chat_template")
    families = {"chatglm": "chatglm3", "glm4": "glm4", "glm": "glm4", "llama": None, "qwen2": "chatml"}
    family = families.get(model_type or "")
    if family:
        return _chosen(BUILTIN[family](), f"template=auto: no chat_template; model_type {model_type}")
    raise ConfigError("the tokenizer has no chat_template; choose one: template=" + "|".join(BUILTIN))


def _chosen(template: Template, why: str) -> Template:
    template.chosen_because = why
    return template
