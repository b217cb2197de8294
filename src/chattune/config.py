"""Typed run configuration: YAML file + dotted `key=value` overrides.

One `RunConfig` describes a whole run. Unknown keys are errors that suggest the closest valid key, wrong
types and out-of-range values are errors that name the key. Values given on the command line are parsed as
YAML scalars (`true`, `3`, `1e-4`, `[1, 2]`), so `lora.r=16` is an int and `data.train=x.json` a string.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, field_validator, model_validator

from chattune.errors import ConfigError
from chattune.methods import REGISTRY
from chattune.methods.base import Section as _Section
from chattune.shipped import shipped_config, shipped_run_configs


class ModelConfig(_Section):
    path: str = Field("bundled", description="HF folder, hub id, or `bundled` (the default small model)")
    trust_remote_code: bool = False
    load_in_8bit: bool = False
    attn_implementation: str | None = Field(None, description="e.g. sdpa, eager, flash_attention_2")
    revision: str | None = Field(None, description="a hub model's branch, tag or commit (hub ids only)")


# data.columns: the format fields a column of the data can be read as (docs/data.md)
COLUMN_FIELDS = ("instruction", "input", "output", "system", "history", "messages", "conversations", "tools")


class DataConfig(_Section):
    train: str | list[str] | None = Field(None, description="a data file, a folder, hf:ORG/NAME (a dataset in the "
                                          "`datasets` cache), or a list of them (docs/data.md)")
    eval: str | list[str] | None = Field(None, description="the same kinds of sources; a list is concatenated")
    mix: list[float] | None = Field(None, description="one weight per data.train source: rows are drawn by weight "
                                    "(seeded by train.seed) instead of concatenated")
    columns: dict[str, str] = Field(default_factory=dict, description="the data's column for a format field, e.g. "
                                    "data.columns.instruction=question")
    format: Literal["auto", "alpaca", "messages", "sharegpt"] = "auto"
    max_length: int = Field(1024, ge=8)
    train_on: Literal["all", "last"] = "all"
    truncation: Literal["prompt", "right", "drop", "error"] = "prompt"
    packing: bool = True
    skip_invalid: bool = False
    system: str | None = Field(None, description="system prompt for records that have none")

    @field_validator("train", "eval")
    @classmethod
    def _source_list(cls, v: Any, info) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError(f"data.{info.field_name}: an empty list; give one source or several")
            blank = [i for i, s in enumerate(v) if not s.strip()]
            if blank:
                raise ValueError(f"data.{info.field_name}[{blank[0]}]: an empty source name")
        return v

    @field_validator("mix")
    @classmethod
    def _weights(cls, v: list[float] | None) -> list[float] | None:
        if v is not None:
            bad = [w for w in v if not 0 <= w < float("inf")]
            if bad or not sum(v) > 0:
                raise ValueError("data.mix: weights must be finite, at least 0, and not all 0; they are normalised "
                                 "to sum to 1")
        return v

    @field_validator("columns")
    @classmethod
    def _column_fields(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = [k for k in v if k not in COLUMN_FIELDS]
        if unknown:
            raise ValueError(f"data.columns.{unknown[0]}: not a format field; the fields a column can be read as: "
                             f"{', '.join(COLUMN_FIELDS)}")
        blank = [k for k, c in v.items() if not c.strip()]
        if blank:
            raise ValueError(f"data.columns.{blank[0]}: an empty column name")
        return v

    @model_validator(mode="after")
    def _one_weight_per_source(self) -> "DataConfig":
        if self.mix is not None:
            sources = [self.train] if isinstance(self.train, str) else self.train or []
            if len(self.mix) != len(sources):
                raise ValueError(f"data.mix has {len(self.mix)} weights for {len(sources)} data.train sources; give "
                                 "one weight per source, in the same order (or leave data.mix out to concatenate)")
        return self


# train.report_to: the experiment trackers of transformers' own integrations that chattune offers (train/trackers.py)
TRACKERS = ("tensorboard", "wandb", "mlflow", "swanlab")


class TrainConfig(_Section):
    max_steps: int = Field(-1, description="-1: run `epochs` epochs")
    epochs: float = Field(3, gt=0)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0)
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    save_steps: int = Field(100, ge=1)
    save_total_limit: int | None = Field(None, ge=1)
    logging_steps: int = Field(10, ge=1)
    eval_steps: int | None = Field(None, ge=1)
    eval_generate: int = Field(0, ge=0, description="also generate for the first N eval samples and score them")
    eval_metrics: list[str] = Field(default_factory=lambda: ["rouge", "bleu"],
                                    description="generation metrics for eval_generate: rouge, bleu, exact, triple_f1")
    eval_max_new_tokens: int = Field(128, ge=1)
    load_best: bool = Field(False, description="make the best checkpoint (by best_metric) the final output")
    best_metric: str = Field("loss", description="loss, rouge-1, rouge-2, rouge-l, bleu-4, exact, triple_f1")

    @field_validator("eval_metrics", mode="before")
    @classmethod
    def _metric_list(cls, v: Any) -> Any:
        return [n.strip() for n in v.split(",") if n.strip()] if isinstance(v, str) else v
    seed: int = 42
    gradient_checkpointing: bool = False
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    label_only_logits: bool = True
    neftune_noise_alpha: float | None = Field(None, gt=0, description="NEFTune: uniform noise on the input "
                                              "embeddings in training, scaled by alpha / sqrt(length * hidden) "
                                              "(e.g. 5); turns packing off")
    compile: Union[bool, Literal["auto"]] = Field("auto", description="torch.compile each decoder layer: auto, "
                                                   "true or false (auto: on a GPU, for long enough runs)")
    group_by_length: bool = True
    num_threads: int | None = Field(None, ge=1, description="CPU threads; default: all cores")
    stop_after: int | None = Field(None, ge=1, description="stop (with a checkpoint) after this step")
    on_nan: Literal["stop", "skip"] = Field("stop", description="a non-finite loss: stop, or skip that batch")
    deepspeed: str | None = None
    fsdp: bool = Field(False, description="shard the model with FSDP (GPUs, through the Trainer and accelerate)")
    fsdp_config: str = Field("fsdp.json", description="an FSDP config JSON: a path or a shipped name")
    optim: str = Field("auto", description="TrainingArguments' optimizer name (auto: adamw_torch_fused; adamw_8bit, "
                       "paged_adamw_8bit need bitsandbytes and a GPU)")
    liger: bool = Field(False, description="liger-kernel's fused RMSNorm/RoPE/SwiGLU (transformers' use_liger_kernel; "
                        "a CUDA GPU)")
    report_to: list[str] = Field(default_factory=list, description="experiment trackers: none, or any of "
                                 "tensorboard, wandb, mlflow, swanlab (a list or a comma string)")

    @field_validator("report_to", mode="before")
    @classmethod
    def _tracker_list(cls, v: Any) -> Any:
        names = [n.strip() for n in v.split(",") if n.strip()] if isinstance(v, str) else v
        if names is None or names == ["none"]:
            return []
        if not isinstance(names, list):
            return names  # pydantic names the wrong type
        if "none" in names:
            raise ValueError("train.report_to: `none` cannot be combined with trackers; drop it")
        bad = [n for n in names if n not in TRACKERS]
        if bad:
            raise ValueError(f"train.report_to: unknown tracker {', '.join(map(repr, bad))}; choose none or any of "
                             f"{', '.join(TRACKERS)}")
        return list(dict.fromkeys(names))  # each tracker once


class _RunConfigBase(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    template: str = "auto"
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output_dir: str = "runs/latest"
    resume: Union[None, int, str] = Field(None, description="auto | STEP | checkpoint path")
    overwrite: bool = False

    @field_validator("model", mode="before")
    @classmethod
    def _model_from_string(cls, v: Any) -> Any:
        # `model: bundled` / `model=path` is shorthand for `model.path`.
        return {"path": v} if isinstance(v, str) else v

    @field_validator("train", mode="after")
    @classmethod
    def _check_eval(cls, t: TrainConfig) -> TrainConfig:
        from chattune.evaluate.metrics import GENERATION_METRICS, metric_columns

        if isinstance(t.eval_metrics, list):
            bad = [m for m in t.eval_metrics if m not in GENERATION_METRICS]
            if bad:
                raise ValueError(f"train.eval_metrics: unknown {', '.join(bad)}; choose from "
                                 f"{', '.join(GENERATION_METRICS)}")
        columns = ["loss"] + (metric_columns(t.eval_metrics) if t.eval_generate else [])
        if t.load_best:
            if not t.eval_steps:
                raise ValueError("train.load_best=true needs evaluation during training: set data.eval=FILE and "
                                 "train.eval_steps=N")
            if t.save_steps % t.eval_steps:
                raise ValueError(f"train.load_best=true needs checkpoints where evaluations happen: "
                                 f"train.save_steps={t.save_steps} must be a multiple of "
                                 f"train.eval_steps={t.eval_steps}")
            if t.best_metric not in columns:
                raise ValueError(f"train.best_metric={t.best_metric!r} is not measured by this run; it measures: "
                                 f"{', '.join(columns)} (generation metrics need train.eval_generate=N)")
        return t

    @model_validator(mode="after")
    def _check_resume(self) -> "RunConfig":
        if isinstance(self.resume, str) and self.resume not in ("auto",) and not self.resume.isdigit():
            if not Path(self.resume).exists():
                raise ValueError(f"resume={self.resume!r}: not `auto`, a step number, or an existing checkpoint path")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


# `method=` and one section per method that has settings, from the method registry (methods/__init__.py).
RunConfig = create_model(
    "RunConfig", __base__=_RunConfigBase, __doc__="One whole run: model, template, method, data, training.",
    method=(Literal[tuple(REGISTRY)], "lora"),
    **{m.section: (m.config_class, Field(default_factory=m.config_class))
       for m in REGISTRY.values() if m.section and m.config_class},
)


# ---------------------------------------------------------------- key checking


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def valid_keys(model: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """Every dotted key the config accepts, sections included (`lora`, `lora.r`, ...)."""
    model = model or RunConfig
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        sub = _section_type(field.annotation)
        if sub is not None:
            keys.extend(valid_keys(sub, prefix + name + "."))
    return keys


def _suggest(key: str, model: type[BaseModel] = None) -> str:
    model = model or RunConfig
    keys = valid_keys(model)
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not close:  # try matching the last part alone: `rank` -> `lora.r` is too far, `lora.targets` works
        leaf = key.rsplit(".", 1)[-1]
        leaves = {k.rsplit(".", 1)[-1]: k for k in keys}
        m = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
        close = [leaves[m[0]]] if m else []
    return f"; did you mean `{close[0]}`?" if close else f"; valid top-level keys: {', '.join(model.model_fields)}"


def check_keys(raw: dict, model: type[BaseModel], prefix: str = "", root: type[BaseModel] | None = None) -> None:
    """Raise ConfigError for the first unknown key in `raw`, with the closest valid key of `model`."""
    root = root or model
    for key, value in raw.items():
        dotted = prefix + str(key)
        if key not in model.model_fields:
            while isinstance(value, dict) and len(value) == 1:  # `trian: {lr: 1}` -> name `trian.lr`
                (sub_key, value), = value.items()
                dotted += f".{sub_key}"
            raise ConfigError(f"unknown config key `{dotted}`{_suggest(dotted, root)}")
        sub = _section_type(model.model_fields[key].annotation)
        if sub is not None and isinstance(value, dict):
            check_keys(value, sub, dotted + ".", root)


# ---------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override `{text}` is not of the form key=value (e.g. train.lr=1e-4)")
    key, _, value = text.partition("=")
    key = key.strip()
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, (dict, type(None))) and value.strip() not in ("null", "~", ""):
        parsed = value  # `a=b: c` or similar stays a plain string
    return key, parsed


def set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if isinstance(child, str) and part == "model" and i == 0:
            child = {"path": child}  # `model: foo` in YAML, then `model.trust_remote_code=true`
        if not isinstance(child, dict):
            child = {}
        node[part] = child
        node = child
    leaf = parts[-1]
    if len(parts) == 1 and leaf == "model" and isinstance(node.get("model"), dict):
        node["model"]["path"] = value  # `model=foo` keeps other model.* settings
    else:
        node[leaf] = value


def resolve_config_path(name: str | Path) -> Path:
    """A config argument is a path, or the name of a shipped config (`lora`, `lora.yaml`)."""
    path = Path(name)
    if path.is_file():
        return path
    found = shipped_config(str(name)) if path.parent == Path(".") or not path.exists() else None
    if found:
        return found
    raise ConfigError(f"config file `{name}` not found; shipped configs: {', '.join(shipped_run_configs())}")


def read_yaml_config(path: str | Path) -> dict:
    cfg_path = resolve_config_path(path)
    try:
        raw = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{cfg_path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{cfg_path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    return raw


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(raw, key, value)
    return raw


def validate(model: type[BaseModel], raw: dict):
    """`model.model_validate(raw)` with unknown keys and invalid values as ConfigErrors that name the key."""
    check_keys(raw, model)
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and p in _UNION_TAGS))
            got = err.get("input")
            lines.append(f"config key `{loc or '(top)'}`: {err['msg']} (got {got!r})")
        raise ConfigError("\n".join(dict.fromkeys(lines))) from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    raw: dict = {}
    if path is not None:
        raw = read_yaml_config(path)
    return config_from_dict(apply_overrides(raw, overrides))



def split_config_arg(items: list[str]) -> tuple[str | None, list[str]]:
    """`[CONFIG] [key=value ...]`: the first item is a config file or name unless it holds an `=`."""
    if items and "=" not in items[0]:
        return items[0], list(items[1:])
    return None, list(items)


def config_from_args(items: list[str]) -> RunConfig:
    """The one way every command reads `[CONFIG] [key=value ...]` from its command line (`train`, `estimate`): a
    command-line key of a method section the run's method does not read is refused (check_method_sections); the
    config file's sections are not checked (a recorded config.yaml holds every section, with its defaults)."""
    path, overrides = split_config_arg(items)
    cfg = load_config(path, overrides)
    check_method_sections(cfg.method, overrides)
    return cfg


