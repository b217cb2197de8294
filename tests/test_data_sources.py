"""Data from csv/parquet/arrow files, save_to_disk folders and the `datasets` cache; data.columns; several sources
concatenated or mixed by data.mix; what run.json records of them; `chattune data inspect` on a mix.

Every fixture is written at test time in tmp_path (pyarrow, `datasets`); the cached dataset id is written in the
layout `datasets.load_dataset("org/name")` leaves in HF_DATASETS_CACHE for a hub repository of JSON files, by the
same builder, and read back through `datasets`' own offline lookup."""

import hashlib
import json
import os
import shutil

import datasets
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
from datasets.packaged_modules.json.json import Json

from chattune.cli import main
from chattune.config import load_config
from chattune.data.encode import IGNORE, encode_conversation
from chattune.data.formats import FIX_RECORDS, load_conversations
from chattune.data.readers import find_split
from chattune.data.sources import load_data, mix_counts, mix_order
from chattune.data.templates import get_template
from chattune.errors import ConfigError, DataError
from chattune.train.dataset import generation_eval_samples, prepare_data
from chattune.train.run_files import data_sources, hash_path
from tiny import SPECIAL_ID, ids, make_tiny_llama, make_tokenizer, write_jsonl

ROWS = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(4)]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("sources") / "model")


def user_and_answer(conversations) -> list[tuple[str, str]]:
    return [(c.messages[-2].content, c.messages[-1].content) for c in conversations]


def data_config(*overrides):
    return load_config(None, list(overrides)).data


def problems(excinfo) -> list[str]:
    return str(excinfo.value).split("\n")


# ---------------------------------------------------------------- formats


def write_every_format(root, rows=ROWS) -> dict:
    table = pa.Table.from_pylist(rows)
    paths = {"jsonl": write_jsonl(root / "d.jsonl", rows), "parquet": root / "d.parquet",
             "arrow": root / "d.arrow", "csv": root / "d.csv", "saved": root / "saved", "dict": root / "dict"}
    pq.write_table(table, paths["parquet"])
    feather.write_feather(table, paths["arrow"])  # the Arrow IPC file format (save_to_disk writes the stream one)
    paths["csv"].write_text("instruction,output\n" + "".join(f"{r['instruction']},{r['output']}\n" for r in rows))
    datasets.Dataset.from_list(rows).save_to_disk(str(paths["saved"]))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "validation": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(paths["dict"]))
    return paths


def test_every_format_reads_the_same_records(tmp_path):
    paths = write_every_format(tmp_path)
    expected = [(r["instruction"], r["output"]) for r in ROWS]
    located = {"jsonl": f"{paths['jsonl']}:3", "parquet": f"{paths['parquet']}:row 3",
               "arrow": f"{paths['arrow']}:row 3", "csv": f"{paths['csv']}:row 3",
               "saved": f"{paths['saved']}:row 3", "dict": f"{paths['dict']}/train:row 3"}
    for kind, path in paths.items():
        loaded = load_conversations(path)
        assert user_and_answer(loaded.conversations) == expected, kind
        assert loaded.format == "alpaca" and loaded.conversations[2].source == located[kind], kind
        assert loaded.source.kind == {"dict": "saved"}.get(kind, kind)
    # a saved DatasetDict gives its split as find_split picks a folder's files; the split's own folder is hashed
    evals = load_conversations(paths["dict"], split="eval")
    assert user_and_answer(evals.conversations) == expected[:1]
    assert evals.source.name == f"{paths['dict']}/validation" and evals.source.path == paths["dict"] / "validation"
    # a plain folder holding a table file per split
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(paths["parquet"], folder / "train.parquet")
    shutil.copy(paths["csv"], folder / "dev.csv")
    assert find_split(folder, "train") == folder / "train.parquet" and find_split(folder, "eval") == folder / "dev.csv"


