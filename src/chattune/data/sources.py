"""`data.train` / `data.eval`: one source or a list of them, as one list of conversations.

Each source (a file, a folder, a `save_to_disk` folder, a cached `hf:` dataset id: readers.py) is read and
validated on its own (formats.py), and the problems of every source are reported together. The sources are then
concatenated in the order given or, with `data.mix`, mixed by weight (`mix_counts`): the data set is as large as it
can be while every source gives exactly its share without repeating a record, each source's share is a random
sample of its records, and the records come in a random order, all seeded with train.seed. The mix is a pure
function of the sources' valid records, the weights and the seed: a resumed run trains on the same records in the
same order.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from chattune.config import DataConfig
from chattune.data.formats import Conversation, LoadResult, load_conversations
from chattune.errors import DataError


@dataclass
class SourceReport:
    """One source of a data set: what was read and how much of it the data set took (data inspect, run.json)."""

    spec: str  # as given in data.train / data.eval
    name: str  # what was read: the file (a folder's split file), `folder/train` of a saved DatasetDict, hf:ID/train
    kind: str  # jsonl, json, csv, parquet, arrow, saved, hf
    format: str  # alpaca, messages, sharegpt
    rows: int  # valid records
    invalid: int  # records skipped by data.skip_invalid
    taken: int  # records in the data set
    weight: float | None = None  # its data.mix weight, normalised to sum 1 (None: the sources are concatenated)
    path: str | None = None  # the file or folder on disk (None: a cached dataset id)
    fingerprint: str | None = None  # a cached dataset id's `datasets` fingerprint


@dataclass
class DataSet:
    conversations: list[Conversation]
    sources: list[SourceReport]
    results: list[LoadResult]  # per source, in order

    @property
    def mixed(self) -> bool:
        return self.sources[0].weight is not None

    @property
    def problems(self) -> list[str]:
        """The records skipped by data.skip_invalid, one line each, every source's."""
        return [p for r in self.results for p in r.problems]

    def skip_report(self, examples: int = 3) -> list[str]:
        return [line for r in self.results for line in r.skip_report(examples)]

    def mix_line(self, seed: int) -> str | None:
        """The log line on how several sources (or a weighted one) became the data set; None for one source."""
        if len(self.sources) == 1 and not self.mixed:
            return None
        if not self.mixed:
            parts = ", ".join(f"{s.name} ({s.taken})" for s in self.sources)
            return f"data: {len(self.sources)} sources concatenated: {parts}"
        parts = ", ".join(f"{s.name} {s.taken} of {s.rows} (weight {s.weight:.3g})" for s in self.sources)
        return f"data: {len(self.conversations)} records drawn by data.mix (seed {seed}): {parts}"


def as_sources(value: str | list[str] | None) -> list[str]:
    """data.train / data.eval as a list of sources."""
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def load_data(value: str | list[str], split: str, data: DataConfig, seed: int = 42,
              mix: list[float] | None = None, columns_used: bool = True) -> DataSet:
    """Read and validate every source of `value` (its `split`, for folders and datasets with several), then
    concatenate them, or draw them by the weights `mix` seeded with `seed`. Raises DataError with the problems of
    every source (unless data.skip_invalid). `columns_used`: a data.columns mapping must rename something here (so
    it is never ignored; data.eval's sources may use the fields' own names where data.train's need the mapping)."""
    specs = as_sources(value)
    results, problems, hints = [], [], []
    for spec in specs:
        try:
            results.append(load_conversations(spec, split, data.format, data.skip_invalid, data.train_on, data.system,
                                              data.columns))
        except DataError as e:
            problems += e.problems
            hints.append(e.hint)
    if problems:
        raise DataError(problems, "\n".join(dict.fromkeys(h for h in hints if h)))
    if columns_used:
        _check_columns_used(data.columns, results)
    weights = [w / sum(mix) for w in mix] if mix is not None else None
    order = mix_order([len(r.conversations) for r in results], weights, seed)
    taken = Counter(k for k, _ in order)
    reports = [SourceReport(spec, r.source.name, r.source.kind, r.format, len(r.conversations), len(r.reasons),
                            taken[k], weights[k] if weights else None,
                            str(r.source.path) if r.source.path else None, r.source.fingerprint)
               for k, (spec, r) in enumerate(zip(specs, results))]
    return DataSet([results[k].conversations[i] for k, i in order], reports, results)


def mix_counts(sizes: list[int], weights: list[float]) -> list[int]:
    """How many records each source gives a weighted mix (`weights` sum to 1): the largest total N at which every
    source with a weight can give its exact share N * weight (N = min of size / weight, rounded down), split by the
    largest remainder. The source smallest for its weight is taken whole; a weight 0 leaves a source out."""
    total = min(math.floor(n / w + 1e-9) for n, w in zip(sizes, weights) if w > 0)
    shares = [total * w for w in weights]
    counts = [math.floor(s + 1e-9) for s in shares]
    by_remainder = sorted(range(len(shares)), key=lambda k: (counts[k] - shares[k], k))
    for k in by_remainder[: total - sum(counts)]:
        counts[k] += 1
    return [min(c, n) for c, n in zip(counts, sizes)]


def mix_order(sizes: list[int], weights: list[float] | None, seed: int) -> list[tuple[int, int]]:
    """(source, record) pairs in the data set's order: every record of every source in turn (no weights), or each
    source's `mix_counts` share drawn at random without replacement, all in a random order (numpy's generator,
    seeded with `seed`). Written here rather than with `datasets.interleave_datasets`, which picks a random source
    for every record: its proportions and its size then vary with the seed, where these are the weights given."""
    if weights is None:
        return [(k, i) for k, n in enumerate(sizes) for i in range(n)]
    rng = np.random.default_rng(seed)
    picked = [(k, int(i)) for k, (n, c) in enumerate(zip(sizes, mix_counts(sizes, weights)))
              for i in rng.choice(n, c, replace=False)]
    return [picked[j] for j in rng.permutation(len(picked))]


def _check_columns_used(columns: dict[str, str], results: list[LoadResult]) -> None:
    """A data.columns mapping that renames nothing (every source has the field under its own name) is refused, not
    ignored."""
    unused = [f for f in columns if not any(f in r.source.renamed for r in results)]
    if unused:
        raise DataError([f"data.columns.{f}={columns[f]}: no source has a column `{columns[f]}` (the records have "
                         f"`{f}` itself)" for f in unused], "fix: leave the setting out, or name a column the data has")
