"""A run's data, ready for the Trainer: read, validate and encode the training and eval files (`PreparedData`), the
data log lines, and the eval records `train.eval_generate` generates for."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from chattune.config import RunConfig
from chattune.data.encode import EncodeStats, encode_conversations, truncation_report
from chattune.data.formats import load_conversations
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


def encode_file(path: str, cfg: RunConfig, tokenizer, template, split: str, stats: EncodeStats, skipped: list[str],
                log=print):
    d = cfg.data
    loaded = load_conversations(path, split=split, fmt=d.format, skip_invalid=d.skip_invalid,
                                train_on=d.train_on, default_system=d.system)
    skipped.extend(loaded.problems)
    for line in loaded.skip_report():
        log(line)
    encoded = encode_conversations(loaded.conversations, template, tokenizer, d.max_length, d.truncation, stats)
    return [{"input_ids": e.input_ids, "labels": e.labels, "source": e.source} for e in encoded]


def prepare_data(cfg: RunConfig, tokenizer, template, log=print) -> PreparedData:
    """Read, validate and encode the training (and eval) data; over-long samples are reported loudly when more
    than 5% lose something (with the data.max_length that would keep 95% whole)."""
    if not cfg.data.train:
        raise ConfigError("no training data: set data.train=FILE (.json/.jsonl, or a folder with a train split)")
    stats, skipped = EncodeStats(), []
    train_rows = encode_file(cfg.data.train, cfg, tokenizer, template, "train", stats, skipped, log)
    for line in truncation_report(stats, cfg.data.max_length, cfg.data.truncation):
        log(line)
    if not train_rows:
        raise DataError([f"{cfg.data.train}: every sample was dropped by data.truncation={cfg.data.truncation}"],
                        "fix: raise data.max_length")
    eval_rows = None
    if cfg.data.eval:
        eval_rows = encode_file(cfg.data.eval, cfg, tokenizer, template, "eval", EncodeStats(), skipped, log)
    return PreparedData(ListDataset(train_rows), ListDataset(eval_rows) if eval_rows else None, stats, skipped)


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
        from chattune.evaluate.run import load_samples

        eval_samples = load_samples(cfg.data.eval, cfg.train.eval_generate, cfg.data.format, split="eval")
        log(f"eval: loss on {len(data.eval or [])} samples every {cfg.train.eval_steps} steps, plus "
            f"{', '.join(cfg.train.eval_metrics)} on the first {len(eval_samples)}")
    return eval_samples
