"""lora.fuse: adapters that read the same input share one down-projection (train/shared_lora.py)."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from chattune.config import load_config
from chattune.errors import ConfigError
from chattune.train import fast_dropout, shared_lora
from chattune.train.trainer import train
from tiny import make_tiny_llama, write_jsonl

# Runs once more per CPU kind (tests/test_cpu_kinds.py): its outcome depends on the precision chattune picks or
# on the CPU's kernels.
pytestmark = pytest.mark.cpu_kind


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("shared") / "model")


def peft_model(path, dropout=0.0):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; non-zero B makes every adapter's contribution visible
            torch.nn.init.normal_(p, std=0.2)
    return model


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), grads(model)


def shared_members(model):
    return {m._chattune_shared for m in model.modules() if getattr(m, "_chattune_shared", None) is not None}


def test_groups_are_the_layers_that_read_one_input(tiny_path):
    model = peft_model(tiny_path)
    assert shared_lora.install(model) == 10  # per layer: q, k, v and gate, up (o and down read their own inputs)
    name_of = {m: n for n, m in model.named_modules()}
    groups = sorted(sorted(name_of[m].split(".")[-3] + "." + name_of[m].split(".")[-1] for m in g.members)
                    for g in shared_members(model))
    assert groups == [["0.gate_proj", "0.up_proj"], ["0.k_proj", "0.q_proj", "0.v_proj"],
                      ["1.gate_proj", "1.up_proj"], ["1.k_proj", "1.q_proj", "1.v_proj"]]


def test_without_dropout_losses_and_gradients_are_peft_s(tiny_path):
    plain, shared = peft_model(tiny_path), peft_model(tiny_path)
    shared_lora.install(shared)
    ids = torch.randint(0, 200, (2, 11), generator=torch.Generator().manual_seed(1))
    want_loss, want = loss_and_grads(plain, ids)
    got_loss, got = loss_and_grads(shared, ids)
    assert got_loss == pytest.approx(want_loss, abs=1e-6)
    assert want.keys() == got.keys() and any("lora_A" in n for n in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5)
    # the parameters (and so the saved adapter) are peft's own
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in shared.named_parameters()]
    # every call used the group: nothing is left waiting in a group after the pass
    assert all(not g.pieces and g.x is None for g in shared_members(shared))


def test_falls_back_to_peft_where_the_group_does_not_apply(tiny_path):
    plain, shared = peft_model(tiny_path), peft_model(tiny_path)
    shared_lora.install(shared)
    plain.eval(), shared.eval()
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        # adapters switched off: the base model
        with shared.disable_adapter(), plain.disable_adapter():
            torch.testing.assert_close(shared(input_ids=ids).logits, plain(input_ids=ids).logits)
        # one member called on its own input (not its group's): its own adapter, as peft computes it
        attn_s = shared.base_model.model.model.layers[0].self_attn
        attn_p = plain.base_model.model.model.layers[0].self_attn
        x = torch.randn(1, 5, 32)
        torch.testing.assert_close(attn_s.k_proj(x), attn_p.k_proj(x))
        torch.testing.assert_close(attn_s.k_proj(x), attn_p.k_proj(x))  # called twice on one input
        torch.testing.assert_close(attn_s.v_proj(x + 1), attn_p.v_proj(x + 1))
        # an input modified in place after the group computed on it is recomputed
        y = torch.randn(1, 5, 32)
        attn_s.q_proj(y)
        y.mul_(2)
        torch.testing.assert_close(attn_s.k_proj(y), attn_p.k_proj(y))
        # merged adapters
        shared.merge_adapter(), plain.merge_adapter()
        torch.testing.assert_close(shared(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        shared.unmerge_adapter(), plain.unmerge_adapter()
    shared_lora.uninstall(shared)
    assert not shared_members(shared) and all("forward" not in vars(m) for m in shared.modules())


def test_with_dropout_a_group_shares_one_mask(tiny_path):
    """With dropout the members of a group see their input with one mask: each adapter's contribution is
    B(A(x * keep / (1 - p))) * scaling for one `keep`, drawn once from torch's seeded generator."""
    model = peft_model(tiny_path, dropout=0.5)
    fast_dropout.apply(model)
    shared_lora.install(model)
    model.train()
    attn = model.base_model.model.model.layers[1].self_attn
    x = torch.randn(2, 6, 32)
    torch.manual_seed(7)
    got = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
    torch.manual_seed(7)
    dropped = attn.q_proj.lora_dropout["default"](x)  # the same draw
    assert 0.3 < (dropped == 0).float().mean().item() < 0.7
    for out, proj in zip(got, (attn.q_proj, attn.k_proj, attn.v_proj)):
        want = proj.base_layer(x) + proj.lora_B["default"](proj.lora_A["default"](dropped)) * proj.scaling["default"]
        torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)


