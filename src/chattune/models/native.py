"""Native folders for checkpoints whose own code no longer runs: the seed models' families.

- "glm": ChatGLM2-6B, ChatGLM3-6B, GLM-4-9B-chat (`model_type: chatglm`, the ChatGLM2 layout) become transformers'
  own `GlmForCausalLM` (models/families/glm.py; weights rewritten) and a fast tokenizer
  (models/families/glm_tokenizer.py).
- "chatglm6b": ChatGLM-6B (GLM v1, `model_type: chatglm` with `position_encoding_2d`) runs as chattune's own
  `ChatGLM6BForCausalLM` (models/families/chatglm6b.py), its weights as published (linked, not rewritten), and
  its `ice_text.model` tokenizer as a fast tokenizer (models/families/chatglm6b_tokenizer.py).
- "transnormer": TransNormerLLM (`model_type: transnormer`) runs as chattune's own `TransnormerForCausalLM`
  (models/families/transnormer.py; pure torch, no triton), its weights as published, its Baichuan-style
  SentencePiece tokenizer as a fast tokenizer (models/families/transnormer_tokenizer.py).

These checkpoints ship their model and tokenizer as remote code written for transformers 4.2x-4.4x, which fails
under transformers 5 (`'ChatGLMConfig' object has no attribute 'max_length'`, `_pad() got an unexpected keyword
argument 'padding_side'`, `'DynamicCache' object is not subscriptable`, `'property' object cannot be interpreted as
an integer`). chattune never runs that code. On first use the folder is converted once into the user cache, keyed
by a fingerprint of the source files, and every command loads that folder. `chattune convert SRC OUT` writes the
same folder where the user wants it (weights copied there, not linked).

The fingerprint reads config.json, the tokenizer and generation files whole and, of each weight file, its name,
size and three 64 KiB samples (start, middle, end): hashing a 9B checkpoint whole would cost a minute at every
start, and a re-downloaded or edited shard changes its header (at the start) or its size. The converter's version
is part of it, so a fixed converter converts again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path

from chattune.errors import ModelError
from chattune.models.families import OWN
from chattune.outputs import atomic_folder

CONVERTER_VERSION = 1
MARKER = "chattune-native.json"
_SAMPLE = 64 * 1024
_WHOLE_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.model",
                "tokenizer.tiktoken", "ice_text.model", "special_tokens_map.json")
# what each family runs as (log lines, convert's help)
RUNS_AS = {"glm": "transformers' GlmForCausalLM", "chatglm6b": "chattune's ChatGLM6BForCausalLM",
           "transnormer": "chattune's TransnormerForCausalLM"}
NAMES = {"glm": "ChatGLM2/ChatGLM3/GLM-4", "chatglm6b": "ChatGLM-6B", "transnormer": "TransNormerLLM"}
LINKED = tuple(OWN)  # families with chattune's own model code: the cached folder links their published weights


def family_of_config(config: dict) -> str | None:
    """The family of a published config.json dict (see the module note), or None."""
    from chattune.models.families.glm import V1_FIELDS, is_chatglm_layout

    if not isinstance(config, dict):
        return None
    if is_chatglm_layout(config):
        return "glm"
    if config.get("model_type") == "chatglm" and any(f in config for f in V1_FIELDS):
        return "chatglm6b"
    if config.get("model_type") == "transnormer":
        return "transnormer"
    return None


def family_of(folder: str | Path) -> str | None:
    """The family of a checkpoint folder chattune runs natively (see the module note), else None."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return family_of_config(config)


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and (p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json")))


def fingerprint(folder: str | Path) -> str:
    """A hex digest that changes when the checkpoint's config, tokenizer or weights change (see the module note)."""
    folder = Path(folder)
    h = hashlib.sha256(f"chattune-native {CONVERTER_VERSION}\n".encode())
    for name in _WHOLE_FILES:
        path = folder / name
        if path.is_file():
            h.update(f"{name}\n".encode())
            h.update(path.read_bytes())
    for path in _weight_files(folder):
        size = path.stat().st_size
        h.update(f"{path.name} {size}\n".encode())
        with open(path, "rb") as f:
            for offset in sorted({0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)}):
                f.seek(offset)
                h.update(f.read(_SAMPLE))
    return h.hexdigest()


def cache_folder(folder: str | Path) -> Path:
    """The cache folder for a checkpoint. Families whose converted folder links the published weights (ChatGLM-6B,
    TransNormerLLM) also key on the checkpoint's place: an identical copy elsewhere gets its own links."""
    from chattune.models.bundled import cache_dir

    folder = Path(folder).resolve()
    key = fingerprint(folder)
    if family_of(folder) in LINKED:
        key = hashlib.sha256(f"{key}\n{folder}".encode()).hexdigest()
    return cache_dir() / "native" / f"{folder.name}-{key[:16]}"


def is_complete(folder: Path) -> bool:
    """Converted to the end, and every linked weight file still there (a moved or deleted checkpoint converts
    again rather than failing to load)."""
    if not (folder / MARKER).is_file():
        return False
    return all(p.exists() for p in folder.iterdir() if p.is_symlink())


