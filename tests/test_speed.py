"""The fast path is exact: packing, label-only logits, precision choice, length grouping, and `chattune bench`.

Speed itself is never asserted here (timings are noisy on shared machines); the benchmark measures it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import DataCollatorWithFlattening, LlamaConfig, LlamaForCausalLM, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler

import tiny
from chattune import hardware
from chattune.config import load_config
from chattune.errors import ConfigError
from chattune.data.collate import PaddingCollator, make_collator
from chattune.data.encode import IGNORE
from chattune.methods import lora
from chattune.train import chunked_loss, fast_dropout, packed_attention
from chattune.train.hf_trainer import ChattuneTrainer
from chattune.train.options import TrainOptions
from chattune.train.packing import packing_is_exact
from chattune.train.samplers import FixedOrderSampler

# Runs once more per CPU kind (tests/test_cpu_kinds.py): its outcome depends on the precision chattune picks or
# on the CPU's kernels.
pytestmark = pytest.mark.cpu_kind

# Samples of different lengths, prompt tokens masked with -100, one with a masked middle turn.
LENGTHS = [(11, 4), (23, 9), (7, 2), (17, 6)]  # (length, prompt tokens)


def _samples(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, (n, prompt) in enumerate(LENGTHS):
        ids = torch.randint(0, 256, (n,), generator=g).tolist()
        labels = [IGNORE] * prompt + ids[prompt:]
        if i == 1:
            labels[12:15] = [IGNORE] * 3  # a second, untrained turn inside the sample
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _tiny_model(seed: int = 0, attention: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=tiny.VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=None, eos_token_id=1)
    model = LlamaForCausalLM(cfg).float()
    if attention == "packed":
        assert packed_attention.enable(model)
    return model


def _lora_model(seed: int = 0, attention: str = "sdpa"):
    cfg = load_config(None, ["lora.r=4", "lora.dropout=0"])
    model = lora.METHOD.apply(_tiny_model(seed, attention), cfg)
    with torch.no_grad():  # LoRA B starts at zero, which would make every A gradient zero: randomise it
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _trainer(model, tmp_path, label_only: bool = True) -> ChattuneTrainer:
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none",
                             per_device_train_batch_size=4, remove_unused_columns=False)
    return ChattuneTrainer(model=model, args=args, label_only_logits=label_only)


def _loss_and_grads(trainer, model, batch: dict):
    model.train()
    model.zero_grad(set_to_none=True)
    loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, outputs.logits


def _assert_same(a: tuple, b: tuple):
    loss_a, grads_a, _ = a
    loss_b, grads_b, _ = b
    assert abs(loss_a.item() - loss_b.item()) < 1e-5, (loss_a.item(), loss_b.item())
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert grads_a[name].abs().max() > 0, f"{name}: zero gradient, the comparison would prove nothing"
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)


PACKED = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE)
PADDED = PaddingCollator(pad_id=0)


# ---------------------------------------------------------------- (1) packing parity


@pytest.mark.parametrize("attention", ["sdpa", "packed"])
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_packed_and_padded_batches_give_the_same_loss_and_gradients(kind, attention, tmp_path):
    # sdpa: transformers' block-diagonal mask; packed: chattune's one causal SDPA call per packed sample.
    model = _lora_model(attention=attention) if kind == "lora" else _tiny_model(attention=attention)
    trainer = _trainer(model, tmp_path)
    samples = _samples()
    packed_batch = PACKED(samples)
    assert packed_batch["input_ids"].shape == (1, sum(n for n, _ in LENGTHS))  # one row, not one pad token
    assert "attention_mask" not in packed_batch
    padded = _loss_and_grads(trainer, model, PADDED(samples))
    packed = _loss_and_grads(trainer, model, packed_batch)
    _assert_same(padded, packed)
    if kind == "lora":
        assert all("lora_" in n for n in packed[1])  # only adapter weights train, and all of them got compared


def test_packed_loss_matches_per_sample_losses(tmp_path):
    """The packed loss is the trained-token-weighted mean of the samples' own losses (no leak across samples)."""
    model = _tiny_model()
    trainer = _trainer(model, tmp_path)
    samples = _samples(seed=3)
    total, count = 0.0, 0
    for s in samples:
        n = sum(1 for x in s["labels"][1:] if x != IGNORE)
        total += trainer.compute_loss(model, PADDED([s])).item() * n
        count += n
    packed = trainer.compute_loss(model, PACKED(samples)).item()
    assert abs(packed - total / count) < 1e-5