def test_a_parquet_row_encodes_to_the_exact_ids(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    tok = make_tokenizer()
    e = encode_conversation(load_conversations(path).conversations[0], get_template("auto", tok), tok, 1024)
    start, end = SPECIAL_ID["<|im_start|>"], SPECIAL_ID["<|im_end|>"]
    prompt = [start, *ids("system\nYou are tiny."), end, *ids("\n"), start, *ids("user\nq0"), end, *ids("\n"),
              start, *ids("assistant\n")]
    assert e.input_ids == prompt + ids("a0") + [end] + ids("\n")
    assert e.labels == [IGNORE] * len(prompt) + ids("a0") + [end, IGNORE]


def test_table_nulls_read_as_absent_fields(tmp_path):
    """Arrow gives every message object every key of the column (`loss: null` on a user message); those nulls are
    not in the record, so the messages validate as the JSON records do, and `loss: false` still counts."""
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "loss": False},
                          {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}]}]
    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    conv = load_conversations(path).conversations[0]
    assert [(m.role, m.content, m.train) for m in conv.messages] == [
        ("user", "hi", True), ("assistant", "yo", False), ("user", "again", True), ("assistant", "ok", True)]


def test_csv_cells_are_text(tmp_path):
    """Decision: a CSV cell is text, so an answer `42` stays the string "42" and an empty cell is "" (an empty
    answer, valid as in JSON; an empty input adds nothing), never a number or a missing field."""
    path = tmp_path / "d.csv"
    path.write_text('instruction,input,output\nwhat is 6*7,,42\n"two\nlines",x,\n', encoding="utf-8")
    assert user_and_answer(load_conversations(path).conversations) == [("what is 6*7", "42"), ("two\nlines\nx", "")]


# ---------------------------------------------------------------- errors


def test_table_errors_name_file_row_and_field(tmp_path):
    bad = [{"instruction": "q0", "output": "a0"}, {"instruction": "q1", "output": "a1"},
           {"instruction": "q2", "output": None}, {"instruction": "q3", "output": "a3"}]
    path = tmp_path / "b.parquet"
    pq.write_table(pa.Table.from_pylist(bad), path)
    path_ints = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist([{"instruction": 7, "output": "a"}]), path_ints)
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"instruction": "q", "outptu": "a"}\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_data([str(jsonl), str(path), str(path_ints)], "train", data_config())
    assert problems(e) == [f"{jsonl}:1: output: missing (found `outptu`: a typo?)",  # every source's problems at once
                           f"{path}:row 3: output: missing",
                           f"{path_ints}:row 1: instruction: expected a string, got number",
                           FIX_RECORDS]
    kept = load_data(str(path), "train", data_config("data.skip_invalid=true"))
    assert len(kept.conversations) == 3 and kept.skip_report() == [
        "data.skip_invalid: skipped 1 of 4 records (1 missing field); training on the other 3",
        f"  {path}:row 3: output: missing"]


def test_unreadable_sources_are_one_line_each(tmp_path):
    garbage = tmp_path / "x.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(DataError) as e:
        load_conversations(garbage)
    lines = problems(e)
    assert len(lines) == 2 and lines[0].startswith(f"{garbage}: (file): cannot read it as parquet: ")
    assert lines[1] == "fix: check that it is a valid parquet file (export it again), or convert it to JSON lines"
    empty = tmp_path / "e.csv"
    empty.write_bytes(b"")
    with pytest.raises(DataError) as e:
        load_conversations(empty)
    assert problems(e) == [f"{empty}: (file): the file is empty", "fix: point the setting at a file with records"]
    header_only = tmp_path / "h.csv"
    header_only.write_text("instruction,output\n")
    with pytest.raises(DataError) as e:
        load_conversations(header_only)
    assert problems(e)[0] == f"{header_only}: (file): no records (0 rows)"
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "dev.csv").write_text("instruction,output\nq,a\n")
    with pytest.raises(DataError) as e:
        load_conversations(folder)
    assert problems(e) == [f"{folder}: (folder): no train split: expected train.jsonl/.json/.csv/.parquet/.arrow; "
                           "it holds dev.csv", "fix: name the train file train.jsonl, or point the setting at the "
                           "file itself"]
    saved = tmp_path / "saved"
    datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(saved))
    with pytest.raises(DataError) as e:
        load_conversations(saved)
    assert problems(e)[0] == f"{saved}: (folder): no train split: expected train; it holds test"