def config_from_dict(raw: dict) -> RunConfig:
    return validate(RunConfig, {k: ({"path": v} if k == "model" and isinstance(v, str) else v)
                                for k, v in raw.items()})


_UNION_TAGS = {"int", "str", "list[int]", "list[str]", "none", "function-after[_check_resume(), RunConfig]",
               "function-after[_check_resume(), _RunConfigBase]"}


# ---------------------------------------------------------------- method sections


def method_sections(method: str) -> tuple[set[str], set[str]]:
    """(the method sections `method` reads: its own and its `also_reads`, every method's section)."""
    m = REGISTRY[method]
    return {m.section, *m.also_reads} - {None}, {x.section for x in REGISTRY.values() if x.section}


def section_readers(section: str) -> list[str]:
    """The methods that read the method section `section` (lora: lora, qlora)."""
    return [name for name in REGISTRY if section in method_sections(name)[0]]


def unread_section(method: str, text: str) -> str | None:
    """The method section of the `key=value` `text` when `method` does not read it (`lora` for `lora.r=8` and
    freeze), else None (not a method section's key, or one `method` reads)."""
    head = parse_override(text)[0].split(".")[0]
    reads, sections = method_sections(method)
    return head if head in sections - reads else None


def keys_for_method(method: str, overrides: list[str] | tuple[str, ...]) -> list[str]:
    """The `key=value`s of `overrides` that `method` reads: those of another method's section left out."""
    return [t for t in overrides if unread_section(method, t) is None]