def test_default_collator_packs():
    packer = make_collator(True, 0)
    assert isinstance(packer.inner, DataCollatorWithFlattening)
    padder = make_collator(False, 0, pad_to=32)
    assert isinstance(padder.inner, PaddingCollator)
    batch = padder([{**s, "source": f"d.jsonl:{i}"} for i, s in enumerate(_samples(), 1)])
    assert batch["input_ids"].shape == (4, 32)
    assert batch["sources"] == ["d.jsonl:1", "d.jsonl:2", "d.jsonl:3", "d.jsonl:4"]  # records named per batch
    assert int(batch["attention_mask"].sum()) == sum(n for n, _ in LENGTHS)
    assert load_config().data.packing and load_config().train.label_only_logits  # the fast path is the default


def test_packed_attention_runs_one_causal_call_per_sample(monkeypatch):
    import torch.nn.functional as F
    from transformers.integrations import sdpa_attention

    model = _tiny_model(attention="packed")
    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((args[0].shape[2], kwargs.get("is_causal"), kwargs.get("attn_mask")))
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(sdpa_attention.torch.nn.functional, "scaled_dot_product_attention", spy)
    batch = PACKED(_samples())
    model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    lengths = [n for n, _ in LENGTHS]
    assert calls == [(n, True, None) for _layer in range(2) for n in lengths]
    assert packing_is_exact(model)


@pytest.mark.parametrize("positions, expected", [
    ([[0, 1, 2, 0, 1]], [3, 2]),
    ([[0, 1, 2, 3, 4]], None),        # one sample: plain causal attention is already exact
    ([[1, 1, 1, 0, 1]], None),        # left padding in generation: not a packed row
    ([[0, 1, 3, 0, 1]], None),        # a gap: not what the packing collator produces
    ([[0, 1, 0, 1], [0, 1, 0, 1]], None),  # several rows: left to transformers' mask
])
def test_packed_attention_recognises_only_clean_packed_rows(positions, expected):
    assert packed_attention.sample_lengths(torch.tensor(positions)) == expected


def test_packed_attention_falls_back_for_padded_batches_and_generation(monkeypatch):
    model = _tiny_model(attention="packed")
    reference = _tiny_model()
    batch = PADDED(_samples())
    batch.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits)
        prompt = torch.tensor([[5, 6, 7, 8]])
        assert model.generate(prompt, max_new_tokens=4, do_sample=False).tolist() == \
            reference.generate(prompt, max_new_tokens=4, do_sample=False).tolist()


def test_packing_is_exact_tolerates_bf16_rounding():
    # bf16 rounding between a 12- and a 7-token run reaches ~1e-2 of the logits' scale on the bundled model;
    # a leak across samples is ~0.6. The check must not switch packing off for bf16 weights.
    assert packing_is_exact(_tiny_model().to(torch.bfloat16)) is True
    from fixtures.make_remote_glm import _load_code

    config_cls, model_cls = _load_code()
    torch.manual_seed(0)
    assert packing_is_exact(model_cls(config_cls(vocab_size=300)).to(torch.bfloat16)) is False


