"""peft's LoRA variants (`lora.use_dora`, `lora.use_rslora`, `lora.init`, `lora.modules_to_save`) and NEFTune
(`train.neftune_noise_alpha`) through chattune, on the tiny Llama of test_methods.py: exact trainable-parameter
counts, the loss falls, save -> reload and export give the trained model's logits, and each of chattune's fast
paths (shared down-projections, the decode step, block weights, packing) either gives peft's / transformers' results
or is off with its reason in the log. Impossible combinations are refused before any work.

fp32 on one thread, as in test_methods.py, so that numbers compare exactly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_methods import EMBED, KV, LINEARS, STEPS, TOTAL, WORDS, L, base_overrides, logits, lora_params, losses, run
from tiny import make_tiny_llama, write_jsonl
from transformers import AutoModelForCausalLM, TrainerCallback

from chattune.config import load_config
from chattune.errors import ConfigError, MethodError, ModelError
from chattune.export import export
from chattune.inference import load_tuned
from chattune.train import shared_lora
from chattune.train.neftune import checked_alpha
from chattune.train.options import TrainOptions
from chattune.train.trainer import train

ADAPTERS = L * lora_params(8, LINEARS)  # lora.r=8 on every linear layer but the head
MAGNITUDES = L * sum(out for _, out in LINEARS)  # DoRA: one magnitude per output feature of each adapted layer
NVT = 4
# NEFTune's alpha: the paper uses 5 on real models; the tiny model's embeddings are ~N(0, 0.02), and alpha 5 would
# give them noise of ~0.16 (5 / sqrt(length 30 * hidden 32)), drowning the tokens. 0.5 gives ~0.016.

MATRIX = {
    # name: (overrides, trainable parameters by hand, learning rate, the base model's head tied to its embedding)
    "dora": (["lora.use_dora=true"], ADAPTERS + MAGNITUDES, 1e-2, False),
    "rslora": (["lora.use_rslora=true"], ADAPTERS, 1e-2, False),
    "gaussian": (["lora.init=gaussian"], ADAPTERS, 1e-2, False),
    "orthogonal": (["lora.init=orthogonal"], ADAPTERS, 1e-2, False),
    "pissa": (["lora.init=pissa"], ADAPTERS, 1e-2, False),
    "pissa_niter": (["lora.init=pissa_niter_2"], ADAPTERS, 1e-2, False),
    "olora": (["lora.init=olora"], ADAPTERS, 1e-2, False),
    "head_and_embedding": (["lora.modules_to_save=[lm_head, embed_tokens]"], ADAPTERS + 2 * EMBED, 1e-2, False),
    "pissa_dora_head": (["lora.init=pissa", "lora.use_dora=true", "lora.modules_to_save=[lm_head]"],
                        ADAPTERS + MAGNITUDES + EMBED, 1e-2, False),
    "tied_head": (["lora.modules_to_save=[lm_head]"], ADAPTERS + EMBED, 1e-2, True),  # one copy, shared
    "olora_tied_embedding": (["lora.init=olora", "lora.modules_to_save=[embed_tokens]"], ADAPTERS + EMBED, 1e-2,
                             True),
    "neftune": (["train.neftune_noise_alpha=0.5"], ADAPTERS, 1e-2, False),
    "neftune_prefix": (["method=prefix", f"prefix.num_virtual_tokens={NVT}", "train.neftune_noise_alpha=0.5"],
                       NVT * L * 2 * KV, 1e-1, False),
}
DORA = ("dora", "pissa_dora_head")
MUTATING = ("pissa", "pissa_niter", "olora", "pissa_dora_head", "olora_tied_embedding")  # their final adapter is converted
MERGEABLE = [n for n in MATRIX if n != "neftune_prefix"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    models = {False: make_tiny_llama(root / "model"), True: make_tiny_llama(root / "tied", tie_word_embeddings=True)}
    data = write_jsonl(root / "data.jsonl", [{"instruction": f"say {w}", "output": f"{w} {w} {w}"} for w in WORDS])
    return root, models, data


def overrides(tiny, name: str, out: Path) -> list[str]:
    _, models, data = tiny
    extra, _, lr, tied = MATRIX[name]
    return base_overrides(models[tied], data, out, lr) + extra


@pytest.fixture(scope="module")
def trained(tiny):
    """One uninterrupted 10-step run per variant, shared by the tests below."""
    root = tiny[0]
    runs = {}

    def get(name):
        if name not in runs:
            out = root / f"run-{name}"
            result, net, logs = run(overrides(tiny, name, out), capture=True)
            runs[name] = (out, result, net, logs)
        return runs[name]

    return get


# ---------------------------------------------------------------- per variant


@pytest.mark.parametrize("name", MATRIX)
def test_trainable_parameters_are_exact(trained, name):
    out, result, net, _ = trained(name)
    expected, tied = MATRIX[name][1], MATRIX[name][3]
    base = TOTAL - EMBED if tied else TOTAL  # a tied head shares the embedding's weight
    assert (result.trainable_params, result.total_params) == (expected, base + expected)
    assert sum(p.numel() for p in {id(p): p for p in net.parameters() if p.requires_grad}.values()) == expected
    assert json.loads((out / "run.json").read_text())["trainable_params"] == expected


@pytest.mark.parametrize("name", MATRIX)
def test_ten_steps_lower_the_loss(trained, name):
    out, *_ = trained(name)
    loss = losses(out)
    assert sorted(loss) == list(range(1, STEPS + 1))
    assert loss[9] < loss[1] and loss[10] < loss[2], loss  # two batches alternate: the same batch early and late


@pytest.mark.parametrize("name", MATRIX)
def test_save_then_reload_gives_the_trained_logits(trained, name):
    out, _, net, _ = trained(name)
    reloaded = load_tuned(adapter=str(out), log=lambda m: None)
    torch.testing.assert_close(logits(reloaded.model), logits(net), atol=1e-5, rtol=0)
    base = load_tuned(model=str(reloaded.info["base_model"]), log=lambda m: None).model
    assert not torch.allclose(logits(base), logits(net), atol=1e-4)  # the adapter is really loaded


@pytest.mark.parametrize("name", MUTATING)
def test_pissa_and_olora_are_saved_as_a_plain_adapter_on_the_unchanged_base(trained, name):
    """The residual base PiSSA/OLoRA train on exists only in the training process: the saved adapter is peft's
    conversion (rank 2r, peft's default init), which plain peft loads on the unchanged base."""
    from peft import PeftModel

    out, _, net, _ = trained(name)
    saved = json.loads((out / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["init_lora_weights"]) == (16, 32, True)
    base = AutoModelForCausalLM.from_pretrained(load_tuned(adapter=str(out), log=lambda m: None).info["base_model"])
    plain = PeftModel.from_pretrained(base, str(out))
    torch.testing.assert_close(logits(plain), logits(net), atol=1e-5, rtol=0)


def test_rslora_scales_by_the_square_root_of_the_rank(trained):
    out, _, net, _ = trained("rslora")
    scalings = {m.scaling["default"] for m in net.modules() if isinstance(getattr(m, "scaling", None), dict)}
    assert scalings == {16 / math.sqrt(8)}  # not alpha / r = 2
    assert json.loads((out / "adapter_config.json").read_text())["use_rslora"] is True


@pytest.mark.parametrize("name", MERGEABLE)
def test_export_merges_the_variant(tiny, trained, name):
    root = tiny[0]
    out, *_ = trained(name)
    dest = root / f"export-{name}"
    export(out, dest, log=lambda m: None)
    plain = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32)
    assert not any("lora" in n or "modules_to_save" in n for n, _ in plain.state_dict().items())
    torch.testing.assert_close(logits(plain), logits(load_tuned(adapter=str(out), log=lambda m: None).model),
                               atol=1e-4, rtol=0)
    tied = plain.lm_head.weight is plain.model.embed_tokens.weight
    assert tied is MATRIX[name][3]  # a tied model stays tied (its one trained copy); an untied one untied


@pytest.mark.parametrize("name", MERGEABLE)  # (P-tuning v2 has no LoRA layers and never packs)
def test_fast_paths_say_what_they_do(trained, name):
    *_, logs = trained(name)
    fuse = next(m for m in logs if m.startswith("lora.fuse:"))
    if name in DORA:
        assert fuse.startswith("lora.fuse: off (not with lora.use_dora")
    else:
        assert fuse.startswith("lora.fuse: 10 adapted layers share a down-projection")  # q/k/v, gate/up per layer
    packing = [m for m in logs if m.startswith("packing:")]
    if name == "neftune":
        assert packing[0].startswith("packing: off (train.neftune_noise_alpha: transformers scales NEFTune's noise")
        assert "packing: off, label-only logits: on" in packing
    else:
        assert "packing: on, label-only logits: on" in packing


# ---------------------------------------------------------------- fast paths, one by one


def _peft(path, seed: int = 0, **config):
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                            **config))
    for n, p in model.named_parameters():
        if "lora_B" in n and not p.abs().sum():  # a default-init B is zero: make every adapter count
            torch.nn.init.normal_(p, std=0.2)
    return model


