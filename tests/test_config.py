import pytest

from chattune.config import load_config, valid_keys
from chattune.shipped import SHIPPED_CONFIGS
from chattune.errors import ConfigError

REQUIRED_KEYS = ["model", "template", "data.train", "data.eval", "data.max_length", "method", "lora.r", "lora.alpha",
                 "lora.dropout", "lora.target", "train.max_steps", "train.epochs", "train.batch_size",
                 "train.grad_accum", "train.lr", "train.save_steps", "train.logging_steps", "train.seed",
                 "train.gradient_checkpointing", "output_dir", "resume"]


def test_required_keys_exist():
    assert set(REQUIRED_KEYS) <= set(valid_keys())


def test_yaml_plus_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: some/model\nlora:\n  r: 4\ntrain:\n  lr: 1.0e-3\n")
    cfg = load_config(path, ["lora.r=16", "model.trust_remote_code=true", "lora.target=[q_proj, v_proj]",
                             "train.gradient_checkpointing=true", "resume=auto", "data.train=x.json"])
    assert cfg.model.path == "some/model" and cfg.model.trust_remote_code is True
    assert cfg.lora.r == 16 and cfg.train.lr == 1e-3 and cfg.lora.target == ["q_proj", "v_proj"]
    assert cfg.train.gradient_checkpointing is True and cfg.resume == "auto" and cfg.data.train == "x.json"


def test_model_override_keeps_other_model_keys():
    cfg = load_config(None, ["model.trust_remote_code=true", "model=/m"])
    assert (cfg.model.path, cfg.model.trust_remote_code) == ("/m", True)


def test_shipped_config_by_name():
    cfg = load_config("lora", ["data.train=x.jsonl"])
    assert cfg.method == "lora" and cfg.lora.target == "all"
    assert (SHIPPED_CONFIGS / "lora.yaml").exists()


@pytest.mark.parametrize("override,message", [
    ("lora.rank=4", "unknown config key `lora.rank`; did you mean `lora.r`?"),
    ("train.batchsize=2", "unknown config key `train.batchsize`; did you mean `train.batch_size`?"),
    ("trian.lr=1", "unknown config key `trian.lr`; did you mean `train.lr`?"),
    ("lora.r=abc", "config key `lora.r`: Input should be a valid integer"),
    ("train.batch_size=0", "config key `train.batch_size`: Input should be greater than or equal to 1"),
    ("method=magic", "config key `method`: Input should be 'lora', 'qlora', 'prefix', 'freeze' or 'full'"),
    ("resume=nowhere", "resume='nowhere': not `auto`, a step number, or an existing checkpoint path"),
    ("oops", "override `oops` is not of the form key=value"),
])
def test_config_errors(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 1\n")
    with pytest.raises(ConfigError, match="unknown config key `train.learning_rate`"):
        load_config(path)


def test_missing_config_file_lists_shipped():
    with pytest.raises(ConfigError, match="not found; shipped configs: .*lora, ptuning_v2"):
        load_config("no-such-config.yaml")


def test_shipped_config_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here: the name resolves to the package's own file
    assert load_config("ptuning_v2").method == "prefix"
    assert load_config("freeze.yaml").method == "freeze"



# ---------------------------------------------------------------- a method section the run's method does not read


@pytest.mark.parametrize("args, message", [
    (["lora", "method=freeze", "lora.r=8"], "`lora.r` has no effect: this run's method is freeze, which reads no "
                                            "lora.* key (lora.* is read by lora, qlora)"),
    (["freeze.yaml", "lora.r=8"], "`lora.r` has no effect: this run's method is freeze, which reads no lora.* key "
                                  "(lora.* is read by lora, qlora)"),
    (["ptuning_v2.yaml", "lora.r=8"], "`lora.r` has no effect: this run's method is prefix, which reads no lora.* "
                                      "key (lora.* is read by lora, qlora)"),
    (["method=lora", "qlora.bits=8"], "`qlora.bits` has no effect: this run's method is lora, which reads no "
                                      "qlora.* key (qlora.* is read by qlora)"),
    (["method=full", "prefix.num_virtual_tokens=4"], "`prefix.num_virtual_tokens` has no effect: this run's method "
                                                     "is full, which reads no prefix.* key (prefix.* is read by "
                                                     "prefix)"),
])
def test_a_command_line_key_of_a_section_the_method_does_not_read_is_refused(args, message):
    from chattune.config import config_from_args

    with pytest.raises(ConfigError) as e:
        config_from_args(args)
    assert str(e.value) == message


def test_train_refuses_it_before_anything_runs(capsys):
    from chattune.cli import main

    assert main(["train", "lora", "method=freeze", "lora.r=8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: `lora.r` has no effect: this run's method is freeze, which reads no lora.* key "
                          "(lora.* is read by lora, qlora)") and "Traceback" not in err


def test_a_method_reads_its_own_section_and_those_it_also_reads():
    from chattune.config import config_from_args

    assert config_from_args(["qlora", "lora.r=8"]).lora.r == 8  # qlora's adapters are LoRA's
    assert config_from_args(["method=qlora", "lora.r=8", "qlora.bits=8"]).qlora.bits == 8
    assert config_from_args(["lora", "lora.r=8"]).lora.r == 8
    assert config_from_args(["method=lora", "lora.r=8"]).lora.r == 8
    assert config_from_args(["freeze", "freeze.trainable_layers=3", "train.lr=1e-4"]).freeze.trainable_layers == 3
    # the run's final method counts: freeze.yaml with method=lora on the command line reads lora.*
    assert config_from_args(["freeze", "method=lora", "lora.r=8"]).lora.r == 8


def test_a_config_files_other_sections_are_accepted(tmp_path):
    """A recorded config.yaml dumps every section with its defaults: a file's lora: section with method: freeze is
    not refused, only command-line keys are checked."""
    from chattune.config import config_from_args

    path = tmp_path / "c.yaml"
    path.write_text("method: freeze\nlora:\n  r: 4\nprefix:\n  num_virtual_tokens: 8\nfreeze:\n  trainable_layers: 1\n")
    cfg = config_from_args([str(path), "freeze.trainable_layers=2"])
    assert cfg.method == "freeze" and cfg.freeze.trainable_layers == 2 and cfg.lora.r == 4
