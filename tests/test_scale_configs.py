"""The shipped DeepSpeed and FSDP configs are accepted by the libraries that read them, and combinations that
cannot run here are refused before any work with the fix."""

from __future__ import annotations

import json

import pytest
import torch

from chattune.config import load_config
from chattune.errors import MethodError
from chattune.methods import get_method
from chattune.shipped import SHIPPED_CONFIGS


def test_fsdp_config_becomes_accelerates_fsdp2_plugin_settings():
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir="unused", fsdp=True, fsdp_config=str(SHIPPED_CONFIGS / "fsdp.json"),
                             use_cpu=True, report_to="none")
    plugin_args = args.fsdp_plugin_args
    assert plugin_args["fsdp_version"] == 2 and plugin_args["state_dict_type"] == "FULL_STATE_DICT"
    unknown = set(plugin_args) - set(FullyShardedDataParallelPlugin.__dataclass_fields__)
    assert unknown == set()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_fsdp_on_cpu_is_refused_with_the_alternative():
    cfg = load_config(None, ["train.fsdp=true"])
    with pytest.raises(MethodError, match="train.fsdp=true needs CUDA GPUs.*--nproc N"):
        get_method(cfg.method).preflight(cfg, "cpu")
    cfg = load_config(None, ["train.fsdp=true", "train.fsdp_config=nope.json"])
    with pytest.raises(MethodError, match="train.fsdp_config=nope.json: file not found"):
        get_method(cfg.method).preflight(cfg, "cpu")


@pytest.mark.parametrize("name", ["ds_zero2.json", "ds_zero3.json", "ds_zero3_offload.json"])
def test_deepspeed_configs_pass_deepspeeds_own_config_classes(name):
    deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra: pip install 'chattune[deepspeed]'")
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    ds = json.loads((SHIPPED_CONFIGS / name).read_text())
    zero = DeepSpeedZeroConfig(**ds["zero_optimization"])
    assert int(zero.stage) == ds["zero_optimization"]["stage"]
    if name == "ds_zero3_offload.json":
        assert zero.offload_optimizer is not None and zero.offload_param is not None
    assert deepspeed.__version__


RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_deepspeed_on_cpu_passes_preflight_with_a_one_process_rendezvous(monkeypatch):
    pytest.importorskip("deepspeed")
    from chattune.methods import common

    for key in RENDEZVOUS:  # absent during the test and after it (setenv first, so the removal is undone)
        monkeypatch.setenv(key, "unset")
        monkeypatch.delenv(key)
    monkeypatch.setattr(common, "missing_cpu_op_tools", lambda: [])
    cfg = load_config(None, ["method=full", "train.deepspeed=ds_zero3.json"])
    get_method(cfg.method).preflight(cfg, "cpu")
    import os

    assert [os.environ[k] for k in RENDEZVOUS[:4]] == ["0", "0", "1", "127.0.0.1"]
    assert int(os.environ["MASTER_PORT"]) > 0
    monkeypatch.setenv("MASTER_PORT", "29999")  # a launcher's variables are left alone
    get_method(cfg.method).preflight(cfg, "cpu")
    assert os.environ["MASTER_PORT"] == "29999"


def test_deepspeed_where_it_cannot_compile_its_cpu_ops_is_refused_with_the_reason(monkeypatch):
    pytest.importorskip("deepspeed")
    from chattune.methods import common

    monkeypatch.setattr(common, "missing_cpu_op_tools", lambda: ["ninja"])
    cfg = load_config(None, ["train.deepspeed=ds_zero3_offload.json"])
    with pytest.raises(MethodError, match="compiles its shared-memory allreduce op and the CPU Adam op .offload. "
                                          "on first use and needs ninja"):
        get_method(cfg.method).preflight(cfg, "cpu")
    with pytest.raises(MethodError, match="CUDA GPUs or on CPU, not on mps"):
        get_method(cfg.method).preflight(cfg, "mps")


def _autos(node, path=""):
    if isinstance(node, dict):
        return [a for k, v in node.items() for a in _autos(v, f"{path}.{k}".lstrip("."))]
    return [path] if node == "auto" else []


@pytest.mark.parametrize("name", ["ds_zero2.json", "ds_zero3.json", "ds_zero3_offload.json"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_deepspeed_configs_filled_by_the_trainer_pass_deepspeeds_full_config(name, precision):
    """What DeepSpeed gets: transformers' HfTrainerDeepSpeedConfig fills every `auto` from the TrainingArguments
    (batch, accumulation, clipping, precision) and the model (bucket sizes from hidden_size), as the Trainer does;
    the result must pass DeepSpeed's whole DeepSpeedConfig, not only its ZeRO section."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import LlamaConfig, TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    # chattune's own settings (train/trainer.py training_arguments); no `deepspeed=` so no process group starts
    args = TrainingArguments(output_dir="unused", per_device_train_batch_size=2, gradient_accumulation_steps=4,
                             max_grad_norm=1.0, learning_rate=2e-4, use_cpu=True, report_to="none",
                             bf16=precision == "bf16")
    model = type("Model", (), {"config": LlamaConfig(hidden_size=64)})()
    hf = HfTrainerDeepSpeedConfig(str(SHIPPED_CONFIGS / name))
    try:
        hf.trainer_config_process(args)
        hf.trainer_config_finalize(args, model, num_training_steps=10)
        assert _autos(hf.config) == []
        ds = DeepSpeedConfig(hf.config)
    finally:
        unset_hf_deepspeed_config()  # (it registers itself globally: later from_pretrained would use zero.Init)
    assert (ds.train_batch_size, ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps) == (8, 2, 4)
    assert ds.gradient_clipping == 1.0 and ds.bfloat16_config.enabled == (precision == "bf16")
    assert not ds.float16_config.enabled
    assert int(ds.zero_config.stage) == json.loads((SHIPPED_CONFIGS / name).read_text())["zero_optimization"]["stage"]
    assert ds.zero_config.reduce_bucket_size == 64 * 64
    if int(ds.zero_config.stage) == 3:
        assert ds.zero_config.gather_16bit_weights_on_model_save is True
