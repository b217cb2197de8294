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

