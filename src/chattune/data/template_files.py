"""Templates that travel with the model: the jinja side of chattune's chat templates.

A tuned model is used far from chattune (plain `model.generate`, vLLM, TGI, llama.cpp); they prompt it with the
`chat_template.jinja` in its folder and stop at `generation_config.json`'s `eos_token_id`. This module writes
both, so that `tokenizer.apply_chat_template` renders exactly the text chattune trained on and prompts with,
also where training used a built-in template, and generation stops where `chattune chat` stops.

The built-in templates are written here a second time, in jinja: chattune renders `Piece`s (it needs to know
which tokens are trained and where content is tokenized on its own), the jinja renders text. Both are checked
against each other over a battery of conversations (tests/test_template_jinja.py).

Messages the generated templates read (the OpenAI / transformers chat format):
- `{"role": "system", "content"}` first, if any; `{"role": "user", "content"}`;
- `{"role": "assistant", "content", "tool_calls"?: [{"type": "function", "function": {"name", "arguments"}}]}`
  (`content` may be empty or None beside tool calls; a call without the `function` wrapper is read too);
- tool results as `{"role": "tool" | "observation" | "ipython", "content"}`;
- `tools=[{"type": "function", "function": {...}}]` (or bare function schemas).
Arguments: a dict is written with `tojson`, a string is taken to be JSON text and written as is (`chatglm3`
needs a dict: it writes `key=value` pairs).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from chattune.data.encode import Piece
from chattune.data.formats import Conversation
from chattune.data.templates import (
    CHATGLM3_TOOLS_PROMPT,
    GLM4_PERSONA,
    LLAMA31_SYSTEM_HEADER,
    LLAMA31_TOOLS_INTRO,
    QWEN_TOOLS_FOOTER,
    QWEN_TOOLS_HEADER,
    GLMTemplate,
    Template,
    TokenizerTemplate,
)
from chattune.errors import ConfigError
from chattune.outputs import atomic_write_text

CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"
_SENTENCEPIECE_SPACE = "\u2581"


def pieces_text(pieces: list[Piece], content_prefix: str = "") -> str:
    """The text of a template's pieces, special-token pieces as their token strings. `content_prefix` is put
    before every piece that is tokenized on its own (`keep`): " " is the text form of the prefix a SentencePiece
    tokenizer adds to such text (ChatGLM3)."""
    return "".join((content_prefix + p.text) if p.keep else p.text for p in pieces)


def content_prefix(tokenizer) -> str:
    """" " when the tokenizer, like ChatGLM3's SentencePiece one, starts text encoded on its own with a space
    token: that is what encoding a GLM message's content separately adds, written as text."""
    if tokenizer is None:
        return ""
    try:
        first = tokenizer.convert_ids_to_tokens(tokenizer.encode("a", add_special_tokens=False))[:1]
    except Exception:  # noqa: BLE001 - an exotic tokenizer: assume no prefix
        return ""
    return " " if first and isinstance(first[0], str) and first[0].startswith(_SENTENCEPIECE_SPACE) else ""


def to_messages(conv: Conversation, group_calls: bool = False) -> tuple[list[dict], list[dict] | None]:
    """A conversation as (messages, tools) for `apply_chat_template`: one message per chattune message, or, with
    group_calls, the OpenAI form where an answer's text and its tool calls are one assistant message."""
    msgs = [{"role": "system", "content": conv.system}] if conv.system is not None else []
    for m in conv.messages:
        if m.role == "assistant" and m.tool_call is not None:
            function = {"name": m.tool_call["name"], "arguments": m.tool_call["arguments"]}
            call = {"type": "function", "function": function}
            if group_calls and msgs and msgs[-1]["role"] == "assistant":
                msgs[-1].setdefault("tool_calls", []).append(call)
            else:
                msgs.append({"role": "assistant", "content": "", "tool_calls": [call]})
        else:
            msgs.append({"role": "tool" if m.role == "observation" else m.role, "content": m.content})
    tools = [{"type": "function", "function": t} for t in conv.tools] if conv.tools else None
    return msgs, tools


# ---------------------------------------------------------------- the templates
# Written in the style of the publishers' own templates (every statement `{%- ... %}`, every output `{{- ... }}`):
# transformers renders with trim_blocks and lstrip_blocks, and this way no layout whitespace reaches the output.
# `@NAME@` marks a constant of chattune.data.templates, filled in as a JSON string literal (jinja reads those alike).

_COMMON = r"""
{%- if messages and messages[0].role == 'system' %}
    {%- set system = messages[0].content %}
    {%- set chat = messages[1:] %}
{%- else %}
    {%- set system = none %}
    {%- set chat = messages %}
{%- endif %}
{%- set results = ['tool', 'observation', 'ipython'] %}
{%- macro arguments(args) %}{% if args is string %}{{ args }}{% else %}{{ args | tojson }}{% endif %}{% endmacro %}
"""

