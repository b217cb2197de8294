"""Readers: a data source -> raw records, each with where it comes from, for the validator (formats.py).

- JSON lines and JSON (an array, or one object): read here by hand, so that every problem names its line
  (`file:line`; JSON arrays: `file[index]`), down to a byte that is not UTF-8; a bad line is yielded as a problem,
  for the validator to report with the record's others.
- `.csv`, `.parquet`, `.arrow`, folders written by `datasets`' `save_to_disk`, and dataset ids in `datasets`' cache
  (`hf:org/name`): read with the `datasets` library; a row is located as `file:row N` (1-based).
A source that cannot be read at all raises DataError. `data.columns` renames the data's columns to the format's
field names (`map_columns`).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from chattune.errors import DataError

SPLIT_NAMES = {
    "train": ("train",),
    "eval": ("validation", "valid", "dev", "eval"),
    "test": ("test",),
}
BOM = b"\xef\xbb\xbf"
TABLE_KINDS = {".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}  # suffix -> `datasets` builder
DATA_SUFFIXES = (".jsonl", ".json", *TABLE_KINDS)
HUB_PREFIX = "hf:"  # `hf:org/name[:config]`: a dataset id in `datasets`' cache; anything else is a local path
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


class _Invalid(Exception):
    """One problem with one field of a record (a reader yields one for a line it cannot parse)."""

    def __init__(self, field_name: str, message: str, reason: str = "invalid value"):
        super().__init__(f"{field_name}: {message}")
        self.field_name, self.message, self.reason = field_name, message, reason


def _type_name(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


@dataclass
class RawSource:
    """One source's records as read, before validation."""

    name: str  # how messages name it: the file read, `folder/train` (a saved DatasetDict's split), `hf:id/train`
    kind: str  # jsonl, json, csv, parquet, arrow, saved (save_to_disk), hf (a cached dataset id)
    what: str  # what a problem with all of it calls it: file, folder or dataset
    records: Iterable[tuple[str, Any]]  # (location, record or _Invalid)
    path: Path | None = None  # the file or folder read (None for a cached dataset id)
    columns: list[str] | None = None  # a table's columns (None for JSON, where each record has its own keys)
    fingerprint: str | None = None  # `datasets`' fingerprint of a cached dataset id
    renamed: dict[str, str] = field(default_factory=dict)  # format field -> the data's column (data.columns)

    @property
    def empty(self) -> str:
        """What an empty source holds, for the message."""
        return "an empty JSON array" if self.kind in ("json", "jsonl") else "0 rows"

    def shown(self, field_name: str) -> str:
        """A problem's field as the data names it: `answer` where data.columns.output=answer renamed it."""
        head = re.match(r"\w+", field_name)
        if head and head.group() in self.renamed:
            return self.renamed[head.group()] + field_name[head.end():]
        return field_name


# ---------------------------------------------------------------- files


def find_split(path: str | Path, split: str) -> Path:
    """A file is used as is, and so is a folder written by `save_to_disk` (its split is picked when it is read);
    any other folder must hold a file for `split` (train / validation|valid|dev|eval / test) in a data format."""
    path = Path(path)
    if not path.exists():
        raise DataError([f"{path}: (path): file or folder not found"], _not_found_fix(str(path)))
    if path.is_file() or is_saved_dataset(path):
        return path
    for stem in SPLIT_NAMES[split]:
        for ext in DATA_SUFFIXES:
            if (path / f"{stem}{ext}").is_file():
                return path / f"{stem}{ext}"
    names = " or ".join(f"{stem}{'/'.join(DATA_SUFFIXES)}" for stem in SPLIT_NAMES[split])
    present = sorted(p.name for p in path.iterdir() if p.suffix in DATA_SUFFIXES)
    found = f"; it holds {', '.join(present)}" if present else "; it holds no data file"
    raise DataError([f"{path}: (folder): no {split} split: expected {names}{found}"],
                    f"fix: name the {split} file {SPLIT_NAMES[split][0]}.jsonl, or point the setting at the file itself")


