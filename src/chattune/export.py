"""`chattune export --adapter DIR --out DIR2`: turn a run's output into a plain Hugging Face model folder.

- LoRA / QLoRA adapter: load it on its (unquantized) base exactly as `chat` does, merge the adapter into the
  weights (`merge_and_unload`), and save the result in the base model's dtype with safetensors, the tokenizer and
  its chat template. `AutoModelForCausalLM.from_pretrained(DIR2)` loads it with no peft involved.
- P-tuning v2 (prefix) adapter: the prefix is extra key/value positions, not a change to any weight, so there
  is nothing to merge it into; the adapter folder is copied instead (load it with peft or `chattune chat`).
- A full model folder (method=freeze/full): there is nothing to merge; it is copied.

Every export gets a copy of the run's chattune.json with `"exported_from"`, so `chattune chat --model DIR2` uses
the template the model was trained with. Remote-code models get their *.py files, so `trust_remote_code=True`
loading works. The folder is written under a temporary name and renamed at the end: an interrupted export
leaves no half-written DIR2.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from chattune.data.template_files import write_generation_config, write_template_files
from chattune.errors import ModelError
from chattune.inference import load_tuned
from chattune.outputs import ADAPTER, ADAPTER_CONFIG, FULL_MODEL, TRAINING_ONLY_FILES, artefact_kind, atomic_folder, \
    read_info, write_info


def _prompt_learning(adapter_cfg: dict) -> bool:
    return adapter_cfg.get("peft_type") in ("PREFIX_TUNING", "P_TUNING", "PROMPT_TUNING")


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelError(f"--out {out} already exists and is not empty; choose a new folder or delete it first")


def _write_run_info(folder: Path, info: dict, source: Path, **extra) -> None:
    write_info(folder, {**info, "exported_from": str(source.resolve()), **extra})


def _copy_files(src: Path, dst: Path) -> None:
    """Top-level files only: checkpoint-N/ folders and training logs stay behind."""
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name not in TRAINING_ONLY_FILES and not f.name.startswith("."):
            shutil.copy2(f, dst / f.name)


def _copy_code(base: Path, dst: Path) -> list[str]:
    """A remote-code model's *.py files (modeling/configuration/tokenization), unless already saved."""
    copied = []
    if base.is_dir():
        for f in sorted(base.glob("*.py")):
            if not (dst / f.name).exists():
                shutil.copy2(f, dst / f.name)
                copied.append(f.name)
    return copied


def export(adapter_dir: str | Path, out_dir: str | Path, log=print, device: str = "cpu", dtype: str = "auto") -> Path:
    """`device` (--device): where the merge runs; `dtype` (--dtype): the merged model's saved dtype, `auto` the base
    model's own. Both only mean something where an adapter is merged: a copy is refused them."""
    src, out = Path(adapter_dir), Path(out_dir)
    if not src.is_dir():
        raise ModelError(f"--adapter {src}: no such folder")
    _check_out(out)
    _check_copy_options(src, device, dtype)
    with atomic_folder(out, "export") as tmp:  # out is absent or an empty folder (checked above)
        info = read_info(src)
        kind = artefact_kind(src)
        if kind == ADAPTER:
            adapter_cfg = json.loads((src / ADAPTER_CONFIG).read_text())
            if _prompt_learning(adapter_cfg):
                log(f"{src} is a P-tuning v2 (prefix) adapter: a prefix adds key/value positions to every layer "
                    "instead of changing weights, so it cannot be merged into the base model. Saving the adapter "
                    f"folder to {out} instead (load it with `chattune chat --adapter {out}` or peft)")
                _copy_files(src, tmp)
                _write_run_info(tmp, info, src, merged=False)
            else:
                _merge_lora(src, tmp, info, log, device, dtype)
        elif kind == FULL_MODEL:
            log(f"{src} is a full model (freeze/full fine-tuning): nothing to merge, copying it to {out}")
            _copy_files(src, tmp)
            if info:
                _write_run_info(tmp, info, src, full_model=True)
        else:
            raise ModelError(f"--adapter {src}: neither an adapter (adapter_config.json) nor a model (config.json); "
                             "point it at a chattune output_dir or a checkpoint-N folder in it")
    log(f"exported to {out}")
    return out


def _check_copy_options(src: Path, device: str, dtype: str) -> None:
    """--device / --dtype of an export that copies (a full model, a prefix adapter): nothing is computed or cast, so
    either is refused rather than ignored."""
    if device == "cpu" and dtype == "auto":
        return
    kind = artefact_kind(src)
    prefix = kind == ADAPTER and _prompt_learning(json.loads((src / ADAPTER_CONFIG).read_text()))
    if kind == FULL_MODEL or prefix:
        flag = f"--dtype {dtype}" if dtype != "auto" else f"--device {device}"
        what = "a P-tuning v2 (prefix) adapter" if prefix else "a full model"
        raise ModelError(f"{flag}: {src} is {what}, which export copies as it is (nothing is merged or cast); "
                         f"leave {flag.split()[0]} out")


def _merge_lora(src: Path, tmp: Path, info: dict, log, device: str = "cpu", dtype: str = "auto") -> None:
    import torch

    from chattune.hardware import decide_device_and_dtype, torch_dtype
    from chattune.models.load import model_folder

    where, _, _ = decide_device_and_dtype(device, "fp32")  # --device checked; the merge itself is in fp32
    log(f"loading {src} and its base model (fp32, on {where}) ...")
    tuned = load_tuned(adapter=str(src), dtype=torch.float32, log=log, device=where, quantize=False)
    spec = str(getattr(tuned.model.get_base_model().config, "_name_or_path", "") or "")
    base_path = model_folder(spec, info.get("revision")) or Path(spec)  # a hub id: its snapshot in the HF cache
    # Merge in fp32, then store in the base model's own dtype (a bf16 6B model stays 12 GB, not 24), or --dtype's.
    merged = tuned.model.merge_and_unload()
    saved = _saved_dtype(base_path) if dtype == "auto" else torch_dtype(dtype)
    if saved is not None and saved != torch.float32:
        merged = merged.to(saved)
    why = "the base model's dtype" if dtype == "auto" else f"--dtype {dtype}"
    log(f"merged the adapter into the base weights; saving ({str(saved or torch.float32).replace('torch.', '')}, "
        f"{why}) ...")
    merged.save_pretrained(str(tmp), safe_serialization=True)
    tuned.tokenizer.save_pretrained(str(tmp))
    write_template_files(tmp, tuned.template, tuned.tokenizer)  # prompts as chattune did, in any tool
    write_generation_config(tmp, tuned.template, tuned.tokenizer)  # and stops where `chattune chat` stops
    code = _copy_code(base_path, tmp) if info.get("trust_remote_code") or list(tmp.glob("*.py")) else []
    if code:
        log(f"copied the model's code: {', '.join(code)} (load with trust_remote_code=True)")
    _write_run_info(tmp, info, src, full_model=True, merged=True)


def _saved_dtype(base_path: Path):
    import torch

    try:
        config = json.loads((base_path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    name = config.get("dtype") or config.get("torch_dtype")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(name)