def _loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("config", [dict(use_rslora=True), dict(init_lora_weights="gaussian"),
                                    dict(init_lora_weights="orthogonal"), dict(init_lora_weights="pissa"),
                                    dict(init_lora_weights="pissa_niter_2"), dict(init_lora_weights="olora"),
                                    dict(modules_to_save=["lm_head"])], ids=str)
def test_shared_down_projection_is_peft_s_maths_for_the_variant(tiny, config):
    path = tiny[1][False]
    plain, shared = _peft(path, **config), _peft(path, **config)
    assert shared_lora.install(shared) == 10
    ids = torch.randint(0, 200, (2, 11), generator=torch.Generator().manual_seed(1))
    want_loss, want = _loss_and_grads(plain, ids)
    got_loss, got = _loss_and_grads(shared, ids)
    assert got_loss == pytest.approx(want_loss, abs=1e-6)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5)


def test_dora_layers_are_never_shared(tiny):
    model = _peft(tiny[1][False], use_dora=True)
    assert shared_lora.install(model) == 0
    assert shared_lora.should_fuse(True, 0.0, False, False, use_dora=True)[0] is False


@pytest.mark.parametrize("name", ["dora", "rslora", "pissa", "head_and_embedding", "tied_head"])
def test_decode_step_gives_transformers_logits(trained, name):
    from chattune.models.decode_step import DecodeStep, why_not
    from chattune.serve.engine import step_matches_transformers

    out, *_ = trained(name)
    model = load_tuned(adapter=str(out), log=lambda m: None).model
    assert why_not(model) is None
    step = DecodeStep(model)
    assert step_matches_transformers(model, step, 0)  # serve's start-up check, which gates the step
    assert _decode(model, step) == pytest.approx(_decode(model, None), abs=1e-5)


