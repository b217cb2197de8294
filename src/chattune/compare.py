"""`chattune compare CONFIG.yaml [key=value ...]`: train several methods on one dataset, evaluate each on the same
test set, and write the table users want (the ChatGLM-6B experiments' comparison, as one command).

The compare config (see configs/compare_spo.yaml):
    train_data: FILE            test_data: FILE | null (null: hold out the last `test_split` of train_data)
    max_tokens: N | null        (only records of at most N tokens, rendered with the run's model and template)
    records: N | null           (only the first N records of train_data that are kept, before the split)
    output_dir: DIR             shared: {run-config keys for every variant}
    eval: {metrics, max_new_tokens, batch_size, limit, device, dtype}   (device/dtype: `chattune eval --device/--dtype`)
    variants: [{name, overrides: {run-config keys} | [key=value, ...]}, ...]
Command-line `key=value` arguments set a compare key when they name one (`output_dir=X`, `train_data=F`,
`eval.batch_size=4`, `shared.train.lr=1e-4`, ...), otherwise a run-config key applied to every variant (after shared
and the variant's). Run-config keys that compare decides for each variant (data.train, resume, overwrite) are
refused with the compare key that does what was meant: none is silently overridden.

Each variant trains and is evaluated in a subprocess of its own (`python -m chattune train|eval`), so its peak
memory is its own (peak RSS on CPU, torch.cuda.max_memory_allocated on GPU) and a crash in one loses nothing of
the others. A variant whose output_dir holds a finished run with the same configuration is not trained again; an
unfinished one continues with resume=auto; an evaluation with the same settings is not repeated. Written
atomically into output_dir: report.md, report.csv, report.json, loss.png (every variant's loss curves) and
bars.png (the first metric, peak training memory, training time, test time).
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import Field, PrivateAttr, field_validator

from chattune import outputs
from chattune.config import keys_for_method, read_yaml_config, validate
from chattune.errors import ConfigError
from chattune.evaluate.metrics import metric_columns
from chattune.methods.base import Section


class EvalSettings(Section):
    metrics: list[str] = Field(default_factory=lambda: ["rouge", "bleu"])
    max_new_tokens: int = Field(256, ge=1)
    batch_size: int = Field(8, ge=1)
    limit: int | None = Field(None, ge=1)
    device: str = Field("auto", description="`chattune eval --device`: auto, cpu, cuda, cuda:N")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="`chattune eval --dtype`")

    @field_validator("metrics", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return [n.strip() for n in v.split(",") if n.strip()] if isinstance(v, str) else v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        from chattune.hardware import parse_device

        try:
            return parse_device(v)
        except ConfigError:
            raise ValueError("give auto, cpu, cuda or cuda:N") from None


class Variant(Section):
    name: str
    overrides: Union[dict, list[str]] = Field(default_factory=dict)
    _method: str | None = PrivateAttr(None)  # variant_method's, once decided

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or "/" in v or v.startswith("."):
            raise ValueError(f"variant name {v!r} must be a plain folder name")
        return v


class CompareSpec(Section):
    train_data: str
    test_data: str | None = None
    test_split: float = Field(0.1, gt=0, lt=1)
    max_tokens: int | None = Field(None, ge=8, description="keep only records of at most N tokens, whole")
    records: int | None = Field(None, ge=2, description="use only the first N records of train_data")
    output_dir: str = "runs/compare"
    shared: dict = Field(default_factory=dict)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    variants: list[Variant] = Field(min_length=1)


def _flatten(mapping: dict, prefix: str = "") -> list[str]:
    """{"train": {"lr": 1e-4}} -> ["train.lr=0.0001"] (values as YAML scalars, read back the same way)."""
    out = []
    for key, value in mapping.items():
        if isinstance(value, dict):
            out += _flatten(value, f"{prefix}{key}.")
        else:  # a scalar dumps as "VALUE\n..." (YAML's end-of-document marker)
            text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10**9)
            text = text.strip().removesuffix("...").strip()
            out.append(f"{prefix}{key}={text}")
    return out


# Run-config keys that compare sets for every variant itself: given on the command line, they would be overridden
# without a word, so they are refused with what does the job.
DECIDED_RUN_KEYS = {
    "data.train": "the variants train on the compare key train_data (less the held-out test set): "
                  "give train_data=FILE",
    "resume": "compare resumes an unfinished variant itself (resume=auto) and keeps a finished one trained with the "
              "same configuration",
    "overwrite": "compare retrains a variant whose configuration changed and keeps one whose configuration is the "
                 "same; to train every variant again, give a new output_dir=DIR",
}


COMPARE_KEYS = ("train_data", "test_data", "test_split", "max_tokens", "records", "output_dir", "eval.metrics",
                "eval.max_new_tokens", "eval.batch_size", "eval.limit", "eval.device", "eval.dtype", "shared.KEY")


def split_cli(cli: list[str]) -> tuple[list[str], list[str]]:
    """Command-line `key=value`s -> (compare keys, run-config keys for every variant)."""
    from chattune.config import parse_override

    own, run = [], []
    for text in cli:
        key, _ = parse_override(text)
        head = key.split(".")[0]
        if key in DECIDED_RUN_KEYS:
            raise ConfigError(f"compare: `{key}` cannot be set on the command line: {DECIDED_RUN_KEYS[key]}")
        if head == "variants":
            raise ConfigError("compare: variants are set in the compare file; command-line run-config keys apply to "
                              "every variant (`shared.KEY=VALUE` does the same)")
        (own if head in CompareSpec.model_fields else run).append(text)
    return own, run


def variant_overrides(spec: CompareSpec, variant: Variant, cli: list[str], train_file: Path, run_dir: Path) -> list[str]:
    """The variant's run-config keys: shared, its own, the command line's (a method section's keys of shared and
    the command line only for the variants whose method reads them: `lora.r=4` reaches the LoRA variants, not a
    Freeze one)."""
    method = variant_method(spec, variant)
    return [*keys_for_method(method, _flatten(spec.shared)), *_own(variant), *keys_for_method(method, cli),
            f"data.train={train_file}", f"output_dir={run_dir}"]


def _own(variant: Variant) -> list[str]:
    return variant.overrides if isinstance(variant.overrides, list) else _flatten(variant.overrides)


def variant_method(spec: CompareSpec, variant: Variant) -> str:
    """The variant's method (`method=` of shared, then of its own keys), decided once per variant."""
    if variant._method is None:
        from chattune.config import apply_overrides, config_from_dict

        variant._method = config_from_dict(apply_overrides({}, [*_flatten(spec.shared), *_own(variant)])).method
    return variant._method