@contextlib.contextmanager
def _lock(path: Path):
    """One conversion at a time per cache folder, across processes (torchrun's ranks all resolve the model)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_native(src: Path, out: Path, log=print, link: bool = False) -> Path:
    """Convert `src` into a new folder `out` (absent or empty): weights and config, tokenizer, chat template, and a
    generation_config.json that stops on every token the family's template stops on. Written next to `out` and
    renamed at the end, so `out` is complete or absent. `link`: weights a family uses as published are symbolic
    links to `src`'s files (the user cache) rather than copies (`chattune convert`)."""
    src, out = Path(src), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelError(f"{out} already exists and is not an empty folder\nfix: choose another output folder")
    family = family_of(src)
    if family in LINKED:
        kind = _write_own(family, src, out, link)
    else:
        kind = _write_glm(src, out)
    log(f"converted {src} ({kind}) to {RUNS_AS[family]} and a fast tokenizer in {out}")
    return out


def _write_glm(src: Path, out: Path) -> str:
    from chattune.data.templates import BUILTIN
    from chattune.models.families.glm import convert_folder
    from chattune.models.families.glm_tokenizer import convert_tokenizer, glm_tokenizer_kind

    kind = glm_tokenizer_kind(src)
    if kind is None:
        raise ModelError(f"{src}: no ChatGLM2/ChatGLM3/GLM-4 tokenizer found (tokenizer.model or tokenizer.tiktoken "
                         "with tokenizer_config.json)\nfix: copy the tokenizer files that came with the model into it")
    with atomic_folder(out, "native") as tmp:
        convert_folder(src, tmp, log=lambda message: None)  # its line would name the staging folder, not `out`
        tokenizer = convert_tokenizer(src, tmp)
        _stop_on_the_template(tmp, tokenizer, BUILTIN[kind]())
        _mark(tmp, src, kind)
    return kind


def _write_own(family: str, src: Path, out: Path, link: bool) -> str:
    """A family chattune has its own model code for: the config under chattune's model type, the published weight
    files as they are, the converted tokenizer with the family's template, a generation_config that stops on it."""
    from transformers import GenerationConfig

    from chattune.data.template_files import chat_template_jinja
    from chattune.data.templates import BUILTIN
    from chattune.models.families.glm_tokenizer import save_tokenizer

    own = OWN[family]
    published = json.loads((src / "config.json").read_text(encoding="utf-8"))
    try:
        config = own.model_code.config_from_published(published)
    except ValueError as e:
        raise ModelError(f"{src}/config.json: {e}\nfix: {own.fix}") from None
    if not own.has_tokenizer(src):
        raise ModelError(f"{src}: no {NAMES[family]} tokenizer found ({own.tokenizer_file} with "
                         "tokenizer_config.json)\nfix: copy the tokenizer files that came with the model into it")
    weights = _weight_files(src)
    if not any(p.suffix in (".bin", ".safetensors") for p in weights):
        raise ModelError(f"{src}: no weight files (*.bin, *.safetensors)\nfix: download the weights into it")
    template = BUILTIN[family]()
    with atomic_folder(out, "native") as tmp:
        config.save_pretrained(tmp)
        for path in weights:
            if link:
                (tmp / path.name).symlink_to(path.resolve())
            else:
                shutil.copy2(path, tmp / path.name)
        fast = own.tokenizer_code.build_fast_tokenizer(src)
        tokenizer = save_tokenizer(fast, tmp, chat_template_jinja(template, fast))
        generation = src / "generation_config.json"
        if generation.is_file():  # the publisher's sampling defaults (TransNormerLLM: do_sample, temperature, ...)
            shutil.copy2(generation, tmp / generation.name)
        else:
            GenerationConfig.from_model_config(config).save_pretrained(tmp)
        _stop_on_the_template(tmp, tokenizer, template)
        _mark(tmp, src, family)
    return family


def _mark(folder: Path, src: Path, kind: str) -> None:
    (folder / MARKER).write_text(json.dumps(
        {"source": str(src.resolve()), "family": kind, "converter": CONVERTER_VERSION}, indent=2) + "\n")


def _stop_on_the_template(folder: Path, tokenizer, template) -> None:
    """ChatGLM3's config lists only `</s>`, yet its chat stops on `<|user|>` and `<|observation|>` too; the
    exported folder's generation_config says every stop token, so other runtimes (vLLM, llama.cpp) stop there."""
    from transformers import GenerationConfig

    gen = GenerationConfig.from_pretrained(folder)
    eos = gen.eos_token_id
    ids = ([eos] if isinstance(eos, int) else list(eos or [])) + list(template.stop_tokens(tokenizer))
    gen.eos_token_id = list(dict.fromkeys(ids))
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    gen.save_pretrained(folder)


def ensure_native(folder: str | Path, log=print) -> Path:
    """The converted folder for a checkpoint of a native family, converting it once into the user cache."""
    src = Path(folder)
    out = cache_folder(src)
    if is_complete(out):
        return out
    with _lock(out.parent / f".{out.name}.lock"):
        if is_complete(out):  # another process converted it while this one waited
            return out
        if out.exists():
            shutil.rmtree(out)  # a conversion that stopped halfway (no marker)
        family = family_of(src)
        log(f"{src} is a {NAMES[family]} checkpoint: converting it once to {RUNS_AS[family]} and a fast tokenizer "
            f"in {out}; its own Python files are never run")
        write_native(src, out, log, link=True)
    return out
