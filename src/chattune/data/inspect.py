"""`chattune data inspect FILE`: validate every record, show one rendered sample with its trained spans, and
token-length statistics with how many samples `data.max_length` truncates."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from chattune.config import RunConfig
from chattune.data.encode import IGNORE, EncodeStats, encode_conversation
from chattune.data.formats import load_conversations
from chattune.data.templates import get_template
from chattune.models.load import load_tokenizer, model_type, resolve_model_path

GREEN, DIM, RESET = "\x1b[32;1m", "\x1b[2m", "\x1b[0m"


def stop_ids_from_folder(path: str) -> list[int]:
    """eos ids from generation_config.json without loading the weights."""
    try:
        eos = json.loads((Path(path) / "generation_config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError):
        return []
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def render_labels(tokenizer, input_ids: list[int], labels: list[int], color: bool) -> str:
    """Decode the sample, marking trained spans (green, or ⟦...⟧ when not on a terminal)."""
    out, run, trained = [], [], None
    for tid, lab in zip(input_ids, labels):
        t = lab != IGNORE
        if trained is not None and t != trained:
            out.append(_span(tokenizer.decode(run), trained, color))
            run = []
        run.append(tid)
        trained = t
    if run:
        out.append(_span(tokenizer.decode(run), bool(trained), color))
    return "".join(out)


def _span(text: str, trained: bool, color: bool) -> str:
    if color:
        return f"{GREEN}{text}{RESET}" if trained else f"{DIM}{text}{RESET}"
    return f"⟦{text}⟧" if trained else text


def inspect(file: str, cfg: RunConfig, sample: int = 0, out=None, log=print) -> dict:
    out = out or sys.stdout
    color = hasattr(out, "isatty") and out.isatty()
    loaded = load_conversations(file, fmt=cfg.data.format, skip_invalid=cfg.data.skip_invalid,
                                train_on=cfg.data.train_on, default_system=cfg.data.system)
    path = resolve_model_path(cfg.model.path, log)
    tokenizer = load_tokenizer(path, cfg.model.trust_remote_code)
    template = get_template(cfg.template, tokenizer, model_type(path), stop_ids_from_folder(path))
    stats = EncodeStats()
    encoded = [encode_conversation(c, template, tokenizer, 10**9, "right", stats) for c in loaded.conversations]
    lengths = stats.lengths
    over = sum(n > cfg.data.max_length for n in lengths)
    trained = [sum(x != IGNORE for x in e.labels) for e in encoded if e is not None]
    i = min(max(sample, 0), len(encoded) - 1)
    e = encoded[i]
    print(f"{file}: {len(loaded.conversations)} valid records, format {loaded.format}"
          + (f", {len(loaded.problems)} invalid skipped" if loaded.problems else ""), file=out)
    for p in loaded.problems[:20]:
        print(f"  skipped {p}", file=out)
    print(f"template: {template.name}, model: {cfg.model.path}", file=out)
    legend = "trained tokens in green" if color else "trained tokens inside ⟦ ⟧"
    print(f"\n--- sample {i} ({loaded.conversations[i].source}; {len(e.input_ids)} tokens, "
          f"{trained[i]} trained; {legend}) ---", file=out)
    print(render_labels(tokenizer, e.input_ids, e.labels, color), file=out)
    print("--- end of sample ---\n", file=out)
    q = statistics.quantiles(lengths, n=20) if len(lengths) >= 2 else [lengths[0]] * 19
    report = {"records": len(lengths), "min": min(lengths), "median": statistics.median(lengths),
              "p95": round(q[18], 1), "max": max(lengths), "mean_trained": round(statistics.mean(trained), 1),
              "max_length": cfg.data.max_length, "over_max_length": over}
    print(f"tokens per sample: min {report['min']}, median {report['median']}, p95 {report['p95']}, "
          f"max {report['max']}; trained tokens per sample (mean): {report['mean_trained']}", file=out)
    print(f"data.max_length={cfg.data.max_length}: {over} of {len(lengths)} samples are longer "
          f"and would be {'cut (data.truncation=right)' if cfg.data.truncation == 'right' else cfg.data.truncation + 'ped'}",
          file=out)
    return report
