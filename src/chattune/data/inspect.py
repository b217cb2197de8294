"""`chattune data inspect SOURCE`: validate every record, show how the sources are mixed (several, or data.mix),
one rendered sample with its trained spans, and token-length statistics with what `data.max_length` and
`data.truncation` do to the samples (the same checks and the same warning as `chattune train`, without loading the
model's weights)."""

from __future__ import annotations

import json
import statistics
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from chattune.config import RunConfig
from chattune.data.encode import (IGNORE, EncodeStats, encode_conversation, encode_conversations, length_for_share,
                                  truncation_report)
from chattune.data.sources import DataSet, as_sources, load_data
from chattune.data.templates import get_template
from chattune.errors import ConfigError
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


def tokenizer_and_template(cfg: RunConfig, log=print):
    """The run's tokenizer and chat template, from the model folder without loading its weights."""
    path = resolve_model_path(cfg.model.path, log, cfg.model.revision)
    tokenizer = load_tokenizer(path, cfg.model.trust_remote_code, cfg.model.revision)
    return tokenizer, get_template(cfg.template, tokenizer, model_type(path), stop_ids_from_folder(path))


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


def sources_table(data: DataSet, seed: int) -> list[str]:
    """How several sources (or one weighted by data.mix) make the data set: per source what was read, its kind and
    format, valid records, weight and records taken."""
    how = f"drawn by data.mix (seed {seed})" if data.mixed else "concatenated"
    rows = [("source", "kind", "format", "valid", "weight", "taken")]
    rows += [(s.name, s.kind, s.format, str(s.rows), "-" if s.weight is None else f"{s.weight:.3f}", str(s.taken))
             for s in data.sources]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"data.train: {len(data.sources)} source{'s' if len(data.sources) > 1 else ''}, "
             f"{len(data.conversations)} records {how}"
             + (f", {len(data.problems)} invalid skipped" if data.problems else "")]
    for r in rows:
        lines.append("  " + "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return lines


def inspect(file: str | list[str] | None, cfg: RunConfig, sample: int = 0, out=None, log=print) -> dict:
    """Validate the source(s) `file` (None: the config's data.train, with its data.mix) as training would (the same
    DataError, exit 2, on bad records or, with data.truncation=error, on over-long samples), then print how the
    sources are mixed, one sample as it is trained and the statistics."""
    out = out or sys.stdout
    color = hasattr(out, "isatty") and out.isatty()
    d = cfg.data
    specs = as_sources(file if file is not None else d.train)
    if not specs:
        raise ConfigError("no data to inspect: give a SOURCE (chattune data inspect FILE) or data.train=SOURCE")
    data = load_data(specs, "train", d, cfg.train.seed, d.mix if file is None else None)
    tokenizer, template = tokenizer_and_template(cfg, log)
    conversations = data.conversations
    if d.truncation == "error":
        encode_conversations(conversations, template, tokenizer, d.max_length, "error")
    stats = EncodeStats()
    encoded = [encode_conversation(c, template, tokenizer, d.max_length, d.truncation, stats) for c in conversations]
    lengths = stats.lengths
    kept = [i for i, e in enumerate(encoded) if e is not None]
    if len(specs) == 1 and not data.mixed:
        loaded = data.results[0]
        print(f"{specs[0]}: {len(loaded.conversations)} valid records, format {loaded.format}"
              + (f", {len(loaded.problems)} invalid skipped" if loaded.problems else ""), file=out)
    else:
        for line in sources_table(data, cfg.train.seed):
            print(line, file=out)
    for line in data.skip_report(examples=20):
        print(line, file=out)
    print(f"template: {template.name} ({template.chosen_because}), model: {cfg.model.path}", file=out)
    legend = "trained tokens in green" if color else "trained tokens inside ⟦ ⟧"
    i = min(max(sample, 0), len(encoded) - 1)
    e = encoded[i]
    if e is None:  # dropped by the truncation policy: show it whole, and say so
        e = encode_conversation(conversations[i], template, tokenizer, 10**12, "right")
        how = f"dropped by data.truncation={d.truncation} at data.max_length={d.max_length}; shown uncut"
    else:
        how = f"cut from {lengths[i]} by data.truncation={d.truncation}" if e.truncated else "as trained"
    print(f"\n--- sample {i} ({conversations[i].source}; {len(e.input_ids)} tokens, {how}; "
          f"{sum(x != IGNORE for x in e.labels)} trained; {legend}) ---", file=out)
    print(render_labels(tokenizer, e.input_ids, e.labels, color), file=out)
    print("--- end of sample ---\n", file=out)
    trained = [sum(x != IGNORE for x in encoded[k].labels) for k in kept] or [0]
    q = statistics.quantiles(lengths, n=20, method="inclusive") if len(lengths) >= 2 else [lengths[0]] * 19
    report = {"records": len(lengths), "min": min(lengths), "median": statistics.median(lengths),
              "p95": round(q[18], 1), "max": max(lengths), "mean_trained": round(statistics.mean(trained), 1),
              "max_length": d.max_length, "over_max_length": stats.truncated, "dropped": stats.dropped,
              "answers_cut": stats.answers_cut, "max_length_for_95": length_for_share(lengths),
              "skipped": dict(sum((Counter(r.reasons) for r in data.results), Counter()).most_common()),
              "sources": [asdict(s) for s in data.sources]}
    print(f"tokens per sample: min {report['min']}, median {report['median']}, p95 {report['p95']}, "
          f"max {report['max']}; trained tokens per sample (mean, after truncation): {report['mean_trained']}",
          file=out)
    print(f"data.max_length={d.max_length}: {stats.truncated} of {len(lengths)} samples are longer and are cut by "
          f"data.truncation={d.truncation}: {stats.dropped} dropped, {stats.answers_cut} lose trained tokens "
          f"({stats.trained_tokens_lost} trained tokens lost); data.max_length={report['max_length_for_95']} keeps "
          "95% of the samples whole", file=out)
    for line in truncation_report(stats, d.max_length, d.truncation):
        print(line, file=out)
    return report