def check_section_keys(spec: CompareSpec, cli: list[str]) -> None:
    """A method section's key that would change nothing is refused: on the command line, one that no variant's
    method reads; in a variant's own keys, one that its method does not read (its `chattune train` would refuse
    it, after the variants before it trained)."""
    from chattune.config import check_method_sections, method_sections, parse_override

    methods = [variant_method(spec, v) for v in spec.variants]
    for v, method in zip(spec.variants, methods):
        check_method_sections(method, _own(v), where=f"compare: variant {v.name}: ")
    for text in cli:
        key = parse_override(text)[0]
        head = key.split(".")[0]
        if head in method_sections(methods[0])[1] and not any(head in method_sections(m)[0] for m in methods):
            raise ConfigError(f"compare: `{key}` has no effect: no variant's method reads {head}.* (the variants' "
                              f"methods: {', '.join(dict.fromkeys(methods))})")


def load_spec(path: str, cli: list[str]) -> tuple[CompareSpec, list[str]]:
    """The compare spec with the command line's compare keys applied, and the run-config keys left for the variants."""
    from chattune.config import apply_overrides, load_config, parse_override

    own, cli = split_cli(cli)
    spec = validate(CompareSpec, apply_overrides(read_yaml_config(path), own))
    base = Path(path).resolve().parent
    given = {parse_override(text)[0] for text in own}
    for attr in ("train_data", "test_data"):  # data paths in the file are relative to it; given ones to the cwd
        value = getattr(spec, attr)
        if value and attr not in given and not Path(value).is_absolute() and not Path(value).exists() and \
                (base / value).exists():
            setattr(spec, attr, str(base / value))
    if not Path(spec.train_data).exists():
        raise ConfigError(f"{path}: train_data {spec.train_data} not found")
    check_section_keys(spec, cli)
    for v in spec.variants:  # every variant's run config must be valid before anything trains
        try:
            load_config(None, variant_overrides(spec, v, cli, Path(spec.train_data), Path(spec.output_dir) / v.name))
        except ConfigError as e:
            if not str(e).startswith("unknown config key"):
                raise
            raise ConfigError(f"compare: {e}; the compare's own keys: {', '.join(COMPARE_KEYS)}") from None
    names = [v.name for v in spec.variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: variant names must differ: {', '.join(names)}")
    return spec, cli


def split_data(spec: CompareSpec, out: Path, log) -> tuple[Path, Path]:
    """The train and test files: as given, or train_data's last `test_split` held out (written once)."""
    if spec.test_data:
        return Path(spec.train_data), Path(spec.test_data)
    from chattune.data.readers import find_split, iter_raw_records

    source = find_split(spec.train_data, "train")
    records = [rec for _, rec in iter_raw_records(source)]
    if spec.max_tokens:
        records = short_records(spec, source, records, log)
    records = records[: spec.records]
    n_test = max(1, round(len(records) * spec.test_split))
    data_dir = out / "data"
    train_file, test_file = data_dir / "train.jsonl", data_dir / "test.jsonl"
    for file, rows in ((train_file, records[:-n_test]), (test_file, records[-n_test:])):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        if not file.is_file() or file.read_text(encoding="utf-8") != text:
            outputs.atomic_write_text(file, text)
    log(f"compare: {source}: {len(records) - n_test} records to train on, the last {n_test} held out as the test set")
    return train_file, test_file


def short_records(spec: CompareSpec, source: Path, records: list, log) -> list:
    """The records whose whole conversation, rendered as the first variant trains it (its model's tokenizer, its
    template, data.system and data.train_on), has at most `max_tokens` tokens. The same records are kept for every
    variant: they share the model, so the choice does not depend on the method. Only the tokenizer is loaded."""
    from chattune.config import load_config
    from chattune.data.encode import encode_conversation
    from chattune.data.formats import load_conversations
    from chattune.data.inspect import tokenizer_and_template

    cfg = load_config(None, variant_overrides(spec, spec.variants[0], [], source, Path(spec.output_dir)))
    d = cfg.data
    conversations = load_conversations(source, fmt=d.format, train_on=d.train_on,
                                       default_system=d.system).conversations  # every record valid, in order
    tokenizer, template = tokenizer_and_template(cfg, log)
    kept = [rec for rec, conv in zip(records, conversations)
            if encode_conversation(conv, template, tokenizer, spec.max_tokens, "drop") is not None]
    log(f"compare: max_tokens={spec.max_tokens}: {len(kept)} of {len(records)} records are that short")
    if len(kept) < 2:
        raise ConfigError(f"compare: max_tokens={spec.max_tokens} keeps {len(kept)} of {len(records)} records of "
                          f"{source}; raise max_tokens (`chattune data inspect {source}` shows the lengths)")
    return kept


def _chattune(args: list[str], log) -> None:
    log("compare: $ chattune " + " ".join(args))
    r = subprocess.run([sys.executable, "-m", "chattune", *args])
    if r.returncode != 0:
        raise ConfigError(f"compare: `chattune {args[0]}` failed with exit code {r.returncode} (its messages are "
                          "above); fix it and run the same compare command again: finished variants are kept")


def train_variant(overrides: list[str], run_dir: Path, log) -> str:
    from chattune.config import load_config

    wanted = load_config(None, overrides)
    if outputs.is_finished_run(run_dir):
        done = (run_dir / outputs.CONFIG_FILE).read_text(encoding="utf-8") if (run_dir / outputs.CONFIG_FILE).is_file() else ""
        if done == wanted.to_yaml():
            log(f"compare: {run_dir.name}: already trained with this configuration, not training again")
            return "kept"
        _chattune(["train", *overrides, "overwrite=true"], log)
        return "retrained"
    _chattune(["train", *overrides, *(["resume=auto"] if outputs.holds_a_run(run_dir) else [])], log)
    return "trained"


def eval_variant(spec: CompareSpec, run_dir: Path, test_file: Path, log) -> dict:
    """The variant's metrics.json: `chattune eval` in a subprocess with the compare's eval settings (eval.device and
    eval.dtype as --device/--dtype), or the one already there where it was written after the run finished, with the
    same settings, on the device and dtype that eval.device/eval.dtype decide now."""
    from chattune.hardware import decide_device_and_dtype
    from chattune.inference import recorded_hardware

    out = run_dir / "eval-compare"
    e = spec.eval
    device, precision, _ = decide_device_and_dtype(e.device, e.dtype, recorded_hardware(str(run_dir)),
                                                   asked_by="eval.dtype")
    settings = {"data": str(test_file), "batch_size": e.batch_size, "max_new_tokens": e.max_new_tokens,
                "device": device, "precision": precision}
    metrics_file = out / "metrics.json"
    if metrics_file.is_file() and (run_dir / outputs.RUN_FILE).is_file() and \
            metrics_file.stat().st_mtime >= (run_dir / outputs.RUN_FILE).stat().st_mtime:
        old = json.loads(metrics_file.read_text())
        if all(old.get(k) == v for k, v in settings.items()) and old.get("samples") and \
                all(c in old for c in metric_columns(e.metrics)):
            log(f"compare: {run_dir.name}: already evaluated with these settings")
            return old
    _chattune(["eval", "--adapter", str(run_dir), "--data", str(test_file), "--metrics", ",".join(e.metrics),
               "--batch-size", str(e.batch_size), "--max-new-tokens", str(e.max_new_tokens), "--out", str(out),
               "--device", e.device, "--dtype", e.dtype, *(["--limit", str(e.limit)] if e.limit else [])], log)
    return json.loads(metrics_file.read_text())


COLUMNS = ["variant", "method", "trainable_params", "trainable_percent", "peak_train_memory_mb", "train_seconds",
           "tokens_per_s", "peak_inference_memory_mb"]


def compare(path: str, cli: list[str], log=print) -> dict:
    spec, cli = load_spec(path, cli)
    out = Path(spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_file, test_file = split_data(spec, out, log)
    rows, runs, started = [], [], time.perf_counter()
    metric_cols = metric_columns(spec.eval.metrics)
    for variant in spec.variants:
        run_dir = out / variant.name
        overrides = variant_overrides(spec, variant, cli, train_file, run_dir)
        status = train_variant(overrides, run_dir, log)
        metrics = eval_variant(spec, run_dir, test_file, log)
        run = json.loads((run_dir / outputs.RUN_FILE).read_text())
        row = {"variant": variant.name, "method": run["method"], "trainable_params": run["trainable_params"],
               "trainable_percent": round(run["trainable_percent"], 4),
               "peak_train_memory_mb": run["peak_memory_mb"], "train_seconds": run["train_seconds"],
               "tokens_per_s": run["tokens_per_s"], "peak_inference_memory_mb": metrics.get("peak_memory_mb"),
               "inference_device": metrics.get("device"), "inference_dtype": metrics.get("precision")}
        row.update({c: round(metrics[c], 4) if isinstance(metrics.get(c), float) else metrics.get(c)
                    for c in metric_cols})
        row["test_seconds"] = metrics.get("generation_seconds")
        row["status"] = status
        rows.append(row)
        runs.append(run_dir)
    report = {"train_data": str(train_file), "test_data": str(test_file), "metrics": metric_cols, "rows": rows,
              "device": run.get("device"), "seconds": round(time.perf_counter() - started, 1)}
    write_report(report, runs, out)
    print(markdown_table(rows, metric_cols))
    log(f"compare: wrote {out / 'report.md'}, report.csv, report.json, loss.png, bars.png")
    return report


def markdown_table(rows: list[dict], metric_cols: list[str]) -> str:
    heads = ["variant", "method", "trainable params", "trainable %", "peak train memory (MB)", "train time (s)",
             "tokens/s", "peak inference memory (MB)", *metric_cols, "test time (s)"]
    keys = [*COLUMNS, *metric_cols, "test_seconds"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k)
            cells.append(f"{v:,}" if isinstance(v, int) and k == "trainable_params" else
                         f"{v:.4f}" if isinstance(v, float) and k == "bleu-4" else  # 0-1, as GLM-4's demo
                         f"{v:.2f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(report: dict, runs: list[Path], out: Path) -> None:
    from chattune.plot import plot_runs

    rows, metric_cols = report["rows"], report["metrics"]
    ran = sorted({f"{r.get('inference_device')} in {r.get('inference_dtype')}" for r in rows})
    md = ["# chattune compare", "", f"train: `{report['train_data']}`, test: `{report['test_data']}`, device: "
          f"{report['device']}; the test set ran on {', '.join(ran)}", "", markdown_table(rows, metric_cols), "",
          "![loss curves](loss.png)", "", "![metric, memory and time](bars.png)", ""]
    outputs.atomic_write_text(out / "report.md", "\n".join(md))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*COLUMNS, "inference_device", "inference_dtype", *metric_cols,
                                             "test_seconds", "status"])
    writer.writeheader()
    writer.writerows(rows)
    outputs.atomic_write_text(out / "report.csv", buf.getvalue())
    outputs.atomic_write_text(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    plot_runs(runs, out / "loss.png", [r["variant"] for r in rows], title="training loss by variant")
    headline = next((c for c in ("triple_f1", "rouge-l", "bleu-4", "exact", "loss") if c in metric_cols), None)
    bar_chart(rows, headline, out / "bars.png")


def bar_chart(rows: list[dict], metric: str | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(metric, metric or "")] if metric else []
    panels += [("peak_train_memory_mb", "peak training memory (MB)"), ("train_seconds", "training time (s)"),
               ("test_seconds", "test time (s)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), dpi=120)
    names = [r["variant"] for r in rows]
    for ax, (key, title) in zip(axes, panels):
        values = [r.get(key) or 0 for r in rows]
        ax.bar(names, values, color=[f"C{i % 10}" for i in range(len(rows))])
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.set_ylim(bottom=0, top=max(max(values) * 1.15, 1e-9))
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:,.0f}" if v >= 100 else f"{v:.3g}", ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
