"""Bad models, every failure explained: broken copies of the tiny model through `chattune train`, `chattune chat`,
`chattune eval`, `chattune serve` and `chattune data inspect`. Each must exit with code 2 and print one message that names the path and the fix,
with no traceback and no output_dir. The counts are printed at the end of the test output."""

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from chattune.cli import main
from chattune.models.load import check_safetensors
from tiny import make_tiny_llama, write_jsonl

FIX_FILES = "fix: re-download the model (or re-export it with `chattune export`) into that folder"
TRIED: Counter = Counter()


def _copy(good: Path, root: Path, name: str) -> Path:
    target = root / name
    shutil.copytree(good, target)
    return target


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def build_cases(good: Path, root: Path) -> dict:
    """name -> (model argument, the exact error message, does `data inspect` (no weights) fail too?)"""
    cases = {}

    missing = root / "no_such_folder"
    cases["missing folder"] = (str(missing), f"model folder {missing} not found (not a folder here, nor a model in the "
                               "Hugging Face cache)\nfix: check model= (a folder, a hub id such as org/name, or "
                               "`bundled`)", True)
    cases["unknown name"] = ("no-such-model-xyz", "model folder no-such-model-xyz not found (not a folder here, nor a "
                             "model in the Hugging Face cache)\nfix: check model= (a folder, a hub id such as org/name, "
                             "or `bundled`)", True)
    file = good / "model.safetensors"
    cases["a file, not a folder"] = (str(file), f"model={file} is a file; point model= at the folder that holds "
                                      "config.json and the weights (or use `bundled`)", True)

    p = _copy(good, root, "no_config")
    (p / "config.json").unlink()
    (p / "adapter_config.json").write_text("{}")
    cases["no config.json (an adapter)"] = (str(p), f"model folder {p} has no config.json (it looks like an adapter: "
                                            "use it with --adapter / as a run's output)\nfix: point model= at a Hugging "
                                            "Face model folder (config.json, weights and tokenizer files), or use "
                                            "`bundled`", True)

    p = _copy(good, root, "broken_config")
    text = (p / "config.json").read_text()
    (p / "config.json").write_text(text[: len(text) // 2])  # cut in the middle, as an interrupted copy leaves it
    with pytest.raises(json.JSONDecodeError) as e:
        json.loads(text[: len(text) // 2])
    detail = f"{e.value.msg} (line {e.value.lineno}, column {e.value.colno})"
    cases["broken config.json"] = (str(p), f"{p / 'config.json'}: not valid JSON: {detail}\n{FIX_FILES}", True)

    p = _copy(good, root, "no_model_type")
    _edit_json(p / "config.json", lambda c: c.pop("model_type"))
    cases["config.json without model_type"] = (str(p), f"{p / 'config.json'}: no `model_type` key, so the "
                                               f"architecture is unknown\n{FIX_FILES}", True)

    p = _copy(good, root, "no_weights")
    (p / "model.safetensors").unlink()
    cases["no weights"] = (str(p), f"model folder {p} has no weights: expected model.safetensors (or "
                           "model.safetensors.index.json with its shards, or pytorch_model.bin); it holds "
                           "chat_template.jinja, config.json, generation_config.json, tokenizer.json, "
                           f"tokenizer_config.json\n{FIX_FILES}", False)

    p = _copy(good, root, "truncated_weights")
    data = (p / "model.safetensors").read_bytes()
    (p / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases["truncated safetensors"] = (str(p), f"{p / 'model.safetensors'}: file is truncated or corrupt "
                                      f"({len(data) // 2} bytes, its header describes {len(data)}): re-download/"
                                      f"re-export it\n{FIX_FILES}", False)

    p = _copy(good, root, "garbage_weights")
    (p / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\0" * 64)
    cases["corrupt safetensors header"] = (str(p), f"{p / 'model.safetensors'}: file is truncated or corrupt (its "
                                           f"header is not valid safetensors JSON): re-download/re-export it\n"
                                           f"{FIX_FILES}", False)

    p = _copy(good, root, "missing_shard")
    (p / "model.safetensors").rename(p / "model-00001-of-00002.safetensors")
    (p / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors"}}))
    cases["missing shard"] = (str(p), f"{p / 'model.safetensors.index.json'} lists shards that are missing: "
                              f"model-00002-of-00002.safetensors\n{FIX_FILES}", False)

    p = _copy(good, root, "no_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (p / name).unlink()
    cases["no tokenizer files"] = (str(p), f"model folder {p} has no tokenizer files (tokenizer.json, "
                                   "tokenizer_config.json, tokenizer.model)\nfix: copy the tokenizer files that came "
                                   "with the model into it", True)

    p = _copy(good, root, "bigger_tokenizer")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(p)
    tok.add_tokens([f"<extra_{i}>" for i in range(5)])
    tok.save_pretrained(p)
    cases["tokenizer larger than the embedding"] = (
        str(p), f"the tokenizer in {p} has 278 tokens, but the model's embedding matrix has 273 rows (config.json "
        "vocab_size): token ids past 272 would crash or train garbage; the tokenizer belongs to another model\n"
        "fix: use the tokenizer files that came with the model", True)

    p = _copy(good, root, "config_not_matching_weights")
    _edit_json(p / "config.json", lambda c: c.update(hidden_size=64, intermediate_size=128))
    cases["config.json not matching the weights"] = (
        str(p), f"cannot load model from {p}: config.json does not match the weights (model.embed_tokens.weight: "
        "[273, 32] in the weights, [273, 64] by config.json)\n"
        "fix: use the config.json that came with these weights (or re-download the model)", False)
    return cases


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-models")
    good = make_tiny_llama(root / "good")
    data = write_jsonl(root / "data.jsonl", [{"instruction": "say a", "output": "a"}])
    return good, data, build_cases(good, root / "broken")


CASES = ["missing folder", "unknown name", "a file, not a folder", "no config.json (an adapter)", "broken config.json",
         "config.json without model_type", "no weights", "truncated safetensors", "corrupt safetensors header",
         "missing shard", "no tokenizer files", "tokenizer larger than the embedding",
         "config.json not matching the weights"]


def error_message(stderr: str) -> str:
    assert "Traceback" not in stderr
    at = stderr.index("error: ")
    return stderr[at + len("error: "):].rstrip("\n")


def test_the_cases_are_all_built(setup):
    assert sorted(setup[2]) == sorted(CASES)
    TRIED["broken models"] = len(CASES)


@pytest.mark.parametrize("case", CASES)
def test_train_explains_a_bad_model(setup, capsys, tmp_path, case):
    _, data, cases = setup
    model, message, _ = cases[case]
    rc = main(["train", f"model={model}", f"data.train={data}", f"output_dir={tmp_path / 'run'}", "train.max_steps=1",
               "train.precision=fp32"])
    _, err = capsys.readouterr()
    assert rc == 2
    assert error_message(err) == message
    assert not (tmp_path / "run").exists()
    TRIED["chattune train: exit 2, exact message"] += 1


@pytest.mark.parametrize("case", CASES)
def test_chat_explains_a_bad_model(setup, capsys, case):
    model, message, _ = setup[2][case]
    rc = main(["chat", "--model", model, "--prompt", "hi", "--max-new-tokens", "2"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert error_message(err) == message
    TRIED["chattune chat: exit 2, exact message"] += 1


@pytest.mark.parametrize("case", CASES)
def test_data_inspect_needs_only_config_and_tokenizer(setup, capsys, case):
    _, data, cases = setup
    model, message, inspect_fails = cases[case]
    rc = main(["data", "inspect", str(data), f"model={model}"])
    out, err = capsys.readouterr()
    if inspect_fails:
        assert rc == 2 and error_message(err) == message
        TRIED["data inspect: exit 2, exact message"] += 1
    else:  # the weights are not read to inspect data
        assert rc == 0 and "1 valid records" in out
        TRIED["data inspect: fine without usable weights"] += 1


@pytest.mark.parametrize("case", CASES)
def test_eval_explains_a_bad_model(setup, capsys, tmp_path, case):
    _, data, cases = setup
    model, message, _ = cases[case]
    rc = main(["eval", "--model", model, "--data", str(data), "--metrics", "exact", "--out", str(tmp_path / "ev")])
    out, err = capsys.readouterr()
    assert rc == 2 and error_message(err) == message
    assert not (tmp_path / "ev").exists()
    TRIED["chattune eval: exit 2, exact message, nothing written"] += 1


@pytest.mark.parametrize("case", CASES)
def test_serve_explains_a_bad_model_before_listening(setup, capsys, case):
    model, message, _ = setup[2][case]
    rc = main(["serve", "--model", model, "--port", "1"])  # fails while loading: port 1 is never bound
    _, err = capsys.readouterr()
    assert rc == 2 and error_message(err) == message
    TRIED["chattune serve: exit 2, exact message"] += 1


def test_a_complete_safetensors_file_passes_the_check(setup):
    check_safetensors(setup[0] / "model.safetensors")  # no error for the intact file


def test_zz_print_counts(capsys):
    with capsys.disabled():
        print("\n[bad models] " + "; ".join(f"{k}: {v}" for k, v in TRIED.items()))
    assert len(CASES) >= 5 and all(n > 0 for n in TRIED.values())
