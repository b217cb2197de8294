"""Chat templates: a `Conversation` becomes a list of `Piece`s (text, trainable?).

One template object drives training (`pieces(conv)`), chat and serving (`pieces(conv, add_generation_prompt=True)`
and `stop_tokens`), so the model is prompted at inference exactly as it was trained.

- `auto` (default): the tokenizer's own jinja `chat_template`, split into prompt and answer by rendering
  prefixes of the conversation (see `TokenizerTemplate`, tokenizer.py).
- built-ins with exact strings: `chatml`, `chatglm6b`, `chatglm2`, `chatglm3`, `glm4`, `llama3`, `transnormer`.
  For the ChatGLM family and TransNormerLLM `auto`
  picks the family's built-in even when the tokenizer has a jinja template (see `get_template`).

Every trained assistant turn includes the token that stops generation (`<|im_end|>`, `<|eot_id|>`, the next
role token for GLM models, or the tokenizer's eos), so a tuned model learns to stop.

Each template also reads a generated answer back (`parse_assistant(text) -> (content, tool_calls)`), the exact
inverse of how it renders an assistant turn, so a server can return `tool_calls` in the model's own format.
Tool-call arguments are rendered the same way everywhere: a dict as `json.dumps(..., ensure_ascii=False)`, a
string as is (it is taken to be JSON text already, as OpenAI-style `arguments` are).

Layout: base.py holds the `Template` shape and the helpers several families share; one module per family
(chatml.py, llama3.py, glm.py for ChatGLM3 / GLM-4, chatglm.py for ChatGLM-6B / ChatGLM2, transnormer.py);
tokenizer.py the tokenizer's own template. This module is the registry (`BUILTIN`, `get_template`) and exports
every public name, so callers import from `chattune.data.templates`.
"""

from __future__ import annotations

from chattune.data.templates.base import Template, _has_token, parse_hermes
from chattune.data.templates.chatglm import ChatGLM2Template, ChatGLM6BTemplate
from chattune.data.templates.chatml import QWEN_TOOLS_FOOTER, QWEN_TOOLS_HEADER, ChatMLTemplate, hermes_call
from chattune.data.templates.glm import (
    CHATGLM3_TOOLS_PROMPT,
    GLM4_PERSONA,
    ChatGLM3Template,
    GLM4Template,
    GLMTemplate,
    glm_role,
)
from chattune.data.templates.llama3 import LLAMA31_SYSTEM_HEADER, LLAMA31_TOOLS_INTRO, Llama3Template
from chattune.data.templates.tokenizer import TokenizerTemplate
from chattune.data.templates.transnormer import TransNormerTemplate
from chattune.errors import ConfigError

__all__ = [
    "BUILTIN", "TEMPLATE_NAMES", "get_template", "glm_family",
    "Template", "TokenizerTemplate", "ChatMLTemplate", "Llama3Template", "GLMTemplate", "ChatGLM3Template",
    "GLM4Template", "ChatGLM2Template", "ChatGLM6BTemplate", "TransNormerTemplate",
    "CHATGLM3_TOOLS_PROMPT", "GLM4_PERSONA", "LLAMA31_SYSTEM_HEADER", "LLAMA31_TOOLS_INTRO", "QWEN_TOOLS_FOOTER",
    "QWEN_TOOLS_HEADER", "glm_role", "hermes_call", "parse_hermes",
]


BUILTIN = {"chatml": ChatMLTemplate, "chatglm6b": ChatGLM6BTemplate, "chatglm2": ChatGLM2Template,
           "chatglm3": ChatGLM3Template, "glm4": GLM4Template, "llama3": Llama3Template,
           "transnormer": TransNormerTemplate}
TEMPLATE_NAMES = ("auto", *BUILTIN)


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
        return _chosen(TokenizerTemplate(tokenizer, extra_stop_ids), "template=auto: the tokenizer's chat_template")
    families = {"chatglm": "chatglm3", "glm4": "glm4", "glm": "glm4", "llama": None, "qwen2": "chatml"}
    family = families.get(model_type or "")
    if family:
        return _chosen(BUILTIN[family](), f"template=auto: no chat_template; model_type {model_type}")
    raise ConfigError("the tokenizer has no chat_template; choose one: template=" + "|".join(BUILTIN))


def _chosen(template: Template, why: str) -> Template:
    template.chosen_because = why
    return template