def _decode(model, step) -> list[float]:
    from chattune.serve.engine import Batch, prefill

    with torch.inference_mode():
        _, cache, mask = prefill(model, [[5, 9, 13, 17, 21], [7, 11]], 0)
        batch = Batch.start(cache, mask)
        return torch.stack([batch.step(model, t, step) for t in ([3, 200], [17, 17], [250, 4])]).flatten().tolist()


@pytest.mark.skipif(__import__("chattune.models.blockweights", fromlist=["x"]).why_unavailable() is not None,
                    reason="block-weight kernel unavailable here (needs AVX2 and a C compiler)")
@pytest.mark.parametrize("config", [dict(use_dora=True), dict(use_rslora=True), dict(modules_to_save=["lm_head"])],
                         ids=str)
def test_block_weights_under_a_variant_give_the_fp32_logits(tmp_path, config):
    from tiny import exact_tiny

    from chattune.models.blockweights import enable
    from chattune.models.decode_step import DecodeStep

    base = exact_tiny(tmp_path)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                            init_lora_weights=False, **config)).eval()
    want = _decode(model, None)
    assert enable(model, lambda m: None)["q4"] > 0  # the base layers under the adapters now read their blocks
    scale = max(abs(v) for v in want)
    assert _decode(model, None) == pytest.approx(want, abs=1e-5 * scale)
    assert _decode(model, DecodeStep(model)) == pytest.approx(want, abs=1e-5 * scale)


# ---------------------------------------------------------------- checkpoints of PiSSA / OLoRA runs