# ---------------------------------------------------------------- chunked loss, fast dropout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_matches_cross_entropy(monkeypatch, dtype):
    monkeypatch.setattr(chunked_loss, "CHUNK_ELEMENTS", 7 * 300)  # 7 rows per chunk: several chunks, a ragged end
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(30, 300, generator=g) * 4).to(dtype).requires_grad_()
    targets = torch.randint(0, 300, (30,), generator=g)
    expected = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    (expected * 0.5).backward()
    expected_grad, logits.grad = logits.grad.clone(), None
    got = chunked_loss.cross_entropy_sum(logits, targets)
    (got * 0.5).backward()
    assert got.dtype == torch.float32
    assert abs(got.item() - expected.item()) <= 1e-5 * abs(expected.item())  # both upcast the same logits
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(logits.grad.float(), expected_grad.float(), **tol)


def test_trainer_loss_is_the_same_with_and_without_the_chunked_loss(tmp_path):
    model = _lora_model(seed=2)
    batch = PACKED(_samples(seed=2))
    chunked = _loss_and_grads(_trainer(model, tmp_path), model, batch)
    trainer = _trainer(model, tmp_path)
    trainer.chunked_loss = False
    plain = _loss_and_grads(trainer, model, batch)
    _assert_same(chunked, plain)


def test_fast_dropout_keeps_the_dropout_statistics():
    torch.manual_seed(0)
    drop = fast_dropout.FastDropout(0.1)
    x = torch.ones(1000, 1000, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.002
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.9))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # gradient: the same mask and scale
    assert not torch.equal(drop(x), y)  # a new mask every call
    drop.eval()
    assert drop(x) is x
    assert fast_dropout.FastDropout(0.0).train()(x) is x


def test_fast_dropout_replaces_peft_lora_dropout_only():
    cfg = load_config(None, ["lora.r=4", "lora.dropout=0.1"])
    model = lora.METHOD.apply(_tiny_model(), cfg)
    n_dropouts = sum(type(m) is torch.nn.Dropout for m in model.modules())
    assert n_dropouts > 0
    assert fast_dropout.apply(model) == n_dropouts
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    assert all(m.p == 0.1 for m in model.modules() if isinstance(m, fast_dropout.FastDropout))
    no_dropout = lora.METHOD.apply(_tiny_model(), load_config(None, ["lora.r=4", "lora.dropout=0"]))
    assert fast_dropout.apply(no_dropout) == 0  # peft uses nn.Identity then


