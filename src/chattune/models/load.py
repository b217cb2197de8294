"""Load a base model and its tokenizer from a local folder, a hub id (if cached/reachable) or `bundled`.

A model that cannot be used is a `ModelError` naming the path and the fix, raised before any work starts: a
missing folder, a folder without config.json or weights, a config.json that is not JSON, a truncated or corrupt
safetensors file, a tokenizer with more tokens than the model's embedding matrix has rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from chattune.errors import ModelError, remote_code_failure
from chattune.models import native
from chattune.models.families import register_all

register_all()  # chattune's own model types (a converted ChatGLM-6B folder) load through the Auto classes

CONFIG = "config.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
FIX_FILES = "fix: re-download the model (or re-export it with `chattune export`) into that folder"


def resolve_model_path(spec: str, log=print, revision: str | None = None) -> str:
    """`bundled` -> the cached HF folder of the default model; a local folder must hold a readable config.json;
    anything else is a hub id, used when it is in the Hugging Face cache (or, as org/name, reachable), at
    `revision` (model.revision: a branch, tag or commit) where given."""
    if revision and (spec in ("bundled", "", None) or Path(spec).expanduser().exists()):
        from chattune.errors import ConfigError

        raise ConfigError(f"model.revision={revision} names a revision of a hub model, but model={spec or 'bundled'} "
                          "is not a hub id\nfix: check that revision out into the folder (or give model=org/name), "
                          "and leave model.revision out")
    if spec in ("bundled", "", None):
        from chattune.models.bundled import ensure_bundled_model

        return str(ensure_bundled_model(log))
    path = Path(spec).expanduser()
    if path.is_file():
        raise ModelError(f"model={spec} is a file; point model= at the folder that holds config.json and the "
                         "weights (or use `bundled`)")
    if path.is_dir():
        read_config(path)
        return _native(path, log) or str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or ("/" not in spec and not _in_hub_cache(spec,
                                                                                                     revision)):
        raise ModelError(f"model folder {spec} not found (not a folder here, nor a model in the Hugging Face "
                         "cache)\nfix: check model= (a folder, a hub id such as org/name, or `bundled`)")
    cached = _hub_snapshot(spec, revision)
    converted = _native(cached, log) if cached is not None else None
    if converted:
        return converted
    return spec  # a hub id: transformers resolves it from the local HF cache (or the hub, where reachable)


def model_folder(spec: str, revision: str | None = None) -> Path | None:
    """The local folder that holds a model's files (config.json, weights, any *.py of its own code): `spec` itself
    where it is a folder, a hub id's snapshot in the Hugging Face cache (at `revision`; nothing is downloaded), else
    None. For what `resolve_model_path` returned: it keeps a hub id as the id, for transformers to resolve."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    return _hub_snapshot(spec, revision) if spec and not spec.startswith((".", "/", "~")) else None


def _native(folder: Path, log) -> str | None:
    """A checkpoint of a seed family whose remote code no longer runs (ChatGLM-6B, ChatGLM2/3, GLM-4) -> its
    converted native folder, made once (models/native.py); None for any other folder."""
    family = native.family_of(folder)
    if family is None:
        return None
    out = native.ensure_native(folder, log)
    log(f"model: {folder} runs as {native.RUNS_AS[family]} from its converted folder {out} (its own code is "
        "never run, so model.trust_remote_code is not needed)")
    return str(out)


def _hub_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The local folder of a hub model already in the Hugging Face cache, or None (nothing is downloaded)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or not a valid id): transformers reports it when loading
        return None


def _in_hub_cache(repo_id: str, revision: str | None = None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, CONFIG, revision=revision), str)
    except Exception:  # noqa: BLE001 - an invalid repo id is simply not cached
        return False


def read_config(folder: str | Path) -> dict:
    """config.json of a local model folder, or ModelError saying what is wrong with it."""
    file = Path(folder) / CONFIG
    if not file.is_file():
        hint = (" (it looks like an adapter: use it with --adapter / as a run's output)"
                if (Path(folder) / "adapter_config.json").is_file() else "")
        raise ModelError(f"model folder {folder} has no {CONFIG}{hint}\nfix: point model= at a Hugging Face model "
                         "folder (config.json, weights and tokenizer files), or use `bundled`")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ModelError(f"{file}: not a text file (corrupt?)\n{FIX_FILES}") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{file}: not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})\n{FIX_FILES}") from None
    if not isinstance(config, dict):
        raise ModelError(f"{file}: expected a JSON object, got {type(config).__name__}\n{FIX_FILES}")
    if "model_type" not in config:
        raise ModelError(f"{file}: no `model_type` key, so the architecture is unknown\n{FIX_FILES}")
    return config


def check_weights(folder: str | Path) -> None:
    """The folder holds weights, and every safetensors file is complete (see `check_safetensors`)."""
    folder = Path(folder)
    present = [name for name in WEIGHT_FILES if (folder / name).is_file()]
    shards = sorted(folder.glob("*.safetensors"))
    if not present and not shards:
        held = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise ModelError(f"model folder {folder} has no weights: expected model.safetensors (or "
                         f"model.safetensors.index.json with its shards, or pytorch_model.bin); it holds {held}\n"
                         f"{FIX_FILES}")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise ModelError(f"{index}: not a valid weight index (JSON with a `weight_map`)\n{FIX_FILES}") from None
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise ModelError(f"{index} lists shards that are missing: {', '.join(missing)}\n{FIX_FILES}")
    for shard in shards:
        check_safetensors(shard)


