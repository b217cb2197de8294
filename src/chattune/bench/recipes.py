"""What `chattune bench` runs: the recipes (chattune's defaults and the baselines' settings), the `key=value`
arguments, the data subset and sample order every recipe shares, and each recipe's run config.

Recipes (everything else is identical: config defaults, LoRA r on all linear layers, optimizer, schedule, seed):
- tutorial: every sample padded to `max_length`, fp32, logits over every position, no length grouping;
- dynamic:  padding to the longest sample of each batch, fp32, full logits (a middle baseline);
- chattune: chattune's defaults (padding-free packing, label-only logits, precision=auto);
- compiled: chattune's defaults plus train.compile=true (only when asked for: recipes=chattune,compiled);
- unfused:  chattune's defaults with lora.fuse=false (peft's own adapter calls, one dropout mask per adapter;
            only when asked for: recipes=chattune,unfused).
- top_half: chattune's defaults with adapters in the top half of the decoder layers only (lora.layers=N/2: no
            backward below them). Not the same training (half the adapters): read its held-out loss beside its
            speed. Only when asked for: recipes=chattune,top_half.

Fairness: every recipe trains on the first `samples` records, in one fixed shuffled order, `batch_size` per step,
so step k of every recipe sees the same samples (the same real tokens) and their losses are comparable step by step.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field, field_validator

from chattune.config import apply_overrides, validate
from chattune.errors import ChattuneError, ConfigError
from chattune.methods.base import Section

RECIPES: dict[str, dict] = {
    "tutorial": {
        "about": "pad every sample to max_length, fp32, full logits (HF tutorial recipe)",
        "overrides": ["data.packing=false", "train.group_by_length=false", "train.precision=fp32",
                      "train.label_only_logits=false"],
        "pad_to_max_length": True,
        "baseline": True,
    },
    "dynamic": {
        "about": "pad to the batch's longest sample, fp32, full logits",
        "overrides": ["data.packing=false", "train.group_by_length=false", "train.precision=fp32",
                      "train.label_only_logits=false"],
        "pad_to_max_length": False,
        "baseline": True,
    },
    "chattune": {
        "about": "chattune defaults: packing, label-only logits, precision=auto",
        "overrides": [],
        "pad_to_max_length": False,
        "baseline": False,
    },
    "compiled": {  # not in the default recipes: opt in with recipes=chattune,compiled
        "about": "chattune defaults + train.compile=true (compile time counted in the whole-process figure)",
        "overrides": ["train.compile=true"],
        "pad_to_max_length": False,
        "baseline": False,
    },
    "top_half": {  # not in the default recipes: opt in with recipes=chattune,top_half
        "about": "chattune defaults with adapters in the top half of the decoder layers only (lora.layers: no "
                 "backward below them; fewer adapters, so compare the held-out loss too)",
        "overrides": [],
        "layer_share": 0.5,
        "pad_to_max_length": False,
        "baseline": False,
    },
    "unfused": {  # not in the default recipes: opt in with recipes=chattune,unfused
        "about": "chattune defaults with lora.fuse=false (peft's own adapter calls, one dropout mask each)",
        "overrides": ["lora.fuse=false"],
        "pad_to_max_length": False,
        "baseline": False,
    },
}


DEFAULT_DATA = Path("shared") / "data" / "llamafactory" / "alpaca_en_demo.json"


def default_data_path() -> Path | None:
    """The LLaMA-Factory demo set of a `shared/` data folder in or next to the current directory (as in the
    project's checkout layout); an installed chattune never looks inside its own source tree."""
    for candidate in (Path.cwd() / DEFAULT_DATA, Path.cwd().parent / DEFAULT_DATA):
        if candidate.is_file():
            return candidate
    return None


class BenchLora(Section):
    r: int = Field(8, ge=1)


class BenchSpec(Section):
    model: str = "bundled"
    data: str = ""
    samples: int = Field(120, ge=1)
    steps: int = Field(30, ge=1)
    batch_size: int = Field(4, ge=1)
    max_length: int = Field(512, ge=8)
    lora: BenchLora = Field(default_factory=BenchLora)
    recipes: list[str] = Field(default_factory=lambda: ["tutorial", "chattune"])
    threads: int | None = Field(None, ge=1)
    last: int = Field(5, ge=1)
    seed: int = 42
    eval_samples: int = Field(40, ge=0)
    rounds: int = Field(1, ge=1, description="run the recipes this many times, alternating their order")
    out: str | None = None
    isolate: bool = True

    @field_validator("recipes", mode="before")
    @classmethod
    def _recipes(cls, v):
        names = [n.strip() for n in v.split(",")] if isinstance(v, str) else list(v)
        names = [n for n in names if n]
        unknown = [n for n in names if n not in RECIPES]
        if unknown or not names:
            raise ValueError(f"unknown recipe(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(RECIPES)}")
        return list(dict.fromkeys(names))


def parse_args(args: list[str]) -> BenchSpec:
    """`key=value` arguments, parsed and checked by the same machinery as run configs (did-you-mean included)."""
    spec = validate(BenchSpec, apply_overrides({}, args))
    data = Path(spec.data) if spec.data else default_data_path()
    if data is None or not data.is_file():
        raise ConfigError(f"bench: data file {data or DEFAULT_DATA} not found; give one with data=FILE (.json or "
                          f".jsonl in alpaca/messages/sharegpt format; the default is {DEFAULT_DATA} in or next to "
                          "the current directory)")
    spec.data = str(data.resolve())
    return spec


def sample_order(n_samples: int, steps: int, batch_size: int, seed: int) -> list[int]:
    """steps x batch_size indices: shuffled epochs of range(n_samples), the same for every recipe."""
    import torch

    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order.extend(torch.randperm(n_samples, generator=g).tolist())
    return order[: steps * batch_size]


def subset_file(data: str, samples: int, workdir: Path, eval_samples: int = 0) -> tuple[Path, int, Path | None]:
    """The first `samples` records of `data` as a JSON array (the same file for every recipe), and the next
    `eval_samples` records as the held-out file (None when there are none)."""
    path = Path(data)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        records = json.loads(text)
        if not isinstance(records, list):
            raise ConfigError(f"bench: {path} must hold a JSON array of records")
    heldout = records[samples:samples + eval_samples]
    records = records[:samples]
    out = workdir / "bench-data.json"
    out.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    eval_file = None
    if heldout:
        eval_file = workdir / "bench-heldout.json"
        eval_file.write_text(json.dumps(heldout, ensure_ascii=False), encoding="utf-8")
    return out, len(records), eval_file


def recipe_config(spec: BenchSpec, recipe: str, data_file: Path, output_dir: Path):
    from chattune.config import load_config

    overrides = [f"model={spec.model}", f"data.train={data_file}", f"data.max_length={spec.max_length}",
                 f"lora.r={spec.lora.r}", "lora.target=all", f"train.batch_size={spec.batch_size}",
                 f"train.max_steps={spec.steps}", "train.logging_steps=1", f"train.save_steps={10**9}",
                 f"train.seed={spec.seed}", f"output_dir={output_dir}", "overwrite=true"]
    if spec.threads:
        overrides.append(f"train.num_threads={spec.threads}")
    extra = list(RECIPES[recipe]["overrides"])
    if "layer_share" in RECIPES[recipe]:
        from chattune.methods.freeze import _configured_layers

        n_layers = _configured_layers(spec.model)
        if n_layers is None:
            raise ChattuneError(f"bench: recipe `{recipe}` needs the model's layer count, which {spec.model}'s "
                                "config.json does not give; leave the recipe out")
        extra.append(f"lora.layers={max(1, round(n_layers * RECIPES[recipe]['layer_share']))}")
    return load_config(None, overrides + extra)