def test_a_missing_path_that_looks_like_a_dataset_id_gets_the_hf_hint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as e:
        load_conversations("org/name")
    assert problems(e) == ["org/name: (path): file or folder not found",
                           "fix: check the path in data.train / data.eval (relative paths start where you run "
                           "chattune); a dataset id in the `datasets` cache is written hf:org/name"]


# ---------------------------------------------------------------- the datasets cache


def cache_dataset(cache, repo: str, splits: dict[str, list[dict]], tmp, config: str = "default") -> None:
    """What `load_dataset(repo)` leaves in HF_DATASETS_CACHE for a hub repository of JSON files:
    `org___name/<config>/<version>/<commit>/{dataset_info.json, name-<split>.arrow}`, written by the same builder."""
    org, name = repo.split("/")
    files = {}
    for split, rows in splits.items():
        files[split] = str(write_jsonl(tmp / f"{name}-{config}-{split}.jsonl", rows))
    builder = Json(data_files=files, cache_dir=str(tmp / "build"), dataset_name=name, config_name=config,
                   config_id=config, hash=COMMIT)
    builder.download_and_prepare(output_dir=str(cache / f"{org}___{name}" / config / str(builder.config.version)
                                                / COMMIT))


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """A `datasets` cache in tmp_path (what HF_DATASETS_CACHE sets when `datasets` is imported), with the offline
    variables unset as on a machine with network."""
    cache = tmp_path / "hf-datasets"
    cache_dataset(cache, "org/name", {"train": ROWS, "validation": ROWS[:1]}, tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    return cache


def test_a_cached_dataset_id_is_read_offline(hf_cache, monkeypatch):
    seen = []
    real = datasets.load_dataset

    def load_dataset(*args, **kwargs):
        seen.append((os.environ.get("HF_HUB_OFFLINE"), os.environ.get("HF_DATASETS_OFFLINE"),
                     datasets.config.HF_HUB_OFFLINE))
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    online = datasets.config.HF_HUB_OFFLINE
    loaded = load_conversations("hf:org/name")
    assert seen == [("1", "1", True)]  # offline while reading ...
    assert "HF_HUB_OFFLINE" not in os.environ and datasets.config.HF_HUB_OFFLINE == online  # ... and only then
    assert user_and_answer(loaded.conversations) == [(r["instruction"], r["output"]) for r in ROWS]
    assert loaded.conversations[1].source == "hf:org/name/train:row 2"
    assert loaded.source.kind == "hf" and loaded.source.path is None and len(loaded.source.fingerprint) == 16
    assert user_and_answer(load_conversations("hf:org/name", split="eval").conversations) == [("q0", "a0")]
    with pytest.raises(DataError) as e:
        load_conversations("hf:org/name", split="test")
    assert problems(e)[0] == "hf:org/name: (dataset): no test split: expected test; it holds train, validation"


def test_an_id_not_in_the_cache_is_a_clear_error(hf_cache):
    with pytest.raises(DataError) as e:
        load_conversations("hf:org/other")
    assert problems(e) == [
        f"hf:org/other: (dataset): not in the `datasets` cache ({hf_cache}); chattune reads data offline and never "
        "downloads it",
        "fix: load it once where there is network (`python -c \"import datasets; datasets.load_dataset('org/other')\"`"
        " with the same HF_DATASETS_CACHE), or save it with save_to_disk, or download its files (`hf download "
        "org/other --repo-type dataset --local-dir DIR`), and point the setting at the folder or file"]
    with pytest.raises(DataError) as e:
        load_conversations("hf:not an id")
    assert problems(e)[0] == "hf:not an id: (dataset): not a dataset id"


def test_a_cached_configuration_is_picked_with_a_colon(hf_cache, tmp_path):
    cache_dataset(hf_cache, "org/multi", {"train": ROWS[:1]}, tmp_path, config="one")
    cache_dataset(hf_cache, "org/multi", {"train": ROWS[1:2]}, tmp_path, config="two")
    with pytest.raises(DataError) as e:
        load_conversations("hf:org/multi")
    line = problems(e)[0]
    assert line.startswith(f"hf:org/multi: (dataset): cannot load it from the `datasets` cache ({hf_cache}): There "
                           "are multiple 'org/multi' configurations in the cache: ") and "one" in line and "two" in line
    assert problems(e)[1] == ("fix: name the configuration (hf:org/multi:CONFIG) where the cache holds several, or "
                              "load it again where there is network")
    loaded = load_conversations("hf:org/multi:two")
    assert user_and_answer(loaded.conversations) == [("q1", "a1")]
    assert loaded.conversations[0].source == "hf:org/multi:two/train:row 1"


# ---------------------------------------------------------------- data.columns


def test_columns_map_onto_the_format(tmp_path):
    path = tmp_path / "qa.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "q0", "answer": "a0", "extra": 1},
                                         {"question": "q1", "answer": None, "extra": 2}]), path)
    d = data_config("data.columns.instruction=question", "data.columns.output=answer")
    with pytest.raises(DataError) as e:
        load_data(str(path), "train", d)
    assert problems(e) == [f"{path}:row 2: answer: missing", FIX_RECORDS]  # named as the data names it
    jsonl = write_jsonl(tmp_path / "mixed.jsonl", [{"instruction": "j0", "output": "k0"}])
    both = load_data([str(jsonl), str(path)], "train", data_config("data.columns.instruction=question",
                                                                   "data.columns.output=answer",
                                                                   "data.skip_invalid=true"))
    assert user_and_answer(both.conversations) == [("j0", "k0"), ("q0", "a0")]  # a source with the field keeps it
    tok = make_tokenizer()
    cfg = load_config(None, [f"data.train={path}", f"data.eval={jsonl}", "data.columns.instruction=question",
                             "data.columns.output=answer", "data.skip_invalid=true"])
    data = prepare_data(cfg, tok, get_template("auto", tok), log=lambda m: None)
    assert (len(data.train), len(data.eval)) == (1, 1)  # the mapping is for data.train; data.eval has the fields