def test_fuse_setting():
    assert shared_lora.should_fuse("auto", 0.0, False, False) == (
        True, "auto: lora.dropout=0, the same maths as peft's")
    assert shared_lora.should_fuse("auto", 0.1, False, False) == (
        True, "auto: one dropout mask per shared input; lora.fuse=false for one per adapter, as peft draws them")
    assert shared_lora.should_fuse(True, 0.1, False, False)[0] is True
    assert shared_lora.should_fuse(False, 0.0, False, False) == (False, "lora.fuse=false")
    assert shared_lora.should_fuse(True, 0.0, True, False)[0] is False  # DeepSpeed / FSDP
    assert shared_lora.should_fuse("auto", 0.0, False, True)[0] is False  # train.compile
    with pytest.raises(ConfigError, match="lora.fuse"):
        load_config(None, ["lora.fuse=sometimes"])


def test_training_with_fuse_equals_training_without(tiny_path, tmp_path):
    """chattune train: lora.fuse=auto (dropout 0) trains peft's losses to 1e-5 and saves the same adapter keys."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"say {w}", "output": f"{w} {w}"}
                                               for w in ["red", "blue", "green", "pink", "gold", "grey", "teal"]])
    lines: dict[str, list[str]] = {}

    def run(name, *extra):
        out = tmp_path / name
        cfg = load_config(None, [f"model={tiny_path}", f"data.train={data}", f"output_dir={out}",
                                 "train.precision=fp32", "train.logging_steps=1", "train.batch_size=3",
                                 "train.lr=5e-3", "train.max_steps=5", "lora.dropout=0", "train.num_threads=1",
                                 *extra])
        lines[name] = []
        train(cfg, log=lines[name].append)
        return [json.loads(r)["loss"] for r in (out / "metrics.jsonl").read_text().splitlines()
                if "loss" in json.loads(r)]

    want = run("peft", "lora.fuse=false")
    got = run("fused")
    assert len(got) == 5 and got == pytest.approx(want, abs=1e-5, rel=0)
    assert "lora.fuse: 10 adapted layers share a down-projection (auto: lora.dropout=0, the same maths as peft's)" \
        in lines["fused"]
    assert "lora.fuse: off (lora.fuse=false)" in lines["peft"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "fused" / "adapter_model.safetensors"), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():
            torch.testing.assert_close(a.get_tensor(key), b.get_tensor(key), atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_recomputes_the_same_shared_masks(tiny_path):
    """Under gradient checkpointing the layers run again in the backward: the groups recompute their product
    (and, restored by torch's checkpoint, their dropout draw), so the gradients equal those without it."""
    runs = []
    for checkpointing in (False, True):
        model = peft_model(tiny_path, dropout=0.3)
        fast_dropout.apply(model)
        shared_lora.install(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.train()
        torch.manual_seed(3)
        ids = torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(2))
        runs.append(loss_and_grads(model, ids))
    (want_loss, want), (got_loss, got) = runs
    assert got_loss == pytest.approx(want_loss, abs=1e-6)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5)
