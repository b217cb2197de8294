"""The block-weight decode path (models/blockweights.py): layers whose fp32 weights are exactly Q4_1 / Q8_0 blocks are
computed from those blocks, with the same results as torch's fp32 matmul up to the order of the sums."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chattune.models import blockweights
from chattune.models.blockweights import BlockWeight, attach_block_weights, block_linear, enable, q4_layout, q8_layout
from tiny import exact_tiny, make_tiny_llama, q4_exact, q8_exact

# cpu_kind: runs once more per CPU kind (tests/test_cpu_kinds.py), the C kernel being the CPU's own
pytestmark = [pytest.mark.cpu_kind, pytest.mark.skipif(
    blockweights.why_unavailable() is not None,
    reason=f"block-weight kernel unavailable here: {blockweights.why_unavailable()}")]


def test_layout_finds_exact_blocks_and_refuses_anything_else():
    w = q4_exact(8, 64)
    data = q4_layout(w)
    assert data is not None and data.dtype == torch.uint8 and data.shape == (8, 2 * 20)
    # the layout: per block d and m as fp16, then element j in the low nibble of byte j, element j+16 in its high
    blocks = data.reshape(8, 2, 20)
    d = blocks[..., 0:2].contiguous().view(torch.float16).float().squeeze(-1)
    m = blocks[..., 2:4].contiguous().view(torch.float16).float().squeeze(-1)
    nib = blocks[..., 4:].long()
    q = torch.cat([nib & 15, nib >> 4], dim=-1).float()
    assert torch.equal(d[..., None] * q + m[..., None], w.reshape(8, 2, 32))

    off = w.clone()
    off[3, 17] = torch.nextafter(off[3, 17], torch.tensor(1.0))  # one weight one ulp away from a block value
    assert q4_layout(off) is None
    assert q4_layout(torch.randn(8, 64)) is None          # plain fp32 weights
    assert q4_layout(q4_exact(8, 64)[:, :48]) is None     # K not a multiple of 32
    assert q4_layout(w.double()) is None
    assert q8_layout(q8_exact(4, 96)) is not None and q8_layout(torch.randn(4, 96)) is None
    assert q4_layout(q8_exact(4, 96)) is None             # 8-bit blocks are not 4-bit ones


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 17, 32])
def test_kernels_equal_torch_matmul(rows):
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows))
    bias = torch.randn(40)
    for w, kind in ((q4_exact(40, 96, rows), "q4"), (q8_exact(40, 96, rows), "q8")):
        p = BlockWeight.of(w)
        assert p.kind == kind
        want = F.linear(x, w, bias)
        got = block_linear(x, p, 40, bias)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # a row's result does not depend on the other rows it is computed with
        torch.testing.assert_close(block_linear(x[-1:], p, 40, bias)[0], got[-1], rtol=0, atol=1e-6)
        # 3-d input, and a non-contiguous one
        x3 = x.reshape(rows, 1, 96)
        torch.testing.assert_close(block_linear(x3, p, 40), F.linear(x3, w), rtol=1e-5, atol=1e-5)
        xt = torch.randn(96, rows).t()
        torch.testing.assert_close(block_linear(xt, p, 40), F.linear(xt, w), rtol=1e-5, atol=1e-5)


def test_the_kernel_width_follows_the_cpu_unless_avx2_is_asked_for():
    """The Q4 kernel is AVX-512 where the CPU has it (what torch reports as AVX512), AVX2 otherwise or when
    CHATTUNE_BLOCK_KERNEL=avx2 (tests/test_cpu_kinds.py runs these tests once more that way)."""
    import os

    asked = os.environ.get("CHATTUNE_BLOCK_KERNEL")
    wide = asked != "avx2" and torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX")
    assert blockweights._library().block_kernel_width() == (512 if wide else 256)


def test_attach_block_weights_keeps_outputs_and_greedy_tokens(tmp_path):
    model = exact_tiny(tmp_path)
    prompt = torch.tensor([[5, 9, 13, 17, 21, 25]])
    with torch.inference_mode():
        want_logits = model(prompt[:, :1]).logits
        want = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    counts = attach_block_weights(model)
    assert counts == {"q4": 14, "q8": 1, "fp32": 0}  # 2 layers x 7 projections, and the output head
    assert model.lm_head._chattune_packed.kind == "q8"
    with torch.inference_mode():
        # float noise only (the sums in another order), through two layers and the head
        scale = float(want_logits.abs().max())
        torch.testing.assert_close(model(prompt[:, :1]).logits, want_logits, rtol=0, atol=1e-5 * scale)
        got = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert got.tolist() == want.tolist()


def test_training_and_long_inputs_use_the_fp32_weights(tmp_path, monkeypatch):
    model = exact_tiny(tmp_path)
    attach_block_weights(model)
    calls = []
    real = blockweights.block_linear
    monkeypatch.setattr(blockweights, "block_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()  # gradients: torch's matmul
    assert calls == [] and model.model.layers[0].mlp.up_proj.weight.grad is not None
    with torch.inference_mode():
        model(torch.arange(blockweights.MAX_ROWS + 1)[None])  # a prefill longer than MAX_ROWS rows
        assert calls == []
        model(torch.tensor([[1]]))
    assert len(calls) == 15


def test_only_exact_layers_read_from_blocks(tmp_path):
    model = exact_tiny(tmp_path, tie=True)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.add_(1e-3)  # e.g. merged with an adapter: no longer blocks
    assert model.lm_head.weight is model.model.embed_tokens.weight
    counts = attach_block_weights(model)
    assert counts == {"q4": 13, "q8": 1, "fp32": 1}  # the tied head is read from the embedding's 8-bit blocks
    assert not hasattr(model.model.layers[1].mlp.down_proj, "_chattune_packed")


def test_enable_says_what_it_did(tmp_path):
    lines = []
    model = exact_tiny(tmp_path)
    assert enable(model, lines.append) == {"q4": 14, "q8": 1, "fp32": 0}
    assert "15 of 15 linear layers" in lines[0] and "14 Q4_1, 1 Q8_0" in lines[0]
    plain = make_tiny_llama(tmp_path / "plain")
    from transformers import AutoModelForCausalLM

    lines.clear()
    assert enable(AutoModelForCausalLM.from_pretrained(plain).eval(), lines.append) is None
    assert "no linear layer" in lines[0]
    lines.clear()
    assert enable(exact_tiny(tmp_path).to(torch.bfloat16), lines.append) is None and lines == []


def test_kernel_is_built_once_into_the_cache_and_a_missing_compiler_is_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(blockweights, "_LIB", None)
    (tmp_path / "cache" / "kernels").mkdir(parents=True)
    (tmp_path / "cache" / "kernels" / "packed-0123456789abcdef.so").write_bytes(b"an older build")
    assert blockweights.why_unavailable() is None
    built = sorted(p.name for p in (tmp_path / "cache" / "kernels").iterdir())
    assert len(built) == 2 and built[0].endswith(".c") and built[1].endswith(".so")  # the older build is gone
    assert "0123456789abcdef" not in " ".join(built)
    monkeypatch.setattr(blockweights, "_LIB", None)
    monkeypatch.setenv("CHATTUNE_CACHE", str(tmp_path / "other"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    why = blockweights.why_unavailable()
    assert why is not None and "could not be built" in why
    monkeypatch.setattr(blockweights, "_LIB", None)  # the next user builds it again


def test_serve_engine_batches_a_block_weight_model_exactly(tmp_path):
    from chattune.serve.engine import Batch, batching_is_exact, prefill

    model = exact_tiny(tmp_path)
    prompts = [[5, 9, 13, 17, 21, 25, 29], [7, 11], [3, 4, 5]]
    with torch.inference_mode():
        def decode(prompt_list):
            logits, cache, mask = prefill(model, prompt_list, 0)
            batch, out = Batch.start(cache, mask), [logits.argmax(-1).tolist()]
            for _ in range(6):
                out.append(batch.step(model, out[-1]).argmax(-1).tolist())
            return list(zip(*out))
        alone_fp32 = [decode([p])[0] for p in prompts]
        attach_block_weights(model)
        assert batching_is_exact(model, 0)
        together = decode(prompts)
    assert together == alone_fp32


def test_ordinary_weights_are_refused_after_one_row(monkeypatch):
    """An ordinary fp32 weight is found not to be blocks from its first row alone: the whole-weight search (several
    full-size passes per layer) runs only for a weight whose first row is blocks, and still decides on all of it."""
    seen = []
    real_q4, real_q8 = blockweights.q4_blocks, blockweights.q8_blocks
    monkeypatch.setattr(blockweights, "q4_blocks", lambda w: seen.append(("q4", tuple(w.shape))) or real_q4(w))
    monkeypatch.setattr(blockweights, "q8_blocks", lambda w: seen.append(("q8", tuple(w.shape))) or real_q8(w))
    assert BlockWeight.of(torch.randn(64, 128)) is None
    assert seen == [("q4", (1, 128)), ("q8", (1, 128))]
    seen.clear()
    w = q8_exact(64, 128)
    w[40, 3] = torch.nextafter(w[40, 3], torch.tensor(1.0))  # blocks in the first row, not further down
    assert BlockWeight.of(w) is None
    assert ("q8", (64, 128)) in seen  # the whole weight was checked
    assert BlockWeight.of(q8_exact(64, 128)).kind == "q8" and BlockWeight.of(q4_exact(64, 128)).kind == "q4"