def test_column_mapping_errors(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.columns.prompt=question"])
    assert str(e.value) == ("config key `data.columns`: Value error, data.columns.prompt: not a format field; the "
                            "fields a column can be read as: instruction, input, output, system, history, messages, "
                            "conversations, tools (got {'prompt': 'question'})")
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nq,a\n")
    with pytest.raises(DataError) as e:
        load_data(str(path), "train", data_config("data.columns.instruction=question", "data.columns.output=reply"))
    assert problems(e) == [f"{path}: (columns): data.columns.output=reply: no column `reply` (nor `output`); its "
                           "columns: question, answer",
                           "fix: set data.columns.FIELD to a column the data has, or leave it out"]
    plain = write_jsonl(tmp_path / "plain.jsonl", ROWS)
    with pytest.raises(DataError) as e:
        load_data(str(plain), "train", data_config("data.columns.instruction=question"))
    assert problems(e) == ["data.columns.instruction=question: no source has a column `question` (the records have "
                           "`instruction` itself)", "fix: leave the setting out, or name a column the data has"]


# ---------------------------------------------------------------- several sources


def test_mix_counts_and_order_for_a_seed():
    # N = min(100 / 0.7, 10 / 0.3) rounded down = 33: 23.1 and 9.9 by the largest remainder -> 23 and 10
    assert mix_counts([100, 10], [0.7, 0.3]) == [23, 10]
    assert mix_counts([8, 3], [0.75, 0.25]) == [8, 2]  # N = 10: 7.5 and 2.5, the tie to the first source
    assert mix_counts([5, 3, 4], [0.5, 0.0, 0.5]) == [4, 0, 4]  # a weight 0 leaves a source out
    assert mix_counts([10, 10, 10], [1 / 3] * 3) == [10, 10, 10]
    order = mix_order([6, 4], [0.5, 0.5], 42)
    assert order == [(1, 3), (0, 0), (1, 0), (0, 4), (1, 1), (0, 3), (0, 2), (1, 2)]
    assert mix_order([6, 4], [0.5, 0.5], 42) == order  # a pure function of the sizes, weights and seed
    assert sorted(mix_order([6, 4], [0.5, 0.5], 7)) != sorted(order)  # another seed, another sample of source 0
    assert mix_order([2, 3], None, 42) == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]  # no weights: concatenated


