"""Native folders for checkpoints whose own code no longer runs: ChatGLM2-6B, ChatGLM3-6B, GLM-4-9B-chat.

These checkpoints (`model_type: chatglm`) ship their model and tokenizer as remote code written for transformers
4.3x/4.4x, which fails under transformers 5 (`'ChatGLMConfig' object has no attribute 'max_length'`,
`_pad() got an unexpected keyword argument 'padding_side'`, `'DynamicCache' object is not subscriptable`). chattune
never runs that code. On first use the folder is converted once (models/families/glm.py: transformers' own
`GlmForCausalLM`; models/families/glm_tokenizer.py: a fast tokenizer with the official ids and chattune's exact
chat template) into the user cache, keyed by a fingerprint of the source files, and every command loads that
folder. `chattune convert SRC OUT` writes the same folder where the user wants it.

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
from chattune.outputs import atomic_folder

CONVERTER_VERSION = 1
MARKER = "chattune-native.json"
_SAMPLE = 64 * 1024
_WHOLE_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.model",
                "tokenizer.tiktoken", "special_tokens_map.json")


def family_of(folder: str | Path) -> str | None:
    """"glm" for a ChatGLM2/3 or GLM-4 checkpoint folder (chatglm layout), else None."""
    from chattune.models.families.glm import is_chatglm_layout

    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return "glm" if isinstance(config, dict) and is_chatglm_layout(config) else None


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
    from chattune.models.bundled import cache_dir

    folder = Path(folder).resolve()
    return cache_dir() / "native" / f"{folder.name}-{fingerprint(folder)[:16]}"


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


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


def write_native(src: Path, out: Path, log=print) -> Path:
    """Convert `src` into a new folder `out` (absent or empty): weights and config, tokenizer, chat template, and a
    generation_config.json that stops on every token the family's template stops on. Written next to `out` and
    renamed at the end, so `out` is complete or absent."""
    from chattune.data.templates import BUILTIN
    from chattune.models.families.glm import convert_folder
    from chattune.models.families.glm_tokenizer import convert_tokenizer, glm_tokenizer_kind

    src, out = Path(src), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelError(f"{out} already exists and is not an empty folder\nfix: choose another output folder")
    kind = glm_tokenizer_kind(src)
    if kind is None:
        raise ModelError(f"{src}: no ChatGLM2/ChatGLM3/GLM-4 tokenizer found (tokenizer.model or tokenizer.tiktoken "
                         "with tokenizer_config.json)\nfix: copy the tokenizer files that came with the model into it")
    with atomic_folder(out, "native") as tmp:
        convert_folder(src, tmp, log=lambda message: None)  # its line would name the staging folder, not `out`
        tokenizer = convert_tokenizer(src, tmp)
        _stop_on_the_template(tmp, tokenizer, BUILTIN[kind]())
        (tmp / MARKER).write_text(json.dumps(
            {"source": str(src.resolve()), "family": kind, "converter": CONVERTER_VERSION}, indent=2) + "\n")
    log(f"converted {src} ({kind}) to transformers' GlmForCausalLM and a fast tokenizer in {out}")
    return out


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
    """The converted folder for a ChatGLM2/3 or GLM-4 checkpoint, converting it once into the user cache."""
    src = Path(folder)
    out = cache_folder(src)
    if is_complete(out):
        return out
    with _lock(out.parent / f".{out.name}.lock"):
        if is_complete(out):  # another process converted it while this one waited
            return out
        if out.exists():
            shutil.rmtree(out)  # a conversion that stopped halfway (no marker)
        log(f"{src} is a ChatGLM-family checkpoint (model_type chatglm): converting it once to transformers' own "
            f"GlmForCausalLM and a fast tokenizer in {out}; its own Python files are never run")
        write_native(src, out, log)
    return out