def _not_found_fix(path: str) -> str:
    fix = "fix: check the path in data.train / data.eval (relative paths start where you run chattune)"
    if _HUB_ID.fullmatch(path) and "/" in path and not Path(path).suffix:
        fix += f"; a dataset id in the `datasets` cache is written {HUB_PREFIX}{path}"
    return fix


def is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` (state.json) or `DatasetDict.save_to_disk` (dataset_dict.json):
    the files `datasets.load_from_disk` itself looks for."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def open_source(spec: str | Path, split: str = "train", columns: dict[str, str] | None = None) -> RawSource:
    """The records of one source: a JSON/JSON-lines/table file, a folder (its `split` file, or a saved dataset's
    `split`), or `hf:org/name[:config]` (its `split`, from the `datasets` cache, offline); `columns` renamed."""
    spec = str(spec)
    if spec.startswith(HUB_PREFIX):
        source = _read_cached_id(spec, split)
    else:
        path = find_split(spec, split)
        if path.is_dir():
            source = _read_saved(path, split)
        elif path.suffix in TABLE_KINDS:
            source = _read_table(path)
        else:
            kind = "jsonl" if path.suffix == ".jsonl" else "json"
            source = RawSource(str(path), kind, "file", iter_raw_records(path), path)
    return map_columns(source, columns) if columns else source


def _decode(path: Path, raw: bytes) -> tuple[str, list[tuple[int, str]]]:
    """The text of the file, and (line, problem) for every line holding bytes that are not UTF-8 (those lines
    are left out of the text, so a JSON-lines file can still skip them)."""
    try:
        return raw.decode("utf-8"), []
    except UnicodeDecodeError:
        pass
    lines, bad, offset = [], [], 0
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            column = len(line[: e.start].decode("utf-8", errors="replace")) + 1
            bad.append((lineno, f"not UTF-8: byte {line[e.start]:#04x} at byte offset {offset + e.start} "
                                f"(column {column}); re-save the file as UTF-8"))
            lines.append("")
        offset += len(line) + 1
    return "\n".join(lines), bad


def iter_raw_records(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (location, parsed JSON value or `_Invalid`) for every record; raises DataError on unreadable files.

    A `.jsonl` file (or any file not starting with `[`) holds one record per line; a file starting with `[` is a
    JSON array; a `.json` file may also hold one object. A UTF-8 byte order mark (as Windows editors write it) is
    accepted at the start of the file and at the start of a line (files joined with `cat`)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError([f"{path}: (file): cannot read: {e.strerror}"], "fix: check the file's permissions") from None
    if raw.startswith(BOM):
        raw = raw[len(BOM):]
    if not raw.strip():
        what = "the file is empty" if not raw else f"the file holds only whitespace ({len(raw)} bytes)"
        raise DataError([f"{path}: (file): {what}"],
                        "fix: point the setting at a file with records (JSON lines: one object per line)")
    text, bad_lines = _decode(path, raw)
    stripped = text.lstrip()
    if path.suffix == ".json" and not bad_lines and stripped[:1] not in ("[", "{"):
        try:
            scalar = json.loads(text)
        except json.JSONDecodeError:
            pass  # not one JSON value: read it as JSON lines below
        else:
            raise DataError([f"{path}:1: (file): expected a JSON array of records (or one record object), got "
                             f"{_type_name(scalar)}"], "fix: a .json file holds [{...}, {...}]; a .jsonl file holds "
                            "one {...} record per line")
    if stripped.startswith("[") or (path.suffix == ".json" and stripped.startswith("{")):
        if bad_lines:  # one JSON document: a bad byte anywhere spoils all of it
            raise DataError([f"{path}:{line}: (file): {msg}" for line, msg in bad_lines],
                            "fix: re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 IN > OUT`)")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if stripped.startswith("{"):
                first = next(line for line in text.splitlines() if line.strip())
                if _is_json(first):  # a .json file that is really JSON lines
                    yield from _iter_jsonl(path, text, [])
                    return
            closer = "]" if stripped.startswith("[") else "}"
            cut = f"; the file does not end with `{closer}`: cut off?" if not text.rstrip().endswith(closer) else ""
            raise DataError([f"{path}:{e.lineno}: (file): invalid JSON: {_json_error(e)}{cut}"],
                            "fix: repair the JSON (or re-export the file); `python -m json.tool FILE` shows "
                            "where it breaks") from None
        if isinstance(data, dict):
            data = [data]
        for i, rec in enumerate(data):
            yield f"{path}[{i}]", rec
    else:
        yield from _iter_jsonl(path, text, bad_lines)


def _json_error(e: json.JSONDecodeError) -> str:
    """`Expecting value (column 3)`; `Unterminated string starting at column 3`."""
    return f"{e.msg} column {e.colno}" if e.msg.endswith(" at") else f"{e.msg} (column {e.colno})"


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False


def _iter_jsonl(path: Path, text: str, bad_lines: list[tuple[int, str]]) -> Iterator[tuple[str, Any]]:
    bad = dict(bad_lines)
    for lineno, line in enumerate(text.split("\n"), 1):
        loc = f"{path}:{lineno}"
        if lineno in bad:
            yield loc, _Invalid("(line)", bad[lineno], "not UTF-8")
            continue
        line = line.lstrip("\ufeff")
        if not line.strip():
            continue
        try:
            yield loc, json.loads(line)
        except json.JSONDecodeError as e:
            yield loc, _Invalid("(line)", f"invalid JSON: {_json_error(e)}", "invalid JSON")


# ---------------------------------------------------------------- sources read with `datasets`


def _datasets():
    """The `datasets` library, imported on first use (it takes a second), its progress bars and notices off:
    chattune prints its own lines about the data."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors come back as chattune's DataError
    return datasets


def _failures(datasets) -> tuple[type[BaseException], ...]:
    """What reading a damaged or foreign file raises through `datasets` (parsers' ValueErrors, I/O errors, its own
    wrappers), as opposed to a bug, which should show its traceback."""
    return ValueError, OSError, KeyError, datasets.exceptions.DatasetsError


@contextlib.contextmanager
def offline():
    """No network while a source is read. `datasets` and `huggingface_hub` read HF_HUB_OFFLINE /
    HF_DATASETS_OFFLINE once, when imported, so their module copies are set as well as the variables (for anything
    they start); all are put back after."""
    import huggingface_hub.constants as hub

    datasets = _datasets()
    saved_env = {name: os.environ.get(name) for name in OFFLINE_VARIABLES}
    saved = (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, hub.HF_HUB_OFFLINE)
    os.environ.update(dict.fromkeys(OFFLINE_VARIABLES, "1"))
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield datasets
    finally:
        datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, hub.HF_HUB_OFFLINE = saved
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _one_line(e: BaseException) -> str:
    """The reason in the parser's own words, on one line (`datasets` wraps them in "An error occurred while
    generating the dataset")."""
    while isinstance(e, _datasets().exceptions.DatasetGenerationError) and (e.__cause__ or e.__context__):
        e = e.__cause__ or e.__context__
    text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return (text[:300] + "...") if len(text) > 300 else text or type(e).__name__


def _read_table(path: Path) -> RawSource:
    """A .csv, .parquet or .arrow file (Arrow IPC stream or file), read by `datasets`' builder of that name."""
    kind = TABLE_KINDS[path.suffix]
    if path.stat().st_size == 0:
        raise DataError([f"{path}: (file): the file is empty"], "fix: point the setting at a file with records")
    # `datasets` converts a file to Arrow in a cache folder first: a throwaway folder keeps a copy of every version
    # of every data file out of the user's cache (the rows are kept in memory).
    with tempfile.TemporaryDirectory(prefix="chattune-data-") as cache, offline() as datasets:
        try:
            options = _csv_options(path, datasets) if kind == "csv" else {}
            ds = datasets.load_dataset(kind, data_files={"train": str(path)}, split="train", cache_dir=cache,
                                       keep_in_memory=True, **options)
        except _failures(datasets) as e:  # the parser's reason, about the user's file
            if _no_rows(path, kind):  # `datasets` fails on a table of 0 rows, each format in its own words
                raise DataError([f"{path}: (file): no records (0 rows)"],
                                "fix: point the setting at a file with records") from None
            raise DataError([f"{path}: (file): cannot read it as {kind}: {_one_line(e)}"],
                            f"fix: check that it is a valid {kind} file (export it again), or convert it to JSON "
                            "lines") from None
        return _table_source(str(path), kind, "file", ds, path)


def _csv_options(path: Path, datasets) -> dict:
    """CSV cells are text: every column is read as a string (pandas would make an answer `42` a number and `007`
    7), and an empty cell as "" (an empty answer, valid as in JSON), not as a missing value. The column names come
    from the header row, which `datasets` needs to be told the types."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), [])
    return {"features": datasets.Features({name: datasets.Value("string") for name in header}), "na_filter": False}


def _no_rows(path: Path, kind: str) -> bool:
    """Whether a table file that `datasets` could not read is a valid one with a header (or schema) and no rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if kind == "csv":
            with open(path, newline="", encoding="utf-8-sig") as f:
                return not any(any(cell.strip() for cell in row) for row in list(csv.reader(f))[1:])
        if kind == "parquet":
            return pq.ParquetFile(path).metadata.num_rows == 0
        with pa.memory_map(str(path)) as source:
            try:
                return pa.ipc.open_file(source).read_all().num_rows == 0
            except pa.ArrowInvalid:
                source.seek(0)
                return pa.ipc.open_stream(source).read_all().num_rows == 0
    except (ValueError, OSError, csv.Error):  # not even that: the parser's message stands
        return False


def _read_saved(path: Path, split: str) -> RawSource:
    """A folder written by `save_to_disk`: a Dataset as is, or a DatasetDict's `split` (its folder `path/split`)."""
    datasets = _datasets()
    try:
        loaded = datasets.load_from_disk(str(path))
    except _failures(datasets) as e:  # a damaged or partly copied folder: name it and the reason
        raise DataError([f"{path}: (folder): cannot read it as a `save_to_disk` folder: {_one_line(e)}"],
                        "fix: write the folder again with save_to_disk, or copy it whole") from None
    if isinstance(loaded, datasets.DatasetDict):
        key = _pick_split(loaded, split, str(path), "folder")
        return _table_source(f"{path}/{key}", "saved", "folder", loaded[key], path / key)
    return _table_source(str(path), "saved", "folder", loaded, path)


def _read_cached_id(spec: str, split: str) -> RawSource:
    """`hf:org/name[:config]`: the dataset as `datasets.load_dataset` left it in its cache, read offline (chattune
    never downloads data), and its `split`."""
    repo, _, config = spec[len(HUB_PREFIX):].partition(":")
    if not _HUB_ID.fullmatch(repo) or ":" in config:
        raise DataError([f"{spec}: (dataset): not a dataset id"],
                        f"fix: write {HUB_PREFIX}NAME or {HUB_PREFIX}ORG/NAME, and :CONFIG after it to pick one of "
                        "several configurations")
    with offline() as datasets:
        cache = datasets.config.HF_DATASETS_CACHE
        try:
            loaded = datasets.load_dataset(repo, config or None)
        except ConnectionError:  # what `datasets` raises offline for an id it has not cached
            raise DataError([f"{spec}: (dataset): not in the `datasets` cache ({cache}); chattune reads data "
                             "offline and never downloads it"],
                            f"fix: load it once where there is network (`python -c \"import datasets; "
                            f"datasets.load_dataset('{repo}')\"` with the same HF_DATASETS_CACHE), or save it with "
                            "save_to_disk, or download its files (`hf download "
                            f"{repo} --repo-type dataset --local-dir DIR`), and point the setting at the folder or "
                            "file") from None
        except _failures(datasets) as e:  # e.g. several configurations cached, or a damaged cache
            raise DataError([f"{spec}: (dataset): cannot load it from the `datasets` cache ({cache}): "
                             f"{_one_line(e)}"],
                            f"fix: name the configuration ({HUB_PREFIX}{repo}:CONFIG) where the cache holds several, "
                            "or load it again where there is network") from None
    if isinstance(loaded, datasets.DatasetDict):
        key = _pick_split(loaded, split, spec, "dataset")
        spec, loaded = f"{spec}/{key}", loaded[key]
    # `_fingerprint` is the hash `datasets` keys its own cache on; it exposes no public name for it
    return _table_source(spec, "hf", "dataset", loaded, None, loaded._fingerprint)


def _pick_split(splits, split: str, name: str, what: str) -> str:
    """The key of a DatasetDict's `split`, named as find_split names a folder's split files."""
    for key in SPLIT_NAMES[split]:
        if key in splits:
            return key
    raise DataError([f"{name}: ({what}): no {split} split: expected {' or '.join(SPLIT_NAMES[split])}; it holds "
                     f"{', '.join(splits) or 'none'}"],
                    "fix: point the setting at a source with that split, or save the split you want with "
                    "save_to_disk and point the setting at its folder")


def _table_source(name: str, kind: str, what: str, ds, path: Path | None, fingerprint: str | None = None
                  ) -> RawSource:
    rows = [(f"{name}:row {i}", _without_nulls(row)) for i, row in enumerate(ds, 1)]
    return RawSource(name, kind, what, rows, path, list(ds.column_names), fingerprint)


def _without_nulls(value: Any) -> Any:
    """A table stores every column in every row, and every key of a nested object in every one of them: a value a
    record does not have is null. Nulls are dropped from objects, so a row reads as the JSON record would
    (`output: missing`; no `loss: null` on a user message)."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


# ---------------------------------------------------------------- data.columns


def map_columns(source: RawSource, columns: dict[str, str]) -> RawSource:
    """Read the data's columns as the format's fields: with `data.columns.output=answer` the column `answer` is
    `output`. A record without the column keeps its own field of that name; a source with neither is an error
    naming both and the columns it has."""
    records = list(source.records)
    present = source.columns if source.columns is not None else _keys(records)
    missing = [(f, c) for f, c in columns.items() if c not in present and f not in present]
    if missing and records:
        have = ", ".join(present) or "none"
        raise DataError([f"{source.name}: (columns): data.columns.{f}={c}: no column `{c}` (nor `{f}`); its columns: "
                         f"{have}" for f, c in missing],
                        "fix: set data.columns.FIELD to a column the data has, or leave it out")
    source.renamed = {f: c for f, c in columns.items() if c in present}
    source.records = [(loc, _rename(rec, source.renamed)) for loc, rec in records]
    return source


def _keys(records: list[tuple[str, Any]]) -> list[str]:
    """The top-level keys of the records, in the order they first appear."""
    return list(dict.fromkeys(k for _, rec in records if isinstance(rec, dict) for k in rec))


def _rename(rec: Any, renamed: dict[str, str]) -> Any:
    if not isinstance(rec, dict) or not renamed:
        return rec
    out = {k: v for k, v in rec.items() if k not in renamed and k not in renamed.values()}
    for f, c in renamed.items():
        if c in rec:
            out[f] = rec[c]
        elif f in rec:
            out[f] = rec[f]
    return out