def check_safetensors(file: str | Path) -> None:
    """A safetensors file is an 8-byte header length, a JSON header giving each tensor's byte range, then the data.
    Written by hand because the safetensors library reports a cut file as "incomplete metadata, file not fully
    covered" without naming the file; this reads only the header and compares the sizes."""
    file = Path(file)
    size = file.stat().st_size
    problem = None
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or n > size - 8:
            problem = f"{size} bytes, too short for its own header"
        else:
            try:
                header = json.loads(f.read(n))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            except (ValueError, KeyError, TypeError, IndexError, AttributeError):
                header, problem = None, "its header is not valid safetensors JSON"
            if header is not None and size < 8 + n + end:
                problem = f"{size} bytes, its header describes {8 + n + end}"
    if problem:
        raise ModelError(f"{file}: file is truncated or corrupt ({problem}): re-download/re-export it\n{FIX_FILES}")


def config_vocab_size(config: dict) -> int | None:
    """Rows of the input embedding matrix as config.json declares them (GLM calls it padded_vocab_size)."""
    for source in (config, config.get("text_config") or {}):
        for key in ("vocab_size", "padded_vocab_size"):
            if isinstance(source.get(key), int):
                return source[key]
    return None


def _revision(path: str, revision: str | None) -> dict:
    """from_pretrained's `revision=` for a hub id; a local folder (a converted or cached one) has no revisions."""
    return {"revision": revision} if revision and not Path(path).is_dir() else {}


def load_tokenizer(path: str, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code,
                                            **_revision(path, revision))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        folder = Path(path)
        if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
            raise ModelError(f"model folder {path} has no tokenizer files (tokenizer.json, tokenizer_config.json, "
                             "tokenizer.model)\nfix: copy the tokenizer files that came with the model into it") from None
        raise _load_error(path, e, revision) from None
    if Path(path, CONFIG).is_file():
        rows = config_vocab_size(read_config(path))
        if rows is not None and len(tok) > rows:
            raise ModelError(f"the tokenizer in {path} has {len(tok)} tokens, but the model's embedding matrix has "
                             f"{rows} rows (config.json vocab_size): token ids past {rows - 1} would crash or "
                             "train garbage; the tokenizer belongs to another model\nfix: use the tokenizer files "
                             "that came with the model")
    if tok.pad_token is None:
        # Safe because labels never depend on the pad id (see data/encode.py).
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    return tok


def load_model(path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
               attn_implementation: str | None = None, revision: str | None = None, **kwargs):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    if Path(path).is_dir():
        read_config(path)
        check_weights(path)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    kwargs.update(_revision(path, revision))
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise _load_error(path, e, revision) from None
    except RuntimeError as e:  # config.json and the weights disagree on a shape
        if "mismatch" not in str(e):
            raise
        example = _first_shape_mismatch(path, trust_remote_code)
        raise ModelError(f"cannot load model from {path}: config.json does not match the weights"
                         + (f" ({example})" if example else " (tensor shapes differ)")
                         + "\nfix: use the config.json that came with these weights (or re-download the model)") from None
    return model


def _safetensors_shapes(file: Path) -> dict[str, list[int]]:
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def _first_shape_mismatch(path: str, trust_remote_code: bool) -> str | None:
    """`name: [a, b] in the weights, [c, d] by config.json` for the first tensor whose shapes differ (transformers
    only points at a report it printed). The model is built on the meta device: no memory, no weights read."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        stored: dict[str, list[int]] = {}
        for file in sorted(Path(path).glob("*.safetensors")):
            stored.update(_safetensors_shapes(file))
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        for name, tensor in model.state_dict().items():
            if name in stored and list(tensor.shape) != stored[name]:
                return f"{name}: {stored[name]} in the weights, {list(tensor.shape)} by config.json"
    except Exception:  # noqa: BLE001 - only a better message is lost
        return None
    return None


def _load_error(path: str, e: Exception, revision: str | None = None) -> ModelError:
    failure = remote_code_failure(e)
    if failure is not None:
        return failure
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    if "trust_remote_code" in text:
        return ModelError(f"model {path} ships its own code; if you trust it, set model.trust_remote_code=true")
    if not Path(path).exists():
        at = f" --revision {revision}" if revision else ""
        return ModelError(f"cannot load model {path!r}{f' at revision {revision}' if revision else ''}: not a local "
                          f"folder and not in the Hugging Face cache ({first}).\nfix: download it first "
                          f"(`hf download {path}{at}`) or give a local folder: model=PATH")
    return ModelError(f"cannot load model from {path}: {first}\n{FIX_FILES}")


def model_type(path: str) -> str | None:
    try:
        return json.loads((Path(path) / CONFIG).read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def generation_stop_ids(model) -> list[int]:
    """eos ids the model's generation_config declares (some models stop on several tokens)."""
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)