_CHATML = _COMMON + r"""
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if system is not none %}
        {{- system + '\n\n' }}
    {%- endif %}
    {{- @QWEN_TOOLS_HEADER@ }}
    {%- for tool in tools %}
        {{- '\n' + ((tool if tool.function is defined else {'type': 'function', 'function': tool}) | tojson) }}
    {%- endfor %}
    {{- @QWEN_TOOLS_FOOTER@ + '<|im_end|>\n' }}
{%- elif system is not none %}
    {{- '<|im_start|>system\n' + system + '<|im_end|>\n' }}
{%- endif %}
{%- for m in chat %}
    {%- set prev = none if loop.first else chat[loop.index0 - 1] %}
    {%- set next = none if loop.last else chat[loop.index0 + 1] %}
    {%- if m.role == 'user' %}
        {{- '<|im_start|>user\n' + m.content + '<|im_end|>\n' }}
    {%- elif m.role == 'assistant' %}
        {%- set calls = m.tool_calls or [] %}
        {#- Qwen2.5: an answer's text and all its tool calls share one turn, one newline apart #}
        {%- if calls and not m.content and prev is not none and prev.role == 'assistant' %}
            {{- '\n' }}
        {%- else %}
            {{- '<|im_start|>assistant\n' }}
        {%- endif %}
        {%- if m.content or not calls %}
            {{- m.content or '' }}
            {%- if calls %}
                {{- '\n' }}
            {%- endif %}
        {%- endif %}
        {%- for call in calls %}
            {%- set f = call.function if call.function is defined else call %}
            {{- '<tool_call>\n{"name": ' + (f.name | tojson) + ', "arguments": ' }}
            {{- arguments(f.arguments) + '}\n</tool_call>' }}
            {%- if not loop.last %}
                {{- '\n' }}
            {%- endif %}
        {%- endfor %}
        {%- if not (next is not none and next.role == 'assistant' and next.tool_calls and not next.content) %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- elif m.role in results %}
        {#- consecutive tool results share one user turn #}
        {%- if prev is none or prev.role not in results %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + m.content + '\n</tool_response>' }}
        {%- if next is none or next.role not in results %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

_LLAMA3 = _COMMON + r"""
{%- macro header(role) %}{{ '<|start_header_id|>' + role + '<|end_header_id|>\n\n' }}{% endmacro %}
{{- '<|begin_of_text|>' }}
{%- if tools %}
    {#- Llama 3 has no tool format: with tools, Llama 3.1's #}
    {{- header('system') + @LLAMA31_SYSTEM_HEADER@ + ((system or '') | trim) + '<|eot_id|>' }}
    {%- if chat and chat[0].role == 'user' %}
        {{- header('user') + @LLAMA31_TOOLS_INTRO@ }}
        {%- for tool in tools %}
            {%- set tool = tool if tool.function is defined else {'type': 'function', 'function': tool} %}
            {{- (tool | tojson(indent=4)) + '\n\n' }}
        {%- endfor %}
        {{- (chat[0].content | trim) + '<|eot_id|>' }}
        {%- set chat = chat[1:] %}
    {%- endif %}
{%- elif system is not none %}
    {{- header('system') + (system | trim) + '<|eot_id|>' }}
{%- endif %}
{%- for m in chat %}
    {%- if m.role == 'assistant' %}
        {%- set calls = m.tool_calls or [] %}
        {%- if m.content or not calls %}
            {{- header('assistant') + ((m.content or '') | trim) + '<|eot_id|>' }}
        {%- endif %}
        {%- for call in calls %}
            {%- set f = call.function if call.function is defined else call %}
            {{- header('assistant') + '{"name": ' + (f.name | tojson) + ', "parameters": ' }}
            {{- arguments(f.arguments) + '}<|eot_id|>' }}
        {%- endfor %}
    {%- elif m.role == 'user' %}
        {{- header('user') + (m.content | trim) + '<|eot_id|>' }}
    {%- elif m.role in results %}
        {{- header('ipython') + (m.content | tojson) + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- header('assistant') }}
{%- endif %}
"""

_GLM_MESSAGES = r"""
{%- for m in chat %}
    {%- if m.role == 'assistant' %}
        {%- set calls = m.tool_calls or [] %}
        {%- if m.content or not calls %}
            {{- '<|assistant|>\n' + content(m.content or '') }}
        {%- endif %}
        {%- for call in calls %}
            {%- set f = call.function if call.function is defined else call %}
            {{- '<|assistant|>' + f.name + '\n' + call_body(f.arguments) }}
        {%- endfor %}
    {%- elif m.role == 'user' %}
        {{- '<|user|>\n' + content(m.content) }}
    {%- elif m.role in results %}
        {{- '<|observation|>\n' + content(m.content) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|assistant|>' }}
{%- elif chat and chat[-1].role == 'assistant' %}
    {#- a training sample hands the turn back after the last answer (GLM finetune demos) #}
    {{- @FINAL@ }}
{%- endif %}
"""

# content(text): a message's content, which chattune tokenizes on its own (`@PREFIX@`: see content_prefix)
_GLM_CONTENT = r"""
{%- macro content(text) %}{% if text %}{{ @PREFIX@ + text }}{% endif %}{% endmacro %}
"""

_GLM4 = _COMMON + _GLM_CONTENT + r"""
{%- macro call_body(args) %}{{ arguments(args) }}{% endmacro %}
{{- '[gMASK]<sop>' }}
{%- if tools %}
    {{- '<|system|>\n' + @GLM4_PERSONA@ + '\n\n# 可用工具' }}
    {%- for tool in tools %}
        {%- set f = tool.function if tool.function is defined else tool %}
        {{- '\n## ' + f.name + '\n\n' + (f | tojson(indent=4)) }}
        {{- '\n在调用上述函数时，请使用 Json 格式表示调用的参数。' }}
    {%- endfor %}
{%- endif %}
{%- if system %}
    {{- '<|system|>\n' + content(system) }}
{%- endif %}
""" + _GLM_MESSAGES

# ChatGLM3 writes a call as Python code: `tool_call(key=value, ...)`, each value as Python's repr. `([v] | string)`
# is str() of a one-item list, which is "[" + repr(v) + "]" in Python: jinja has no repr of its own.
# ChatGLM2: `build_prompt`'s rounds; the last answer is tokenized on its own (content) and ends with eos.
_CHATGLM2 = _COMMON + _GLM_CONTENT + r"""
{%- if system is not none or tools %}
    {{- raise_exception('ChatGLM2 has no system prompt and no tools') }}
{%- endif %}
{{- '[gMASK]sop' }}
{%- set ns = namespace(round=0) %}
{%- for m in chat %}
    {%- if m.role == 'user' %}
        {%- set ns.round = ns.round + 1 %}
        {{- '[Round ' + (ns.round | string) + ']\n\n问：' + m.content + '\n\n答：' }}
    {%- elif m.role == 'assistant' and not loop.last %}
        {{- m.content + '\n\n' }}
    {%- elif m.role == 'assistant' %}
        {{- content(m.content) + @FINAL@ }}
    {%- else %}
        {{- raise_exception('ChatGLM2 takes user and assistant turns only, not ' + m.role) }}
    {%- endif %}
{%- endfor %}
"""

# ChatGLM-6B: a lone question is the bare query, more rounds `[Round i]\n问：...\n答：...\n` from 0; `[gMASK]<sop>`
# follow the prompt, then the last answer (tokenized on its own) and `<eop>`.
_CHATGLM6B = _COMMON + _GLM_CONTENT + r"""
{%- if system is not none or tools %}
    {{- raise_exception('ChatGLM-6B has no system prompt and no tools') }}
{%- endif %}
{%- set ns = namespace(round=0, users=0) %}
{%- for m in chat %}
    {%- if m.role == 'user' %}
        {%- set ns.users = ns.users + 1 %}
    {%- endif %}
{%- endfor %}
{%- for m in chat %}
    {%- if m.role == 'user' and ns.users == 1 %}
        {{- m.content }}
    {%- elif m.role == 'user' %}
        {{- '[Round ' + (ns.round | string) + ']\n问：' + m.content + '\n答：' }}
        {%- set ns.round = ns.round + 1 %}
    {%- elif m.role == 'assistant' and not loop.last %}
        {{- m.content + '\n' }}
    {%- elif m.role == 'assistant' %}
        {{- '[gMASK]<sop>' + content(m.content) + @FINAL@ }}
    {%- else %}
        {{- raise_exception('ChatGLM-6B takes user and assistant turns only, not ' + m.role) }}
    {%- endif %}
{%- endfor %}
{%- if chat and chat[-1].role == 'user' %}
    {{- '[gMASK]<sop>' }}
{%- endif %}
"""

# TransNormerLLM: `{system}\n`, then `Human:\n...\nAssistant:\n` and each answer (tokenized on its own) with `</s>`.
_TRANSNORMER = _COMMON + _GLM_CONTENT + r"""
{%- if tools %}
    {{- raise_exception('TransNormerLLM has no tool format') }}
{%- endif %}
{%- if system is not none %}
    {{- system + '\n' }}
{%- endif %}
{%- for m in chat %}
    {%- if m.role == 'user' %}
        {{- 'Human:\n' + m.content + '\nAssistant:\n' }}
    {%- elif m.role == 'assistant' %}
        {{- content(m.content) + @FINAL@ }}
    {%- else %}
        {{- raise_exception('TransNormerLLM takes user and assistant turns only, not ' + m.role) }}
    {%- endif %}
{%- endfor %}
"""

_CHATGLM3 = _COMMON + _GLM_CONTENT + r"""
{%- macro call_body(args) %}
    {{- content('```python\ntool_call(') }}
    {%- for k, v in args.items() %}
        {{- k + '=' + ([v] | string)[1:-1] }}
        {%- if not loop.last %}
            {{- ', ' }}
        {%- endif %}
    {%- endfor %}
    {{- ')\n```' }}
{%- endmacro %}
{{- '[gMASK]sop' }}
{%- if tools %}
    {%- set ns = namespace(functions=[]) %}
    {%- for tool in tools %}
        {%- set ns.functions = ns.functions + [tool.function if tool.function is defined else tool] %}
    {%- endfor %}
    {{- '<|system|>\n' + content((system or @CHATGLM3_TOOLS_PROMPT@) + '\n' + (ns.functions | tojson(indent=4))) }}
{%- elif system is not none %}
    {{- '<|system|>\n' + content(system) }}
{%- endif %}
""" + _GLM_MESSAGES


def _fill(template: str, **constants: str) -> str:
    for name, value in constants.items():
        template = template.replace(f"@{name}@", json.dumps(value, ensure_ascii=False))
    assert not re.search(r"@[A-Z0-9_]+@", template), "a constant was left unfilled"
    return template.strip() + "\n"


def chat_template_jinja(template: Template, tokenizer=None) -> str:
    """The jinja chat template that renders, through `apply_chat_template`, exactly this template's text; for
    `auto`, the tokenizer's own template. `tokenizer` decides the GLM content prefix (see content_prefix)."""
    if isinstance(template, TokenizerTemplate):
        own = template.tokenizer.chat_template
        return own if isinstance(own, str) else own["default"]
    if template.name == "chatml":
        return _fill(_CHATML, QWEN_TOOLS_HEADER=QWEN_TOOLS_HEADER, QWEN_TOOLS_FOOTER=QWEN_TOOLS_FOOTER)
    if template.name == "llama3":
        return _fill(_LLAMA3, LLAMA31_SYSTEM_HEADER=LLAMA31_SYSTEM_HEADER, LLAMA31_TOOLS_INTRO=LLAMA31_TOOLS_INTRO)
    if template.name == "chatglm2":
        return _fill(_CHATGLM2, FINAL=template.eos, PREFIX=content_prefix(tokenizer))
    if template.name == "transnormer":
        return _fill(_TRANSNORMER, FINAL=template.eos, PREFIX=content_prefix(tokenizer))
    if template.name == "chatglm6b":
        return _fill(_CHATGLM6B, FINAL=template.eos, PREFIX=content_prefix(tokenizer))
    if isinstance(template, GLMTemplate) and template.name in ("glm4", "chatglm3"):
        prefix = content_prefix(tokenizer)
        if template.name == "glm4":
            return _fill(_GLM4, GLM4_PERSONA=GLM4_PERSONA, FINAL=template.final, PREFIX=prefix)
        return _fill(_CHATGLM3, CHATGLM3_TOOLS_PROMPT=CHATGLM3_TOOLS_PROMPT, FINAL=template.final, PREFIX=prefix)
    raise ConfigError(f"template `{template.name}` has no jinja form; use one of: auto, chatml, llama3, glm4, "
                      "chatglm3, chatglm2, chatglm6b, transnormer")


def write_template_files(folder: str | Path, template: Template, tokenizer) -> Path:
    """Write `chat_template.jinja` into a model/adapter folder (replacing the one `tokenizer.save_pretrained`
    wrote): transformers loads it in preference to any `chat_template` in tokenizer_config.json."""
    path = Path(folder) / CHAT_TEMPLATE_FILE
    atomic_write_text(path, chat_template_jinja(template, tokenizer))
    return path


def generation_config_eos(template: Template, tokenizer) -> list[int]:
    """The ids that end an answer: what `chattune chat` stops at."""
    return list(template.stop_tokens(tokenizer))


def write_generation_config(folder: str | Path, template: Template, tokenizer) -> Path:
    """Set `eos_token_id` in the folder's generation_config.json to the template's stop tokens, followed by any
    the file already listed (the base model's own, e.g. `<|endoftext|>`), keeping every other setting."""
    path = Path(folder) / GENERATION_CONFIG_FILE
    config = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    old = config.get("eos_token_id")
    old = old if isinstance(old, list) else [] if old is None else [old]
    config["eos_token_id"] = list(dict.fromkeys(generation_config_eos(template, tokenizer) + old))
    atomic_write_text(path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return path