def test_mixing_sources_of_different_formats(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"j{i}", "output": f"k{i}"} for i in range(100)])
    b = tmp_path / "b.parquet"
    pq.write_table(pa.Table.from_pylist([{"instruction": f"p{i}", "output": f"r{i}"} for i in range(10)]), b)
    d = data_config(f"data.train=[{a}, {b}]", "data.mix=[0.7, 0.3]")
    mixed = load_data(d.train, "train", d, 42, d.mix)
    assert [(s.kind, s.rows, s.weight, s.taken) for s in mixed.sources] == [("jsonl", 100, 0.7, 23),
                                                                            ("parquet", 10, 0.3, 10)]
    again = load_data(d.train, "train", d, 42, d.mix)
    assert [c.source for c in again.conversations] == [c.source for c in mixed.conversations]  # resume: same order
    assert sorted(c.source for c in mixed.conversations if str(b) in c.source) == sorted(
        f"{b}:row {i}" for i in range(1, 11))  # the source smallest for its weight is taken whole
    assert mixed.mix_line(42) == (f"data: 33 records drawn by data.mix (seed 42): {a} 23 of 100 (weight 0.7), "
                                  f"{b} 10 of 10 (weight 0.3)")
    concatenated = load_data([str(b), str(a)], "train", d)
    assert [c.source for c in concatenated.conversations][9:11] == [f"{b}:row 10", f"{a}:1"]
    assert concatenated.mix_line(42) == f"data: 2 sources concatenated: {b} (10), {a} (100)"


def test_mix_settings_are_checked():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.train=[a.jsonl, b.parquet]", "data.mix=[1]"])
    assert str(e.value) == ("config key `data`: Value error, data.mix has 1 weights for 2 data.train sources; give "
                            "one weight per source, in the same order (or leave data.mix out to concatenate) (got "
                            "{'train': ['a.jsonl', 'b.parquet'], 'mix': [1]})")
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.train=[a.jsonl, b.parquet]", "data.mix=[0, 0]"])
    assert str(e.value) == ("config key `data.mix`: Value error, data.mix: weights must be finite, at least 0, and "
                            "not all 0; they are normalised to sum to 1 (got [0, 0])")
    with pytest.raises(ConfigError, match=r"data.train: an empty list; give one source or several"):
        load_config(None, ["data.train=[]"])


def test_eval_may_be_a_list_and_feeds_eval_generate(tmp_path):
    paths = write_every_format(tmp_path)
    tok = make_tokenizer()
    cfg = load_config(None, [f"data.train={paths['parquet']}", f"data.eval=[{paths['csv']}, {paths['dict']}]",
                             "train.eval_generate=5", "train.eval_steps=1"])
    data = prepare_data(cfg, tok, get_template("auto", tok), log=lambda m: None)
    assert len(data.train) == 4 and len(data.eval) == 5  # the csv's 4 records and the DatasetDict's validation 1
    samples = generation_eval_samples(cfg, data, log=lambda m: None)
    assert [(s.source, s.reference) for s in samples] == [(f"{paths['csv']}:row {i}", f"a{i - 1}")
                                                          for i in range(1, 5)] + [(f"{paths['dict']}/validation:row 1",
                                                                                    "a0")]


# ---------------------------------------------------------------- run.json, data inspect, train