@pytest.mark.parametrize("name", ["pissa", "pissa_niter"])
def test_pissa_checkpoints_resume_and_reload_where_peft_can_rebuild_them(tiny, trained, name):
    """A checkpoint keeps peft's training form (for resume=). Full-SVD PiSSA is rebuilt exactly by peft when it
    loads one; the randomized SVD of pissa_niter_N is not, so loading such a checkpoint is refused with the reason."""
    root = tiny[0]
    full_run, *_ = trained(name)
    out = root / f"resume-{name}"
    first, net, _ = run(overrides(tiny, name, out) + ["train.stop_after=3"], capture=True)
    checkpoint = out / "checkpoint-3"
    assert first.steps == 3 and checkpoint.is_dir()
    if name == "pissa":
        torch.testing.assert_close(logits(load_tuned(adapter=str(checkpoint), log=lambda m: None).model),
                                   logits(net), atol=1e-5, rtol=0)
    else:
        with pytest.raises(ModelError, match="randomized SVD left, which loading cannot rebuild"):
            load_tuned(adapter=str(checkpoint), log=lambda m: None)
    second, _, logs = run(overrides(tiny, name, out) + ["resume=auto"])
    assert second.steps == STEPS and any("resuming from" in m for m in logs)
    expected, got = losses(full_run), losses(out)
    assert [got[s] for s in range(1, STEPS + 1)] == pytest.approx([expected[s] for s in range(1, STEPS + 1)],
                                                                    rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------- NEFTune


class _SeesNoise(TrainerCallback):
    """Records, at each step, the NEFTune alpha transformers' hook has put on the input embedding (None: no hook)."""

    def __init__(self):
        self.alphas = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        embedding = model.get_base_model().get_input_embeddings()
        self.alphas.append(getattr(embedding, "neftune_noise_alpha", None))


def test_neftune_noise_is_there_in_training_only(tiny):
    root, models, data = tiny
    out = root / "neftune-hook"
    seen = _SeesNoise()
    cfg = load_config(None, overrides(tiny, "neftune", out) + ["train.max_steps=2"])
    result = train(cfg, log=lambda m: None, options=TrainOptions(callbacks=(seen,)))
    assert seen.alphas == [0.5, 0.5]
    embedding = result.run.model.get_base_model().get_input_embeddings()
    assert not hasattr(embedding, "neftune_noise_alpha") and not embedding._forward_hooks  # removed after train()
    # the noise changes the first step's loss (the adapter starts as a no-op: it is the base model's loss on the
    # same batch, padded in both runs)
    plain = root / "neftune-off"
    run(base_overrides(models[False], data, plain, 1e-2) + ["data.packing=false", "train.max_steps=1"])
    assert abs(losses(out)[1] - losses(plain)[1]) > 1e-4


def test_neftune_refuses_a_model_whose_embedding_it_cannot_use(tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny[1][False])

    class Hidden(torch.nn.Module):  # remote code that does not say which module embeds the tokens
        def get_input_embeddings(self):
            raise NotImplementedError("no input embeddings here")

    with pytest.raises(ConfigError, match="finds no input embedding on this model"):
        checked_alpha(Hidden(), 5.0)

    class Flat(torch.nn.Embedding):  # [batch * length, hidden]: no length to scale the noise by
        def forward(self, ids):
            return super().forward(ids).flatten(0, 1)

    model.model.embed_tokens = Flat(*model.model.embed_tokens.weight.shape)
    with pytest.raises(ConfigError, match=r"returns shape \(2, 32\)"):
        checked_alpha(model, 5.0)
    assert checked_alpha(model, None) is None


# ---------------------------------------------------------------- refused before any work


@pytest.mark.parametrize("extra,match", [
    (["lora.init=eva"], "EVA initialises from the layer inputs of a pass over the training data"),
    (["lora.init=loftq"], "LoftQ quantizes every weight with bitsandbytes on a CUDA GPU"),
    (["lora.init=corda"], "CorDA initialises from a calibration pass"),
    (["lora.init=svd"], "choose one of default, gaussian, orthogonal, pissa, pissa_niter_N, olora"),
    (["lora.init=orthogonal", "lora.r=5"], "needs an even lora.r"),
    (["train.neftune_noise_alpha=0"], "train.neftune_noise_alpha"),
])
def test_config_refuses_with_the_reason(extra, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, extra)


@pytest.mark.parametrize("extra,match", [
    (["method=qlora", "lora.init=pissa"], "lora.init=pissa with method=qlora .4-bit.: PiSSA/OLoRA decompose"),
    (["lora.init=olora", "model.load_in_8bit=true"], "lora.init=olora with model.load_in_8bit=true"),
    (["lora.init=pissa_niter_4", "train.deepspeed=ds_zero2.json"], "with train.deepspeed: the final adapter is"),
])
def test_impossible_combinations_fail_before_loading(tiny, extra, match):
    out = tiny[0] / "never"
    with pytest.raises(MethodError, match=match):
        train(load_config(None, overrides(tiny, "rslora", out) + extra), log=lambda m: None)
    assert not out.exists()


@pytest.mark.parametrize("names,match", [
    ("[lm_hed]", "no module named lm_hed in this model; its input embedding and output head are "
                 "model.embed_tokens, lm_head"),
    ("[q_proj]", "model.layers.0.self_attn.q_proj, model.layers.1.self_attn.q_proj also get LoRA adapters"),
])
def test_modules_to_save_must_name_modules_that_are_not_adapted(tiny, names, match):
    out = tiny[0] / f"bad-save-{names}"
    with pytest.raises(MethodError, match=match):
        train(load_config(None, overrides(tiny, "rslora", out) + [f"lora.modules_to_save={names}"]),
              log=lambda m: None)


@pytest.mark.parametrize("name", ["pissa_dora_head", "tied_head"])
def test_estimate_counts_what_training_trains(tiny, trained, name):
    from chattune.estimate import estimate

    _, result, _, _ = trained(name)
    got = estimate(load_config(None, overrides(tiny, name, tiny[0] / "estimate")), log=lambda m: None)
    assert (got.params["trainable"], got.params["total"]) == (result.trainable_params, result.total_params)
