"""Several LoRA adapters on one served base: `chattune serve --lora NAME=DIR` (repeatable).

The models a request can name are the server's own (`--adapter`'s or `--model`'s, what a request without `model`
gets), the base on its own where that is an adapter, and each `--lora` adapter under its NAME. They share one copy
of the base's weights: peft loads the adapters into one PeftModel (`from_pretrained(..., adapter_name=NAME)` for
the first, `load_adapter` for the others), and each row of a batch runs with its own adapter through peft's
`adapter_names` (serve/engine.py). Each adapter keeps its run's template and stop tokens.

Only LoRA adapters can share a base this way: a P-tuning v2 prefix is fed as the model's cache (one per batch), a
Freeze or full run is a whole model of its own, DoRA is refused by peft's mixed-batch forward, and an adapter trained
on a 4-/8-bit base (QLoRA) needs the base loaded that way. Each is refused with the reason before the base loads;
an adapter trained on another base is refused naming both bases once it has loaded.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from chattune.errors import ConfigError, ModelError
from chattune.inference import Tuned
from chattune.models.decode_step import base_model
from chattune.outputs import ADAPTER_CONFIG, FULL_MODEL, NOT_A_MODEL, artefact_kind, read_info

BASE = "__base__"  # peft's name for "no adapter" in `adapter_names`
DEFAULT = "default"  # the peft name load_tuned gives an `--adapter` folder's adapter
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass
class Served:
    """One model a request can name: its id, the Tuned it runs as (the shared weights with its own tokenizer,
    template and chattune.json), its peft adapter (None: one model is served, run as loaded) and the id of the base
    it adapts (None for a base)."""
    id: str
    tuned: Tuned
    adapter: str | None = None
    parent: str | None = None


def served_alone(name: str, tuned: Tuned) -> list[Served]:
    """A server of one model, as before `--lora`: the model runs as it was loaded."""
    return [Served(name, tuned)]


def parse_lora(specs: list[str]) -> list[tuple[str, Path]]:
    """`--lora NAME=DIR` items as (NAME, DIR); one-line errors for a bad form, name or a repeated name."""
    out: list[tuple[str, Path]] = []
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not folder:
            raise ConfigError(f"--lora {spec}: give it as NAME=DIR (a name requests use as `model`, then a LoRA run's "
                              "output_dir)")
        if not NAME.fullmatch(name):
            raise ConfigError(f"--lora {spec}: {name!r} is not a plain id; use letters, digits, '.', '_' and '-' "
                              "(up to 64, starting with a letter or digit)")
        if any(name == seen for seen, _ in out):
            raise ConfigError(f"--lora {name}= is given twice; give each adapter its own name")
        out.append((name, Path(folder)))
    return out


def check_lora_folder(name: str, folder: Path) -> dict:
    """The folder's adapter_config.json, once it is known to be a chattune LoRA run (or checkpoint) that can share
    a base: every other kind refused with the reason. Cheap: nothing loads."""
    where = f"--lora {name}={folder}"
    kind = artefact_kind(folder)
    if kind == NOT_A_MODEL:
        what = "no such folder" if not folder.is_dir() else f"no {ADAPTER_CONFIG} in it"
        raise ModelError(f"{where}: {what}; point it at a LoRA run's output_dir (or a checkpoint-N in it)")
    if kind == FULL_MODEL:
        raise ModelError(f"{where}: a whole model (a Freeze or full run, an export), not a LoRA adapter that can "
                         "share the served base; serve it on its own with --model")
    adapter_cfg = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    peft_type = adapter_cfg.get("peft_type")
    if peft_type != "LORA":
        raise ModelError(f"{where}: a {peft_type} adapter (P-tuning v2), not LoRA: peft feeds a prefix as the "
                         "model's cache, which cannot differ between the rows of a batch; serve it on its own with "
                         "--adapter")
    if adapter_cfg.get("use_dora"):
        raise ModelError(f"{where}: a DoRA adapter; peft's mixed-batch forward (adapter_names) refuses DoRA, so it "
                         "cannot share the base with other models; serve it on its own with --adapter")
    if not read_info(folder):
        raise ModelError(f"{where}: not a chattune run (no chattune.json), so its base model and template are "
                         "unknown; give a chattune LoRA run's output_dir")
    from chattune.methods.lora import refuse_unloadable

    refuse_unloadable(folder, adapter_cfg)
    return adapter_cfg


def recorded_base_bits(folder: Path) -> int | None:
    """4 or 8 where the run trained on a 4-/8-bit base (method=qlora, model.load_in_8bit), else None: the method's
    own answer on the run's recorded config, as inference.quantized_base reads it."""
    from chattune.config import config_from_dict, recorded_config
    from chattune.methods import get_method

    raw, _ = recorded_config(folder)
    method = raw.get("method") or read_info(folder).get("method") or "lora"
    cfg = config_from_dict({"method": method, **{k: raw[k] for k in ("model", "lora", "qlora") if k in raw}})
    return get_method(cfg.method).base_weight_bits(cfg)


def loaded_bits(model) -> int | None:
    """4 or 8 where the served base was loaded quantized (bitsandbytes), else None."""
    base = base_model(model)
    return 4 if getattr(base, "is_loaded_in_4bit", False) else 8 if getattr(base, "is_loaded_in_8bit", False) else None


def same_base(folder: Path, adapter_cfg: dict, base_path: str, base_spec: str | None) -> bool:
    """Was the run trained on the served base? Its recorded base folder is the same folder, or its recorded model
    spec (`bundled`, a hub id) is the one the server was given."""
    info = read_info(folder)
    recorded = info.get("base_model") or adapter_cfg.get("base_model_name_or_path")
    if recorded and Path(recorded).expanduser().resolve() == Path(base_path).expanduser().resolve():
        return True
    return base_spec is not None and info.get("model_spec") == base_spec