def check_method_sections(method: str, overrides: list[str] | tuple[str, ...], where: str = "") -> None:
    """Refuse a `key=value` of a method section that `method` does not read (`lora.r=8` with method=freeze): it
    would change nothing. `where` starts the message (compare: the variant)."""
    for text in overrides:
        section = unread_section(method, text)
        if section is not None:
            raise ConfigError(f"{where}`{parse_override(text)[0]}` has no effect: this run's method is {method}, "
                              f"which reads no {section}.* key ({section}.* is read by "
                              f"{', '.join(section_readers(section))})")


# ---------------------------------------------------------------- commands that use a part of the config


def recorded_config(folder: str | Path) -> tuple[dict, Path | None]:
    """The config a run recorded (its `config.yaml`; a checkpoint-N's is its run's), raw, and its path; ({}, None)
    for a folder that holds none (a plain model, an export, a hub id)."""
    from chattune import outputs

    folder = Path(folder)
    candidates = [folder / outputs.CONFIG_FILE] + ([folder.parent / outputs.CONFIG_FILE]
                                                   if outputs.is_checkpoint(folder) else [])
    for path in candidates:
        if path.is_file():
            return read_yaml_config(path), path
    return {}, None


def get_dotted(raw: dict, key: str) -> tuple[bool, Any]:
    """(found, value) of a dotted key in a raw config dict."""
    node: Any = raw
    for part in key.split("."):
        if part == "path" and isinstance(node, str):
            return True, node  # `model: foo`
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def applies_to(key: str, applies) -> bool:
    """Whether the dotted `key` is one of the `applies` keys, or below one (`data.columns` covers data.columns.X,
    `model.*` every model.* key)."""
    return any(key == a or key.startswith(a.removesuffix(".*") + ".") for a in applies)