_FREED_MEMORY_PROBE = """
import sys, torch
from chattune import hardware
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
applied = hardware.keep_freed_memory() if sys.argv[1] == "keep" else None
x = torch.ones(64 << 20 >> 2)  # 64 MB: above glibc's default mmap threshold
with_block = rss_mb()
del x
print(applied, round(with_block - rss_mb()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings are Linux-only")
@pytest.mark.parametrize("mode", ["keep", "default"])
def test_keep_freed_memory_keeps_a_freed_block_for_reuse(mode):
    # In a child process, so that the allocator setting does not leak into this test session. By default a freed
    # 64 MB block goes back to the kernel at once (RSS drops by ~64 MB); with keep_freed_memory() it stays in the
    # heap for the next step's tensors (RSS does not drop).
    r = subprocess.run([sys.executable, "-c", _FREED_MEMORY_PROBE, mode], capture_output=True, text=True, timeout=120)
    applied, released_mb = r.stdout.split()
    if mode == "keep":
        assert applied == "True" and int(released_mb) < 8
    else:
        assert int(released_mb) > 56


# ---------------------------------------------------------------- (2) label-only logits


@pytest.mark.parametrize("collator", [PADDED, PACKED], ids=["padded", "packed"])
def test_label_only_logits_give_the_full_loss_with_smaller_logits(collator, tmp_path):
    model = _lora_model(seed=1)
    batch = collator(_samples(seed=1))
    n_trained = int((batch["labels"][:, 1:] != IGNORE).sum())
    full = _loss_and_grads(_trainer(model, tmp_path, label_only=False), model, batch)
    only = _loss_and_grads(_trainer(model, tmp_path, label_only=True), model, batch)
    _assert_same(full, only)
    full_logits, only_logits = full[2], only[2]
    assert full_logits.shape == (*batch["input_ids"].shape, tiny.VOCAB_SIZE)
    assert only_logits.shape == (n_trained, tiny.VOCAB_SIZE)
    assert only_logits.numel() < full_logits.numel()


def test_label_only_logits_is_off_for_models_without_logits_to_keep(tmp_path):
    from fixtures.make_remote_glm import _load_code

    config_cls, model_cls = _load_code()
    torch.manual_seed(0)
    trainer = _trainer(model_cls(config_cls(vocab_size=300)), tmp_path, label_only=True)
    assert trainer.label_only_logits is False


# ---------------------------------------------------------------- (3) packing_is_exact


def test_packing_is_exact_for_llama():
    assert packing_is_exact(_tiny_model()) is True


def test_packing_is_not_exact_for_a_model_that_attends_across_packed_samples():
    # The remote-code GLM fixture uses position_ids for its rotary embedding but builds a plain causal mask over
    # the whole row, so packed samples would see each other: chattune must not pack it.
    from fixtures.make_remote_glm import _load_code

    config_cls, model_cls = _load_code()
    torch.manual_seed(0)
    assert packing_is_exact(model_cls(config_cls(vocab_size=300))) is False


def test_packing_is_not_exact_for_a_model_without_position_ids():
    class NoPositions(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _tiny_model()

        def get_input_embeddings(self):
            return self.inner.get_input_embeddings()

        def forward(self, input_ids, use_cache=False):
            return self.inner(input_ids=input_ids, use_cache=use_cache)

    assert packing_is_exact(NoPositions()) is False


# ---------------------------------------------------------------- (4) precision=auto


@pytest.mark.parametrize("kind, expected, why", [
    ("avx2", "fp32", "the CPU has no bf16 instructions (AVX2 only; CHATTUNE_CPU_KIND=avx2): bf16 would be ~100x "
                     "slower than fp32"),
    ("avx512_bf16", "bf16", "the CPU has AVX512-BF16 instructions (CHATTUNE_CPU_KIND=avx512_bf16)"),
    ("amx", "bf16", "the CPU has AMX-BF16 instructions (CHATTUNE_CPU_KIND=amx)"),
])
def test_auto_precision_on_each_cpu_kind_without_a_probe(monkeypatch, kind, expected, why):
    """The decision of each CPU kind this project meets, made on whatever machine runs the test: the kind is set
    through the override users have too (CHATTUNE_CPU_KIND); none of them times a probe."""
    monkeypatch.setenv("CHATTUNE_CPU_KIND", kind)
    monkeypatch.setattr(hardware, "cpu_bf16_speedup", lambda: pytest.fail("the CPU's kind decides: no probe"))
    assert hardware.choose_precision("auto", "cpu") == (expected, why)


@pytest.mark.parametrize("speedup, expected", [(5.0, "bf16"), (1.5, "bf16"), (1.49, "fp32"), (0.007, "fp32"),
                                               (0.0, "fp32")])
def test_auto_precision_on_another_cpu_follows_the_bf16_probe(monkeypatch, speedup, expected):
    """A CPU with no x86 bf16 flags (ARM, unknown: kind `other`) decides by the timed probe's ratio."""
    monkeypatch.setenv("CHATTUNE_CPU_KIND", "other")
    monkeypatch.setattr(hardware, "cpu_bf16_speedup", lambda: speedup)
    assert hardware.resolve_precision("auto", "cpu") == expected


def test_cpu_kind_is_detected_from_the_flags_unless_set(monkeypatch):
    monkeypatch.delenv("CHATTUNE_CPU_KIND", raising=False)
    for flags, kind in [({"avx2", "avx512_bf16", "amx_bf16"}, "amx"), ({"avx2", "avx512f", "avx512_bf16"},
                        "avx512_bf16"), ({"avx2", "avx512f"}, "avx2"), ({"asimd", "bf16"}, "other"), (set(), "other")]:
        monkeypatch.setattr(hardware, "_cpu_flags", lambda flags=flags: flags)
        assert hardware.cpu_kind() == (kind, "detected")
    monkeypatch.setenv("CHATTUNE_CPU_KIND", "AVX512-BF16")  # as a user may write it
    assert hardware.cpu_kind() == ("avx512_bf16", "CHATTUNE_CPU_KIND=avx512_bf16")
    monkeypatch.setenv("CHATTUNE_CPU_KIND", "auto")
    assert hardware.cpu_kind() == ("other", "detected")
    monkeypatch.setenv("CHATTUNE_CPU_KIND", "avx9")
    with pytest.raises(ConfigError, match="CHATTUNE_CPU_KIND='avx9' is not a CPU kind: use one of avx2, "
                                          "avx512_bf16, amx, other"):
        hardware.cpu_kind()


