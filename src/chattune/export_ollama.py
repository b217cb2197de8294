"""The Ollama `Modelfile` written beside an exported GGUF file (`chattune export --format gguf`).

Ollama does not run a GGUF file's jinja chat template: a Modelfile's `TEMPLATE` is a Go template over `.System` (the
system messages, joined) and `.Messages` (each with `.Role` and `.Content`), and `PARAMETER stop` names the strings
generation stops at. chattune writes the TEMPLATE for its text templates by hand here (Go templates are not jinja;
nothing converts one into the other), so that Ollama renders a conversation of system, user and assistant messages
to exactly the text chattune trains on and prompts with:
- chatml: `<|im_start|>{role}\\n{content}<|im_end|>\\n`, then `<|im_start|>assistant\\n`;
- llama3: `<|begin_of_text|>`, `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`, then the
  assistant header (chattune strips each message's leading and trailing whitespace, which Go templates cannot:
  a message sent with such whitespace is rendered with it);
- glm4: `[gMASK]<sop>`, `<|{role}|>\\n{content}`, then `<|assistant|>`.
`template=auto` (the model's own jinja) gets the TEMPLATE of the built-in it renders the same as, found by rendering
both on sample conversations, and a `SYSTEM` line where the model's template inserts a default system prompt (as
SmolLM2's and Qwen2.5's do; Ollama inserts a Modelfile's SYSTEM where a request has none). Any other template
(ChatGLM2/3, ChatGLM-6B, TransNormerLLM, a jinja unlike every built-in) gets no TEMPLATE, with a comment line saying
why: the GGUF file still carries the exact jinja for llama.cpp. Tools, tool calls and tool results are not in these
TEMPLATEs: Ollama writes tool arguments with Go's JSON encoder (keys sorted, no spaces), which differs from chattune's.
"""

from __future__ import annotations

from pathlib import Path

from chattune.outputs import atomic_write_text

_OLLAMA = {
    "chatml": (
        "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        "{{- range .Messages }}{{ if eq .Role \"user\" \"assistant\" }}<|im_start|>{{ .Role }}\n{{ .Content }}"
        "<|im_end|>\n{{ end }}{{ end }}<|im_start|>assistant\n"),
    "llama3": (
        "<|begin_of_text|>{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>"
        "{{ end }}{{ range .Messages }}{{ if eq .Role \"user\" \"assistant\" }}<|start_header_id|>{{ .Role }}"
        "<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}{{ end }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "glm4": (
        "[gMASK]<sop>{{ if .System }}<|system|>\n{{ .System }}{{ end }}{{ range .Messages }}"
        "{{ if eq .Role \"user\" \"assistant\" }}<|{{ .Role }}|>\n{{ .Content }}{{ end }}{{ end }}<|assistant|>"),
}
_NOTES = {"llama3": "chattune strips leading/trailing whitespace of each message; this TEMPLATE cannot (Go templates "
                    "have no trim)"}
_MARK = "\ue000"  # a private-use character that stands for the system prompt while matching templates
_PROBES = (
    [{"role": "user", "content": "Hi there"}],
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Name a colour.\nOne word."}],
)


def modelfile_text(gguf_file: str, template, tokenizer) -> tuple[str, str | None]:
    """(the Modelfile, None) or (a Modelfile without TEMPLATE, why not)."""
    stops = [tokenizer.convert_ids_to_tokens(i) for i in template.stop_tokens(tokenizer)]
    lines = ["# chattune export --format gguf: the model, with the prompt format and stop tokens chattune trained it "
             "with", f"FROM ./{gguf_file}"]
    family, system, why = ollama_family(template, tokenizer)
    if family is None:
        lines.append(f"# No TEMPLATE: {why}")
    else:
        if family in _NOTES:
            lines.append(f"# Note: {_NOTES[family]}.")
        lines.append(f'TEMPLATE """{_OLLAMA[family]}"""')
        if system is not None:
            lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{_quoted(s)}"' for s in stops]
    return "\n".join(lines) + "\n", why


def write_modelfile(folder: Path, gguf_file: str, template, tokenizer, log=print) -> Path:
    text, why = modelfile_text(gguf_file, template, tokenizer)
    if why:
        log(f"note: the Modelfile has no TEMPLATE: {why}")
    path = Path(folder) / "Modelfile"
    atomic_write_text(path, text)
    return path


def _quoted(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')


def ollama_family(template, tokenizer) -> tuple[str | None, str | None, str | None]:
    """(built-in whose Ollama TEMPLATE renders like `template`, its default system prompt or None, None), or
    (None, None, the reason there is none)."""
    from chattune.data.templates import BUILTIN, TokenizerTemplate

    if not isinstance(template, TokenizerTemplate):
        if template.name in _OLLAMA:
            return template.name, None, None
        return None, None, (f"chattune's `{template.name}` template has no Ollama (Go template) form here; the GGUF "
                            "file carries its exact jinja (tokenizer.chat_template) for llama.cpp")
    for name in _OLLAMA:
        matched, system = _renders_like(template, BUILTIN[name](), tokenizer)
        if matched:
            return name, system, None
    return None, None, ("the model's own chat template renders unlike chattune's chatml, llama3 and glm4 templates, "
                        "so it has no Ollama form here; the GGUF file carries it (tokenizer.chat_template) for "
                        "llama.cpp")


def _render(jinja: str, tokenizer, messages: list[dict]) -> str | None:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             chat_template=jinja)
    except Exception:  # noqa: BLE001 - a template that refuses a sample conversation is simply not a match
        return None


def _renders_like(own, builtin, tokenizer) -> tuple[bool, str | None]:
    """Whether the model's template renders every sample conversation like `builtin` (with a system prompt, and
    without one, where it may insert a default: returned as the second value)."""
    from chattune.data.template_files import chat_template_jinja

    mine, theirs = chat_template_jinja(own, tokenizer), chat_template_jinja(builtin, tokenizer)
    default = None
    bare = _render(mine, tokenizer, list(_PROBES[0]))
    if bare != _render(theirs, tokenizer, list(_PROBES[0])):
        framed = _render(theirs, tokenizer, [{"role": "system", "content": _MARK}, *_PROBES[0]])
        if bare is None or framed is None or framed.count(_MARK) != 1:
            return False, None
        head, tail = framed.split(_MARK)
        if not (bare.startswith(head) and bare.endswith(tail) and len(bare) >= len(head) + len(tail)):
            return False, None
        default = bare[len(head):len(bare) - len(tail)]
    for probe in _PROBES:
        for system in ("You are terse.", None):
            given = [{"role": "system", "content": system}] if system else []
            used = [{"role": "system", "content": system or default}] if (system or default is not None) else []
            if _render(mine, tokenizer, given + probe) != _render(theirs, tokenizer, used + probe) \
                    or _render(mine, tokenizer, given + probe) is None:
                return False, None
    return True, default