def test_run_json_records_every_source(tmp_path, hf_cache):
    paths = write_every_format(tmp_path)
    d = data_config(f"data.train=[{paths['jsonl']}, {paths['saved']}, hf:org/name]", "data.mix=[1, 1, 2]")
    mixed = load_data(d.train, "train", d, 42, d.mix)
    record = data_sources(d.train, d.mix, mixed.sources)
    file_sha = hashlib.sha256(paths["jsonl"].read_bytes()).hexdigest()
    folder_sha = hash_path(paths["saved"])
    fingerprint = load_conversations("hf:org/name").source.fingerprint
    assert record == {
        "train": [str(paths["jsonl"]), str(paths["saved"]), "hf:org/name"], "mix": [1.0, 1.0, 2.0],
        "sha256": hashlib.sha256(f"{file_sha}\n{folder_sha}\n{fingerprint}".encode()).hexdigest(),
        "sources": [
            {"source": str(paths["jsonl"]), "read": str(paths["jsonl"]), "kind": "jsonl", "format": "alpaca",
             "rows": 4, "invalid": 0, "weight": 0.25, "taken": 2, "sha256": file_sha},
            {"source": str(paths["saved"]), "read": str(paths["saved"]), "kind": "saved", "format": "alpaca",
             "rows": 4, "invalid": 0, "weight": 0.25, "taken": 2, "sha256": folder_sha},
            {"source": "hf:org/name", "read": "hf:org/name/train", "kind": "hf", "format": "alpaca", "rows": 4,
             "invalid": 0, "weight": 0.5, "taken": 4, "fingerprint": fingerprint}]}
    # a folder's hash covers its files' names and bytes, not where the folder is
    copy = shutil.copytree(paths["saved"], tmp_path / "elsewhere")
    assert hash_path(copy) == folder_sha
    (copy / "state.json").write_text((copy / "state.json").read_text() + " ")
    assert hash_path(copy) != folder_sha


def test_data_inspect_shows_the_mix(tiny, tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"j{i}", "output": f"k{i}"} for i in range(6)])
    b = tmp_path / "b.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": f"p{i}", "answer": f"r{i}"} for i in range(4)]), b)
    rc = main(["data", "inspect", f"data.train=[{a}, {b}]", "data.mix=[0.5, 0.5]", f"model={tiny}",
               "data.columns.instruction=question", "data.columns.output=answer"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    w = max(len(str(a)), len(str(b)))
    assert out.splitlines()[:4] == [
        "data.train: 2 sources, 8 records drawn by data.mix (seed 42)",
        f"  {'source'.ljust(w)}  kind     format  valid  weight  taken",
        f"  {str(a).ljust(w)}  jsonl    alpaca      6   0.500      4",
        f"  {str(b).ljust(w)}  parquet  alpaca      4   0.500      4"]
    assert f"--- sample 0 ({b}:row 4;" in out  # the first record of the mix: (1, 3) in mix_order's order for 42
    rc = main(["data", "inspect", "--sample", "1", str(b), f"model={tiny}", "data.columns.instruction=question",
               "data.columns.output=answer"])
    out, err = capsys.readouterr()
    assert rc == 0 and out.startswith(f"{b}: 4 valid records, format alpaca\n") and f"({b}:row 2;" in out
    rc = main(["data", "inspect", str(b), f"data.train={a}", f"model={tiny}"])
    assert rc == 2 and capsys.readouterr().err == (f"error: the data to inspect is given twice: as {b} and as "
                                                   "data.train=; give one\n")


def test_train_on_a_parquet_and_jsonl_mix_resumes_on_the_same_rows(tiny, tmp_path):
    from chattune.train.trainer import train

    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"repeat {w}", "output": f"{w} {w}"}
                                           for w in ("apple", "pear", "plum", "fig", "kiwi", "lime")])
    b = tmp_path / "b.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": [{"role": "user", "content": f"say {w}"},
                                                       {"role": "assistant", "content": w}]}
                                         for w in ("oat", "rye", "pea", "yam")]), b)

    def run(out, *overrides):
        cfg = load_config(None, [f"model={tiny}", f"data.train=[{a}, {b}]", "data.mix=[0.6, 0.4]",
                                 f"output_dir={out}", "train.precision=fp32", "train.logging_steps=1",
                                 "train.batch_size=2", "train.max_steps=2", "train.save_steps=1", *overrides])
        return train(cfg, log=lambda m: None)

    full = run(tmp_path / "full")
    assert full.steps == 2
    summary = json.loads((tmp_path / "full" / "run.json").read_text())["data"]
    assert summary["samples"] == 10 and summary["mix"] == [0.6, 0.4]
    assert [(s["kind"], s["format"], s["rows"], s["taken"], s["sha256"]) for s in summary["sources"]] == [
        ("jsonl", "alpaca", 6, 6, hashlib.sha256(a.read_bytes()).hexdigest()),
        ("parquet", "messages", 4, 4, hashlib.sha256(b.read_bytes()).hexdigest())]
    split = tmp_path / "split"
    assert run(split, "train.stop_after=1").stopped_early
    run(split, "resume=auto")

    def losses(out):
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    assert losses(split) == pytest.approx(losses(tmp_path / "full"), abs=1e-6)


