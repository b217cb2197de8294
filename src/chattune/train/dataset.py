"""A run's data, ready for the Trainer: read, validate, mix and encode the training and eval sources
(`PreparedData`, data/sources.py), the data log lines, and the eval records `train.eval_generate` generates for."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from chattune.config import RunConfig
from chattune.data.encode import EncodeStats, encode_conversations, truncation_report
from chattune.data.sources import DataSet, SourceReport, as_sources, load_data
from chattune.errors import ConfigError, DataError


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


@dataclass
class PreparedData:
    train: ListDataset
    eval: ListDataset | None
    stats: EncodeStats
    skipped: list[str] = field(default_factory=list)
    sources: list[SourceReport] = field(default_factory=list)  # data.train's, with what the mix took of each
    eval_conversations: list = field(default_factory=list)  # the eval records, for train.eval_generate


def encode_data(data: DataSet, cfg: RunConfig, tokenizer, template, stats: EncodeStats, log=print) -> list[dict]:
    """The data set's conversations as training rows; its skipped records reported first."""
    d = cfg.data
    for line in data.skip_report():
        log(line)
    encoded = encode_conversations(data.conversations, template, tokenizer, d.max_length, d.truncation, stats)
    return [{"input_ids": e.input_ids, "labels": e.labels, "source": e.source} for e in encoded]


def prepare_data(cfg: RunConfig, tokenizer, template, log=print) -> PreparedData:
    """Read, validate, mix and encode the training (and eval) data; over-long samples are reported loudly when more
    than 5% lose something (with the data.max_length that would keep 95% whole)."""
    d = cfg.data
    if not d.train:
        raise ConfigError("no training data: set data.train=SOURCE (a .jsonl/.json/.csv/.parquet/.arrow file, a "
                          "folder with a train split, hf:ORG/NAME, or a list of them)")
    train = load_data(d.train, "train", d, cfg.train.seed, d.mix)
    stats = EncodeStats()
    train_rows = encode_data(train, cfg, tokenizer, template, stats, log)
    mixed = train.mix_line(cfg.train.seed)
    if mixed:
        log(mixed)
    for line in truncation_report(stats, d.max_length, d.truncation):
        log(line)
    if not train_rows:
        raise DataError([f"{', '.join(as_sources(d.train))}: every sample was dropped by "
                         f"data.truncation={d.truncation}"], "fix: raise data.max_length")
    eval_rows, eval_conversations, skipped = None, [], train.problems
    if d.eval:
        evals = load_data(d.eval, "eval", d, columns_used=False)  # data.columns is checked on data.train
        eval_rows = encode_data(evals, cfg, tokenizer, template, EncodeStats(), log)
        eval_conversations, skipped = evals.conversations, skipped + evals.problems
    return PreparedData(ListDataset(train_rows), ListDataset(eval_rows) if eval_rows else None, stats, skipped,
                        train.sources, eval_conversations)


def data_line(data: PreparedData, max_length: int) -> str:
    """The log line on the prepared data: samples, how many were too long and what happened to them, eval samples."""
    st = data.stats
    skipped = f", {len(data.skipped)} invalid skipped" if data.skipped else ""
    evals = f", {len(data.eval)} eval samples" if data.eval else ""
    return (f"data: {len(data.train)} training samples ({st.truncated} longer than {max_length} tokens: "
            f"{st.dropped} dropped, {st.answers_cut} with an answer cut{skipped}){evals}")


def generation_eval_samples(cfg: RunConfig, data: PreparedData, log=print) -> list:
    """For train.eval_generate: the first N eval records, to generate for at each evaluation (else none)."""
    eval_samples = []
    if cfg.train.eval_generate and cfg.data.eval:
        from chattune.evaluate.run import samples_from

        eval_samples = samples_from(data.eval_conversations)[:cfg.train.eval_generate]
        log(f"eval: loss on {len(data.eval or [])} samples every {cfg.train.eval_steps} steps, plus "
            f"{', '.join(cfg.train.eval_metrics)} on the first {len(eval_samples)}")
    return eval_samples