def test_a_wrong_cpu_kind_is_one_line_from_the_cli(tmp_path):
    r = subprocess.run([sys.executable, "-m", "chattune", "train", "lora", f"output_dir={tmp_path / 'run'}"],
                       capture_output=True, text=True, env={**os.environ, "CHATTUNE_CPU_KIND": "avx9"}, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "CHATTUNE_CPU_KIND='avx9' is not a CPU kind" in r.stderr + r.stdout


@pytest.mark.parametrize("bf16_ok, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_precision_on_gpu(monkeypatch, bf16_ok, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    assert hardware.resolve_precision("auto", "cuda") == expected


def test_cpu_threads_default_to_cores_per_process(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(hardware, "cpu_cores", lambda: 8)
    try:
        assert hardware.set_cpu_threads() == 8
        assert hardware.set_cpu_threads(processes=2) == 4
        assert hardware.set_cpu_threads(num_threads=3) == 3
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- (5) samplers inside train()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("speed")
    model = tiny.make_tiny_llama(root / "model")
    records = [{"instruction": "q" * (3 + 7 * i % 23), "output": "a" * (2 + 5 * i % 17)} for i in range(12)]
    data = tiny.write_jsonl(root / "data.jsonl", records)
    return root, model, data


def _samplers_used(monkeypatch, tiny_run, overrides: list[str], **train_kwargs) -> list:
    from chattune.train.trainer import train

    root, model, data = tiny_run
    seen = []
    original = ChattuneTrainer._get_train_sampler

    def spy(self, *a, **k):
        sampler = original(self, *a, **k)
        seen.append(sampler)
        return sampler

    monkeypatch.setattr(ChattuneTrainer, "_get_train_sampler", spy)
    cfg = load_config(None, [f"model={model}", f"data.train={data}", "train.max_steps=1", "train.batch_size=4",
                             "train.precision=fp32", f"output_dir={root / 'run'}", "overwrite=true", *overrides])
    train(cfg, log=lambda *a: None, options=TrainOptions(**train_kwargs))
    return seen


def test_length_grouped_sampling_when_not_packing(monkeypatch, tiny_run):
    seen = _samplers_used(monkeypatch, tiny_run, ["data.packing=false"])
    assert seen and isinstance(seen[0], LengthGroupedSampler)


def test_no_length_grouping_when_packing(monkeypatch, tiny_run):
    seen = _samplers_used(monkeypatch, tiny_run, [])
    assert seen and not isinstance(seen[0], LengthGroupedSampler)


def test_fixed_sample_order_seam(monkeypatch, tiny_run):
    order = [5, 1, 7, 3]
    seen = _samplers_used(monkeypatch, tiny_run, ["data.packing=false"], sample_order=order, pad_to=64)
    assert isinstance(seen[0], FixedOrderSampler) and list(seen[0]) == order


def _trained_model(tiny_run, overrides: list[str], **train_kwargs):
    from chattune.train.trainer import train

    root, model, data = tiny_run
    cfg = load_config(None, [f"model={model}", f"data.train={data}", "train.max_steps=1", "train.batch_size=4",
                             "lora.dropout=0.1", f"output_dir={root / 'run'}", "overwrite=true", *overrides])
    return train(cfg, log=lambda *a: None, options=TrainOptions(**train_kwargs)).run.model


def test_recipe_uses_the_fast_kernels_and_baseline_does_not(monkeypatch, tiny_run):
    monkeypatch.setenv("CHATTUNE_CPU_KIND", "avx512_bf16")  # as on a CPU with fast bf16
    fast = _trained_model(tiny_run, [])
    assert fast.get_base_model().config._attn_implementation == packed_attention.NAME
    assert any(isinstance(m, fast_dropout.FastDropout) for m in fast.modules())
    frozen = [p for p in fast.parameters() if not p.requires_grad]
    assert {p.dtype for p in frozen} == {torch.bfloat16}  # adapters need no fp32 copy of the frozen base
    assert {p.dtype for p in fast.parameters() if p.requires_grad} == {torch.float32}
    stock = _trained_model(tiny_run, ["train.precision=fp32"], baseline=True)
    assert stock.get_base_model().config._attn_implementation == "sdpa"
    assert not any(isinstance(m, fast_dropout.FastDropout) for m in stock.modules())
    assert {p.dtype for p in stock.parameters()} == {torch.float32}


# ---------------------------------------------------------------- (6) chattune bench smoke run


def test_bench_smoke(tiny_run, tmp_path, capsys):
    from chattune import bench

    root, model, data = tiny_run
    out = tmp_path / "bench.json"
    logs: list[str] = []
    rc = bench.main([f"model={model}", f"data={data}", "samples=8", "eval_samples=4", "steps=3", "max_length=128",
                     "recipes=tutorial,chattune", f"out={out}"], log=logs.append)
    assert rc == 0
    table = capsys.readouterr().out
    assert "real tok/s" in table and "speedup chattune vs tutorial" in table
    # the workers' per-step reports reach the log even though a progress bar shares their output
    assert any(m.strip().startswith("chattune: step 3/3") for m in logs), logs
    report = json.loads(out.read_text())
    assert set(report["recipes"]) == {"tutorial", "chattune"}
    for r in report["recipes"].values():
        assert r["steps"] == 3 and r["tokens_per_s"] > 0 and r["s_per_step"] > 0
        assert r["peak_memory_mb"] > 0 and r["final_loss"] is not None and r["mfu_percent"] is not None
        # launch -> first optimizer step, and launch -> trained and saved: the steps themselves are in between
        assert 0 < r["startup_seconds"] < r["process_seconds"]
        assert r["process_seconds"] - r["startup_seconds"] >= r["total_seconds"] - 0.05
    tut, ct = report["recipes"]["tutorial"], report["recipes"]["chattune"]
    assert tut["batching"] == "pad to 128" and tut["precision"] == "fp32" and tut["logits"] == "full"
    assert ct["batching"] == "packed" and ct["logits"] == "label-only"
    assert tut["real_tokens"] == ct["real_tokens"]  # same samples in the same steps
    assert tut["trained_tokens"] == ct["trained_tokens"]
    assert abs(tut["losses"][0] - ct["losses"][0]) < 0.05  # same first batch, same starting weights
    # held-out records 8..11, scored in fp32 the same way for both recipes
    assert tut["heldout_tokens"] == ct["heldout_tokens"] > 0
    assert abs(tut["heldout_loss"] - ct["heldout_loss"]) < 0.05
    assert report["ratios"]["chattune_vs_tutorial"]["heldout_loss_diff"] is not None
    assert report["ratios"]["chattune_vs_tutorial"]["tokens_per_s"] > 0
    assert report["ratios"]["chattune_vs_tutorial"]["process_seconds"] > 0 and "x whole process" in table
    assert report["machine"]["matmul_gflops"]["fp32"] > 0


def test_bench_top_half_recipe_trains_half_the_layers(tiny_run, tmp_path):
    """recipes=chattune,top_half: the same samples and steps, adapters only in the top half of the layers
    (lora.layers=1 of the tiny model's 2): half the trainable parameters, and its own held-out loss."""
    from chattune import bench

    root, model, data = tiny_run
    out = tmp_path / "bench.json"
    rc = bench.main([f"model={model}", f"data={data}", "samples=8", "eval_samples=4", "steps=2", "max_length=128",
                     "recipes=chattune,top_half", f"out={out}"], log=lambda m: None)
    assert rc == 0
    report = json.loads(out.read_text())
    full, half = report["recipes"]["chattune"], report["recipes"]["top_half"]
    assert half["trainable_params"] * 2 == full["trainable_params"]
    assert half["real_tokens"] == full["real_tokens"] and half["heldout_tokens"] == full["heldout_tokens"]
    assert half["heldout_loss"] is not None
    # layer 0 only runs forward in top_half: 2 FLOPs per token for its parameters instead of 4
    from transformers import AutoModelForCausalLM

    layer0 = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model).model.layers[0].parameters())
    assert (full["forward_only_params"], half["forward_only_params"]) == (0, layer0)
    for r, below in ((full, 0), (half, layer0)):
        frozen = r["total_params"] - r["trainable_params"]
        assert r["flops_per_token"] == 4 * frozen + 6 * r["trainable_params"] - 2 * below


def test_bench_rounds_alternate_the_order_and_report_the_means(tiny_run, tmp_path):
    """rounds=3 runs dynamic, chattune / chattune, dynamic / dynamic, chattune; each recipe's timed figures are
    the means of its rounds, its losses the same in every round."""
    from chattune import bench

    root, model, data = tiny_run
    out = tmp_path / "bench.json"
    logs: list[str] = []
    rc = bench.main([f"model={model}", f"data={data}", "samples=8", "eval_samples=4", "steps=2", "max_length=64",
                     "recipes=dynamic,chattune", "rounds=3", "isolate=false", f"out={out}"], log=logs.append)
    assert rc == 0
    started = [m.split("`")[1] for m in logs if m.startswith("bench: recipe `")]
    assert started == ["dynamic", "chattune", "chattune", "dynamic", "dynamic", "chattune"]
    report = json.loads(out.read_text())
    for name, first in (("dynamic", [1, 2, 1]), ("chattune", [2, 1, 2])):
        r = report["recipes"][name]
        assert [x["round"] for x in r["rounds"]] == [1, 2, 3] and [x["position"] for x in r["rounds"]] == first
        for key in ("tokens_per_s", "s_per_step", "peak_memory_mb"):
            assert r[key] == pytest.approx(sum(x[key] for x in r["rounds"]) / 3, abs=1e-3)
        assert len({x["final_loss"] for x in r["rounds"]}) == 1
        assert r["heldout_loss"] is not None  # scored once, in the first round


def test_bench_rejects_bad_arguments(tmp_path):
    from chattune import bench
    from chattune.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown recipe"):
        bench.parse_args(["recipes=tutorial,fastest"])
    with pytest.raises(ConfigError, match="unknown config key `stepz`; did you mean `steps`"):
        bench.parse_args(["stepz=3"])
    with pytest.raises(ConfigError, match="not found"):
        bench.parse_args([f"data={tmp_path / 'missing.json'}"])
    with pytest.raises(ConfigError, match="eval_samples"):
        bench.parse_args(["eval_samples=-1"])
    with pytest.raises(ConfigError, match="rounds"):
        bench.parse_args(["rounds=0"])
    spec = bench.parse_args([f"data={tiny.write_jsonl(tmp_path / 'd.jsonl', [{'instruction': 'a', 'output': 'b'}])}",
                             "steps=2", "lora.r=4", "recipes=dynamic,chattune", "eval_samples=0"])
    assert (spec.steps, spec.lora.r, spec.recipes, spec.eval_samples) == (2, 4, ["dynamic", "chattune"], 0)


def test_bench_sample_order_is_shared_and_covers_epochs():
    from chattune.bench import sample_order

    order = sample_order(10, steps=6, batch_size=4, seed=1)
    assert len(order) == 24 and sorted(order[:10]) == list(range(10)) and sorted(order[10:20]) == list(range(10))
    assert order == sample_order(10, steps=6, batch_size=4, seed=1)