def check_command_keys(command: str, overrides: list[str] | tuple[str, ...], applies,
                       hints: dict[str, str] | None = None) -> list[str]:
    """Check a command's `key=value` overrides as `train` does (an unknown key gets the did-you-mean error) and refuse
    a known key that does nothing for `command`, with where that setting goes instead (`hints`: key or section ->
    text) and the keys that apply (`applies`: keys, `section.*` for a whole section). The one wording of that
    refusal, for every command that uses only some of the run config. Returns the keys given (`model` as
    model.path)."""
    given: list[str] = []
    for text in overrides:
        key, value = parse_override(text)
        probe: dict = {}
        set_dotted(probe, key, value)
        check_keys(probe, RunConfig)
        typed, key = key, ("model.path" if key == "model" else key)
        if not applies_to(key, applies):
            hint = (hints or {}).get(key) or (hints or {}).get(key.split(".")[0]) or ""
            raise ConfigError(f"`{typed}` has no effect on `chattune {command}`{'; ' + hint if hint else ''}; "
                              f"the keys that apply: {', '.join(applies)}")
        given.append(key)
    return given


def command_config(command: str, overrides: list[str] | tuple[str, ...], applies: dict[str, str],
                   base: dict | None = None, base_source: Path | str | None = None,
                   hints: dict[str, str] | None = None) -> tuple[RunConfig, list[str]]:
    """`key=value` overrides for a command that uses only some of the run config (`eval`, `serve`), parsed and
    checked exactly as `train` does: an unknown key gets the same did-you-mean error, a wrong type or range the
    same message. A known key that does nothing for `command` is refused with the keys that do apply (`applies`:
    key -> what it does; `hints`: key -> where that setting goes instead), by check_command_keys. `base` (e.g.
    values picked from a run's config.yaml, `base_source`) is what the overrides start from. Returns the config and
    the keys given."""
    given = check_command_keys(command, overrides, applies, hints)
    raw: dict = {}
    for key in applies:
        found, value = get_dotted(base or {}, key)
        if found:
            set_dotted(raw, key, value)
    if raw and base_source is not None:
        try:
            config_from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{base_source}: {e}") from None
    return config_from_dict(apply_overrides(raw, overrides)), list(dict.fromkeys(given))