def test_data_inspect_refuses_keys_it_does_not_read(tmp_path):
    """A key that changes nothing for `data inspect` (train.lr, lora.r, output_dir) is refused naming those that apply."""
    from chattune.commands.data import check_keys
    from chattune.errors import ConfigError

    for key in ("train.lr=1", "lora.r=4", "output_dir=x", "method=lora"):
        with pytest.raises(ConfigError, match=r"has no effect on `chattune data inspect`; the keys that apply: model, "
                                              r"model\.\*, template, data\.\*, train\.seed"):
            check_keys([key])
    check_keys(["model=x", "model.trust_remote_code=true", "template=chatml", "data.max_length=64", "train.seed=3",
                "data.mix=[1, 2]"])


def test_evaluation_during_training_reads_eval_records_with_the_runs_data_settings(tiny, tmp_path):
    """train.eval_generate's samples come from data.eval read as the training data is: data.system for records that
    have none, and data.skip_invalid (one bad eval record is skipped and reported, not the end of the run)."""
    from chattune.config import load_config
    from chattune.data.inspect import tokenizer_and_template
    from chattune.train.dataset import generation_eval_samples, prepare_data

    train_file = write_jsonl(tmp_path / "t.jsonl", [{"instruction": f"say {w}", "output": w} for w in "abcd"])
    eval_file = tmp_path / "e.jsonl"
    eval_file.write_text('{"instruction": "say e", "output": "e"}\n{"instruction": 3}\n'
                         '{"instruction": "say f", "output": "f", "system": "own"}\n', encoding="utf-8")
    cfg = load_config(None, [f"model={tiny}", f"data.train={train_file}", f"data.eval={eval_file}",
                             "data.system=Be brief.", "data.skip_invalid=true", "train.eval_generate=5",
                             "train.eval_steps=1"])
    tokenizer, template = tokenizer_and_template(cfg, lambda m: None)
    data = prepare_data(cfg, tokenizer, template, log=lambda m: None)
    samples = generation_eval_samples(cfg, data, log=lambda m: None)
    assert [(s.prompt.system, s.reference) for s in samples] == [("Be brief.", "e"), ("own", "f")]
    assert len(data.skipped) == 1 and data.skipped[0].startswith(f"{eval_file}:2")


def test_eval_reads_renamed_columns(tiny, tmp_path, capsys):
    """`chattune eval --data x.parquet data.columns.instruction=question data.columns.output=answer`: the same
    mapping as training; without it the missing field is named as the data names it."""
    import datasets

    from chattune.cli import main

    data = tmp_path / "qa.parquet"
    datasets.Dataset.from_list([{"question": f"say {w}", "answer": w} for w in "ab"]).to_parquet(str(data))
    out = tmp_path / "ev"
    rc = main(["eval", "--model", str(tiny), "--data", str(data), "--metrics", "loss", "--out", str(out),
               "--dtype", "fp32", "data.columns.instruction=question", "data.columns.output=answer"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["samples"] == 2 and metrics["loss_tokens"] > 0
    capsys.readouterr()
    assert main(["eval", "--model", str(tiny), "--data", str(data), "--metrics", "loss", "--out",
                 str(tmp_path / "e2")]) == 2
    assert "qa.parquet" in capsys.readouterr().err and not (tmp_path / "e2").exists()