def check_loras(specs: list[str]) -> list[tuple[str, Path, dict]]:
    """The `--lora NAME=DIR` items checked before anything loads: (NAME, DIR, its adapter_config.json)."""
    out = []
    for name, folder in parse_lora(specs):
        if name in (DEFAULT, BASE):
            raise ConfigError(f"--lora {name}={folder}: {name!r} is a name peft uses itself; pick another name")
        out.append((name, folder, check_lora_folder(name, folder)))
    return out


def _base_kind(bits: int | None) -> str:
    return f"a {bits}-bit base (bitsandbytes)" if bits else "an unquantized base"


def add_loras(default_id: str, tuned: Tuned, loras: list[tuple[str, Path, dict]], base_spec: str | None,
              log=print) -> list[Served]:
    """Load the checked `--lora` adapters (check_loras) into `tuned`'s model (load_tuned's, from `--model` or
    `--adapter`) and return every model a request can name: the server's own first (what a request without `model`
    gets), the base alone where that is an adapter, then each `--lora`."""
    from peft import PeftModel

    net = tuned.model
    own = getattr(net, "peft_config", {}).get(DEFAULT)
    if own is not None and (getattr(own, "peft_type", None) != "LORA" or getattr(own, "use_dora", False)):
        raise ModelError(f"--adapter {tuned.source} is not a plain LoRA adapter ({own.peft_type}"
                         f"{', DoRA' if getattr(own, 'use_dora', False) else ''}), so --lora adapters cannot share "
                         "its base; give the base with --model instead")
    base_path = base_model(net).name_or_path
    models = [Served(default_id, tuned, DEFAULT if own is not None else BASE,
                     Path(base_path).name if own is not None else None)]
    if own is not None:
        if Path(base_path).name == default_id:
            raise ConfigError(f"--adapter {tuned.source} and its base {base_path} have the same name, {default_id!r}, "
                              "so requests could not tell them apart; rename the adapter's folder")
        models.append(Served(Path(base_path).name, _base_view(tuned, base_path), BASE))
    for name, folder, adapter_cfg in loras:
        if any(m.id == name for m in models):
            raise ConfigError(f"--lora {name}={folder}: {name!r} is already the id of a served model (the "
                              "server's own or its base); pick another name")
        if not same_base(folder, adapter_cfg, base_path, base_spec):
            recorded = read_info(folder).get("base_model") or adapter_cfg.get("base_model_name_or_path")
            raise ModelError(f"--lora {name}={folder} was trained on {recorded}, but the served base is {base_path}; "
                             "serve it with its own base (--model), or give adapters of the same base")
        bits, served_bits = recorded_base_bits(folder), loaded_bits(net)
        if bits != served_bits:
            raise ModelError(f"--lora {name}={folder} was trained on {_base_kind(bits)}, but the served base is "
                             f"loaded as {_base_kind(served_bits)}; serve it where the base loads as it trained "
                             "(for QLoRA: a QLoRA run as --adapter, on a CUDA GPU), or merge it with `chattune export`")
        if isinstance(net, PeftModel):
            net.load_adapter(str(folder), adapter_name=name)
        else:
            net = PeftModel.from_pretrained(net, str(folder), adapter_name=name)
        net.eval()
        log(f"adapter {name}: {folder}")
        parent = Path(base_path).name if own is not None else models[0].id
        models.append(Served(name, _adapter_view(tuned, folder, base_path), name, parent))
    for m in models:  # every view runs the one PeftModel
        m.tuned.model = net
    return models


def _base_view(tuned: Tuned, base_path: str) -> Tuned:
    """The base without an adapter: its own tokenizer's template (`auto`), as `--model BASE` would serve it."""
    from chattune.data.templates import get_template
    from chattune.models.load import generation_stop_ids, load_tokenizer, model_type

    tokenizer = _same_vocabulary(load_tokenizer(base_path, tuned.info.get("trust_remote_code", False)), tuned,
                                 base_path)
    template = get_template("auto", tokenizer, model_type(base_path), generation_stop_ids(tuned.model))
    return Tuned(tuned.model, tokenizer, template, {}, base_path)


def _adapter_view(tuned: Tuned, folder: Path, base_path: str) -> Tuned:
    """An adapter's own template (its chattune.json's; `auto` with its saved tokenizer's chat template)."""
    from chattune.data.templates import get_template
    from chattune.models.load import generation_stop_ids, load_tokenizer, model_type

    info = read_info(folder)
    tokenizer = tuned.tokenizer
    if (folder / "tokenizer_config.json").is_file():
        tokenizer = _same_vocabulary(load_tokenizer(str(folder), info.get("trust_remote_code", False)), tuned,
                                     folder)
    template = get_template(info.get("template") or "auto", tokenizer, model_type(base_path),
                            generation_stop_ids(tuned.model))
    return Tuned(tuned.model, tokenizer, template, info, str(folder))


def _same_vocabulary(tokenizer, tuned: Tuned, where) -> object:
    """Rows of one batch share token ids and the server decodes them with one tokenizer: the vocabularies must match."""
    if tokenizer.get_vocab() != tuned.tokenizer.get_vocab():
        raise ModelError(f"{where}: its tokenizer's vocabulary differs from the served model's ({tuned.source}); "
                         "adapters that share a base must keep its tokenizer")
    return tokenizer
