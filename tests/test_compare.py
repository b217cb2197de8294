"""`chattune compare` on the tiny model: every report file with sane values, and a second run trains nothing."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import yaml

from tiny import make_tiny_llama, write_jsonl

WORDS = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "nut", "oat", "rye", "yam", "pea"]


def chattune(*args):
    return subprocess.run([sys.executable, "-m", "chattune", *args], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    model = make_tiny_llama(root / "model")
    data = write_jsonl(root / "spo.jsonl", [{"instruction": f"extract {w}", "output": f"{w}_is_{w[::-1]}"}
                                           for w in WORDS])
    spec = {"train_data": str(data), "test_split": 0.25, "output_dir": str(root / "out"),
            "shared": {"model": str(model), "train": {"max_steps": 3, "batch_size": 2, "precision": "fp32",
                                                      "logging_steps": 1}},
            "eval": {"metrics": "triple_f1,exact", "max_new_tokens": 4, "batch_size": 2},
            "variants": [{"name": "lora", "overrides": {"method": "lora", "train": {"lr": 1e-3}}},
                         {"name": "freeze", "overrides": ["method=freeze", "freeze.trainable_layers=1"]}]}
    cfg = root / "compare.yaml"
    cfg.write_text(yaml.safe_dump(spec))
    return root, cfg


def test_compare_writes_every_report_file_and_reruns_nothing(setup):
    root, cfg = setup
    r = chattune("compare", str(cfg), "lora.r=4")
    assert r.returncode == 0, r.stderr[-3000:]
    out = root / "out"
    for name in ("report.md", "report.csv", "report.json", "loss.png", "bars.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert len((out / "data" / "test.jsonl").read_text().splitlines()) == 3  # the last 25% held out
    assert len((out / "data" / "train.jsonl").read_text().splitlines()) == 9
    report = json.loads((out / "report.json").read_text())
    rows = report["rows"]
    assert [row["variant"] for row in rows] == ["lora", "freeze"] and [row["method"] for row in rows] == ["lora", "freeze"]
    for row in rows:
        assert row["trainable_params"] > 0 and 0 < row["trainable_percent"] <= 100
        assert row["peak_train_memory_mb"] > 0 and row["peak_inference_memory_mb"] > 0
        assert row["train_seconds"] > 0 and row["test_seconds"] > 0 and row["tokens_per_s"] > 0
        assert {"triple_p", "triple_r", "triple_f1", "exact"} <= set(row)
    assert json.loads((out / "lora" / "adapter_config.json").read_text())["r"] == 4  # the CLI override applied
    with open(out / "report.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert "| lora | lora |" in (out / "report.md").read_text()
    mtime = (out / "lora" / "run.json").stat().st_mtime
    again = chattune("compare", str(cfg), "lora.r=4")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("already trained with this configuration, not training again") == 2
    assert again.stderr.count("already evaluated with these settings") == 2
    assert (out / "lora" / "run.json").stat().st_mtime == mtime
    assert [row["status"] for row in json.loads((out / "report.json").read_text())["rows"]] == ["kept", "kept"]


def test_compare_config_errors_name_the_key(setup, tmp_path):
    root, cfg = setup
    bad = tmp_path / "bad.yaml"
    spec = yaml.safe_load(cfg.read_text())
    spec["variants"][0]["overrides"] = {"lora": {"rank": 4}}
    bad.write_text(yaml.safe_dump(spec))
    r = chattune("compare", str(bad))
    assert r.returncode == 2 and "unknown config key `lora.rank`" in r.stderr and "Traceback" not in r.stderr
    spec["variants"] = []
    bad.write_text(yaml.safe_dump(spec))
    r = chattune("compare", str(bad))
    assert r.returncode == 2 and "config key `variants`" in r.stderr


def test_max_tokens_keeps_only_short_records_before_the_split(setup, tmp_path):
    """`max_tokens` filters the records (rendered whole with the run's tokenizer and template) before `records`
    and the split; a value that keeps fewer than two records is a clear error."""
    from chattune.compare import load_spec, split_data
    from chattune.errors import ConfigError

    root, cfg = setup
    rows = [{"instruction": f"extract {w}" + (" very long" * 300 if i % 3 == 0 else ""), "output": f"{w}_is_{w}"}
            for i, w in enumerate(WORDS)]  # records 0, 3, 6, 9 are several hundred tokens long
    spec_dict = yaml.safe_load(cfg.read_text())
    spec_dict.update(train_data=str(write_jsonl(tmp_path / "mixed.jsonl", rows)), output_dir=str(tmp_path / "out"),
                     max_tokens=200, records=7, test_split=0.3)
    spec_file = tmp_path / "c.yaml"
    spec_file.write_text(yaml.safe_dump(spec_dict))
    logged = []
    train_file, test_file = split_data(load_spec(str(spec_file), [])[0], tmp_path / "out", logged.append)
    kept = [WORDS[i] for i in range(len(WORDS)) if i % 3][:7]
    read = lambda f: [json.loads(line)["output"].split("_")[0] for line in f.read_text().splitlines()]
    assert read(train_file) == kept[:5] and read(test_file) == kept[5:]
    assert "max_tokens=200: 8 of 12 records are that short" in logged[0]
    spec_dict["max_tokens"] = 8
    spec_file.write_text(yaml.safe_dump(spec_dict))
    with pytest.raises(ConfigError, match="max_tokens=8 keeps 0 of 12 records"):
        split_data(load_spec(str(spec_file), [])[0], tmp_path / "out2", logged.append)


def test_command_line_sets_compare_keys_and_refuses_keys_compare_decides(setup, tmp_path):
    """`output_dir=X` and `train_data=F` set the compare's own keys (they used to be overridden by the compare file
    without a word); run-config keys that compare decides per variant are refused with what does the job."""
    from chattune.compare import load_spec
    from chattune.errors import ConfigError

    root, cfg = setup
    other = write_jsonl(tmp_path / "other.jsonl", [{"instruction": w, "output": w} for w in WORDS])
    spec, run_keys = load_spec(str(cfg), [f"output_dir={tmp_path / 'X'}", f"train_data={other}", "eval.batch_size=3",
                                          "shared.train.lr=0.5", "lora.r=4", "test_split=0.25"])
    assert spec.output_dir == str(tmp_path / "X") and spec.train_data == str(other)
    assert spec.eval.batch_size == 3 and spec.test_split == 0.25 and spec.shared["train"]["lr"] == 0.5
    assert run_keys == ["lora.r=4"]
    for key, fix in (("data.train=y.jsonl", "give train_data=FILE"), ("resume=auto", "resumes an unfinished"),
                     ("overwrite=true", "give a new output_dir=DIR"), ("variants=[]", "set in the compare file")):
        with pytest.raises(ConfigError, match=fix):
            load_spec(str(cfg), [key])
    with pytest.raises(ConfigError, match=r"unknown config key `eval.batchsize`.*did you mean `eval.batch_size`"):
        load_spec(str(cfg), ["eval.batchsize=3"])
    with pytest.raises(ConfigError, match=r"unknown config key `trian.lr`.*the compare's own keys: train_data"):
        load_spec(str(cfg), ["trian.lr=3"])


def test_a_method_section_key_reaches_only_the_variants_that_read_it(setup):
    """`lora.r=4` on the command line goes to the LoRA variant, not the Freeze one; a section no variant reads is
    refused."""
    from chattune.compare import load_spec, variant_overrides
    from chattune.errors import ConfigError

    root, cfg = setup
    spec, cli = load_spec(str(cfg), ["lora.r=4", "train.seed=3"])
    lora, freeze = (variant_overrides(spec, v, cli, root / "t.jsonl", root / v.name) for v in spec.variants)
    assert "lora.r=4" in lora and "lora.r=4" not in freeze and "train.seed=3" in lora and "train.seed=3" in freeze
    with pytest.raises(ConfigError, match=r"^compare: `prefix.num_virtual_tokens` has no effect: no variant's method "
                                          r"reads prefix\.\* \(the variants' methods: lora, freeze\)"):
        load_spec(str(cfg), ["prefix.num_virtual_tokens=4"])


def test_shared_method_keys_reach_only_their_variants_and_a_variants_own_unread_key_is_refused(setup, tmp_path):
    """Every variant trains through `chattune train`, which refuses a method section's key its method does not read:
    shared's `lora.*` keys go to the LoRA variant only (as the command line's do), and a variant's own key of a
    section its method does not read is refused before anything trains, naming the variant."""
    from chattune.compare import load_spec, variant_overrides
    from chattune.errors import ConfigError

    root, cfg = setup
    spec_dict = yaml.safe_load(cfg.read_text())
    spec_dict["shared"]["lora"] = {"dropout": 0.0}
    spec_file = tmp_path / "shared.yaml"
    spec_file.write_text(yaml.safe_dump(spec_dict))
    spec, cli = load_spec(str(spec_file), [])
    lora, freeze = (variant_overrides(spec, v, cli, root / "t.jsonl", root / v.name) for v in spec.variants)
    assert "lora.dropout=0.0" in lora and not any(k.startswith("lora.") for k in freeze)
    spec_dict["variants"][1]["overrides"].append("lora.r=4")  # the freeze variant
    spec_file.write_text(yaml.safe_dump(spec_dict))
    with pytest.raises(ConfigError) as e:
        load_spec(str(spec_file), [])
    assert str(e.value) == ("compare: variant freeze: `lora.r` has no effect: this run's method is freeze, which "
                            "reads no lora.* key (lora.* is read by lora, qlora)")
