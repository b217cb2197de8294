"""What a GPU run chooses (train/gpu_options.py) and the refusals where a piece is missing, decided on the CPU with
CUDA, bitsandbytes, liger-kernel and flash-attn faked present or absent."""

from __future__ import annotations

import json

import pytest
import transformers.utils

from chattune.config import load_config
from chattune.errors import ConfigError
from chattune.train import gpu_options
from chattune.train.gpu_options import check_liger, choose_optimizer, training_attention
from tiny import make_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_llama(tmp_path_factory.mktemp("gpu_options") / "model"))


def test_the_optimizer_auto_is_torchs_fused_adamw():
    assert choose_optimizer("auto", "cuda") == ("adamw_torch_fused", "torch's fused AdamW")
    assert choose_optimizer("auto", "cuda:1") == ("adamw_torch_fused", "torch's fused AdamW")
    assert choose_optimizer("auto", "cpu") == ("adamw_torch_fused", "torch's fused AdamW")
    assert choose_optimizer("auto", "cuda", deepspeed_has_optimizer=True) == \
        ("adamw_torch", "the DeepSpeed config's own optimizer is used")
    assert choose_optimizer("adafactor", "cpu") == ("adafactor", "as set by train.optim")
    assert choose_optimizer("sgd", "cuda") == ("sgd", "as set by train.optim")


def test_bitsandbytes_optimizers_need_a_gpu_and_the_package(monkeypatch):
    with pytest.raises(ConfigError, match=r"^train.optim=paged_adamw_8bit is one of bitsandbytes' optimizers, which "
                                          r"need a CUDA GPU, and this run is on the CPU; use train.optim=auto"):
        choose_optimizer("paged_adamw_8bit", "cpu")
    monkeypatch.setattr(transformers.utils, "is_bitsandbytes_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^train.optim=adamw_8bit needs bitsandbytes, which is not installed: pip "
                                          r"install 'chattune\[qlora\]'"):
        choose_optimizer("adamw_8bit", "cuda")
    monkeypatch.setattr(transformers.utils, "is_bitsandbytes_available", lambda: True)
    assert choose_optimizer("adamw_8bit", "cuda") == ("adamw_8bit", "as set by train.optim")
    assert gpu_options.needs_bitsandbytes("paged_lion_32bit") and not gpu_options.needs_bitsandbytes("adamw_torch")


def test_unknown_and_conflicting_optimizers_are_refused():
    with pytest.raises(ConfigError, match=r"^train.optim=adam: not an optimizer transformers knows; e.g. auto, "
                                          r"adamw_torch, adamw_torch_fused, .*\(all: adamw_torch, "):
        choose_optimizer("adam", "cuda")
    with pytest.raises(ConfigError, match=r"^train.optim=sgd and the DeepSpeed config's own `optimizer` both choose"):
        choose_optimizer("sgd", "cuda", deepspeed_has_optimizer=True)


def test_liger_needs_a_gpu_and_the_package(monkeypatch):
    check_liger(False, "cpu")
    with pytest.raises(ConfigError, match=r"^train.liger=true: liger-kernel's fused layers are Triton kernels and "
                                          r"need a CUDA GPU; this run is on the CPU"):
        check_liger(True, "cpu")
    monkeypatch.setattr(transformers.utils, "is_liger_kernel_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^train.liger=true needs the liger-kernel package, which is not "
                                          r"installed: pip install liger-kernel"):
        check_liger(True, "cuda")
    monkeypatch.setattr(transformers.utils, "is_liger_kernel_available", lambda: True)
    check_liger(True, "cuda")


@pytest.mark.parametrize("flash", [False, True])
def test_packed_rows_get_flash_attention_on_a_gpu_where_it_is_installed(monkeypatch, tiny, flash):
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: flash)
    sdpa = "SDPA, one call per packed sample (chattune's packed attention)"
    assert training_attention(None, "cpu", "bf16", True, tiny) == (None, sdpa)
    assert training_attention(None, "cuda", "bf16", False, tiny) == (None, "transformers' default")
    assert training_attention(None, "cuda", "fp32", True, tiny) == \
        (None, "SDPA per packed sample: flash-attention 2 runs in bf16/fp16 only")
    assert training_attention("eager", "cuda", "bf16", True, tiny) == ("eager", "as set by model.attn_implementation")
    if flash:
        assert training_attention(None, "cuda", "bf16", True, tiny) == \
            ("flash_attention_2", "flash-attention 2's variable-length kernels for packed rows (position_ids)")
        assert training_attention(None, "cuda", "fp16", True, tiny, trust_remote_code=True) == \
            (None, "SDPA per packed sample: this model's class does not declare flash-attention support")
    else:
        assert training_attention(None, "cuda", "bf16", True, tiny) == \
            (None, "SDPA per packed sample: flash-attn is not installed (pip install flash-attn for its varlen "
                   "kernels)")
        with pytest.raises(ConfigError, match=r"^model.attn_implementation=flash_attention_2 needs the flash-attn "
                                              r"package on a CUDA GPU"):
            training_attention("flash_attention_2", "cuda", "bf16", True, tiny)


def test_a_cpu_run_refuses_gpu_only_keys_before_any_work(tiny, tmp_path):
    """`chattune train` with train.liger or a bitsandbytes optimizer on the CPU stops before the output folder is
    touched; train.optim=adafactor is what the Trainer gets."""
    from chattune.train.trainer import prepare, training_arguments

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"say {w}", "output": w}) + "\n" for w in "abcd"))
    base = [f"model={tiny}", f"data.train={data}", "train.max_steps=2", "train.batch_size=2", "train.precision=fp32"]
    for key, match in (("train.liger=true", "need a CUDA GPU"), ("train.optim=paged_adamw_8bit", "need a CUDA GPU"),
                       ("train.optim=adam", "not an optimizer transformers knows")):
        with pytest.raises(ConfigError, match=match):
            prepare(load_config("lora", [*base, key, f"output_dir={tmp_path / 'x'}"]), log=lambda m: None)
        assert not (tmp_path / "x").exists()
    logged = []
    run = prepare(load_config("lora", [*base, "train.optim=adafactor", f"output_dir={tmp_path / 'y'}"]),
                  log=logged.append)
    assert any("optimizer: adafactor; as set by train.optim" in line for line in logged)
    args = training_arguments(run)
    assert args.optim == "adafactor" and args.use_liger_kernel is False
