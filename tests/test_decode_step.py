"""chattune's own decode step (models/decode_step.py): the logits of transformers' forward, one token per row, on
every model layout it accepts — and a clear refusal of the others."""

from __future__ import annotations

import pytest
import torch
from transformers import (AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

from chattune.models.decode_step import DecodeStep, why_not
from chattune.serve.engine import Batch, batching_is_exact, prefill, step_matches_transformers
from tiny import VOCAB_SIZE, make_tiny_llama

# Runs once more per CPU kind (tests/test_cpu_kinds.py): its outcome depends on the precision chattune picks or
# on the CPU's kernels.
pytestmark = pytest.mark.cpu_kind

SMALL = dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
PROMPTS = [[5, 9, 13, 17, 21, 25, 29, 33, 37], [7, 11, 40]]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = make_tiny_llama(tmp_path_factory.mktemp("step") / "m")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def run(model, step, feed, pad_id=0):
    """Logits [steps, B, V] of decoding `feed` after PROMPTS, with `step` (or transformers' forward: None)."""
    with torch.inference_mode():
        logits, cache, mask = prefill(model, PROMPTS, pad_id)
        batch = Batch.start(cache, mask)
        return torch.stack([batch.step(model, tokens, step) for tokens in feed])


FEED = [[3, 200], [17, 17], [250, 4], [99, 100], [1, 2], [60, 61]]


def test_llama_logits_equal_transformers_with_padding_and_rope_scaling(tmp_path, llama):
    want, got = run(llama, None, FEED), run(llama, DecodeStep(llama), FEED)
    assert got.shape == (6, 2, VOCAB_SIZE)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # linear RoPE scaling and a rope theta of its own: the step calls the model's rotary embedding
    scaled = AutoModelForCausalLM.from_pretrained(make_tiny_llama(
        tmp_path / "scaled", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0})).eval()
    torch.testing.assert_close(run(scaled, DecodeStep(scaled), FEED), run(scaled, None, FEED), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(run(scaled, None, FEED), want, atol=1e-3)


def test_the_cache_grows_as_transformers_grows_it(llama):
    caches = []
    for step in (None, DecodeStep(llama)):
        with torch.inference_mode():
            logits, cache, mask = prefill(llama, PROMPTS, 0)
            batch = Batch.start(cache, mask)
            for tokens in FEED[:3]:
                batch.step(llama, tokens, step)
        caches.append(batch.cache)
    for mine, theirs in zip(caches[1].layers, caches[0].layers):
        assert mine.keys.shape == theirs.keys.shape == (2, 2, 9 + 3, 8)
        torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(mine.values, theirs.values, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_other_llama_layout_families(family):
    torch.manual_seed(1)
    if family == "qwen2":  # q/k/v with biases
        model = Qwen2ForCausalLM(Qwen2Config(**SMALL, use_sliding_window=False, sliding_window=64)).eval()
    else:
        model = MistralForCausalLM(MistralConfig(**SMALL, sliding_window=None)).eval()
    assert why_not(model) is None
    torch.testing.assert_close(run(model, DecodeStep(model), FEED), run(model, None, FEED), atol=1e-5, rtol=1e-5)
    assert step_matches_transformers(model, DecodeStep(model), 0)


def test_lora_layers_are_called_as_modules(llama):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(llama, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    try:
        model.eval()
        assert why_not(model) is None
        got, want = run(model, DecodeStep(model), FEED), run(model, None, FEED)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        with model.disable_adapter():
            assert not torch.allclose(run(model, None, FEED), want, atol=1e-3)  # the adapter does change logits
        assert batching_is_exact(model, 0, decode=DecodeStep(model))
    finally:
        model.unload()


def test_bf16_within_its_rounding(llama):
    model = llama.to(torch.bfloat16)
    try:
        got, want = run(model, DecodeStep(model), FEED), run(model, None, FEED)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    finally:
        llama.float()


def test_what_it_refuses_and_why(llama):
    from peft import PrefixTuningConfig, get_peft_model

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2))
    assert "model type 'gpt2'" in why_not(gpt2)
    windowed = MistralForCausalLM(MistralConfig(**SMALL, sliding_window=16))
    assert why_not(windowed) == "sliding-window attention"
    assert DecodeStep.of(windowed) is None and DecodeStep.of(llama) is not None
    prefix = get_peft_model(AutoModelForCausalLM.from_pretrained(llama.name_or_path),
                            PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert why_not(prefix) == "a P-tuning v2 prefix"


def test_a_step_that_differs_is_caught_at_start_up(llama):
    step = DecodeStep(llama)
    assert step_matches_transformers(llama, step, 0)
    step.eps = 10.0  # a final norm that is not the model's
    assert not step_matches_transformers(llama, step, 0)


def test_worker_uses_the_step_only_where_it_is_checked(llama):
    from chattune.serve.worker import Worker

    class Tuned:
        model, info = llama, {}
        stop_ids, pad_id = [257], 0

        class tokenizer:
            pad_token_id = 0

    assert Worker(Tuned, max_batch=8).decode_step == "chattune"
    off = Worker(Tuned, max_batch=8, decode_step="transformers")
    assert off.decode_step == "transformers" and off.decode_why == "--decode-step transformers" and off.batching
    one = Worker(Tuned, max_batch=1)  # one at a time: transformers' generate, its decode steps through the step
    assert one.decode_step == "chattune" and not one.batching and one.generate_step
    assert hasattr(llama.forward, "chattune_original")
    from chattune.models.decode_step import uninstall

    uninstall(llama)


@pytest.mark.skipif(__import__("chattune.models.blockweights", fromlist=["x"]).why_unavailable() is not None,
                    reason="block-weight kernel unavailable here")
def test_packed_projections_are_fused_without_a_second_copy(tmp_path):
    from chattune.models.blockweights import enable
    from tiny import exact_tiny

    model = exact_tiny(tmp_path)
    with torch.no_grad():  # layer 1's k_proj is no longer blocks: that layer's q/k/v cannot be fused
        model.model.layers[1].self_attn.k_proj.weight[0, 0] += 1e-3
    assert enable(model, lambda m: None) == {"q4": 13, "q8": 1, "fp32": 1}
    before = run(model, None, FEED)
    step = DecodeStep(model)
    fused, plain = step.layers
    assert fused.qkv is not None and fused.gate_up is not None and plain.qkv is None and plain.gate_up is not None
    assert fused.native and not plain.native  # layer 0 runs in C, layer 1 in torch
    attn = model.model.layers[0].self_attn
    stacked = attn.q_proj._chattune_packed.data
    assert attn.k_proj._chattune_packed.data.data_ptr() == stacked.data_ptr() + stacked.shape[0] * stacked.shape[1]
    torch.testing.assert_close(run(model, None, FEED), before, atol=0, rtol=0)  # the views hold the same blocks
    # float noise of another order of sums: these logits reach ~200 (weights of 4-bit blocks times 4)
    torch.testing.assert_close(run(model, step, FEED), before, atol=1e-5 * float(before.abs().max()), rtol=0)


@pytest.mark.parametrize("packed", [False, True])
def test_the_cache_grows_in_place_and_survives_merge_and_keep(monkeypatch, packed):
    """The step writes each new key/value into storage with room (models/decode_step.append) instead of copying the
    cache: past the room it moves to larger storage, and after the engine's merge and keep (which replace the
    views with plain tensors) it starts anew; the logits stay transformers' throughout."""
    import chattune.models.decode_step as ds
    from chattune.models.blockweights import enable, why_unavailable
    from tiny import make_block_exact

    monkeypatch.setattr(ds, "ROOM", 2)  # storage moves every few steps
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(__import__("transformers").LlamaConfig(**SMALL)).float().eval()
    if packed:
        if why_unavailable() is not None:
            pytest.skip(f"block-weight kernel unavailable here: {why_unavailable()}")
        model = make_block_exact(model)
        enable(model, lambda m: None)
    step = DecodeStep(model)
    assert all(layer.native for layer in step.layers) == packed
    results, storages = [], []
    for decode in (None, step):
        with torch.inference_mode():
            logits, cache, mask = prefill(model, PROMPTS, 0)
            batch, out = Batch.start(cache, mask), []
            for tokens in FEED[:5]:
                out.append(batch.step(model, tokens, decode))
            if decode is not None:
                layer = batch.cache.layers[0]
                storage = layer._chattune_room[0]
                assert layer.keys.data_ptr() == storage.data_ptr() and storage.shape[2] > layer.keys.shape[2] == 14
                storages.append(storage.shape[2])
            extra_logits, extra_cache, extra_mask = prefill(model, [[8, 6, 4]], 0)
            batch.merge(Batch.start(extra_cache, extra_mask))
            for tokens in FEED[5:] * 3:
                out.append(batch.step(model, tokens + [5], decode))
            batch.keep([0, 2])
            for tokens in FEED[:3]:
                out.append(batch.step(model, [tokens[0], 9], decode))
        results.append(out)
    scale = max(float(t.abs().max()) for t in results[0])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=1e-5 * scale, rtol=0)
    # 9 slots from prefill, room for max(2, 9 // 2) more; full after 4 steps, then 13 + max(2, 13 // 2)
    assert storages == [19]


@pytest.mark.skipif(__import__("chattune.models.blockweights", fromlist=["x"]).why_unavailable() is not None,
                    reason="block-weight kernel unavailable here")
@pytest.mark.parametrize("family", ["llama", "qwen2", "llama-hd12"])
def test_the_c_layer_gives_transformers_logits(family):
    """Fully packed layers run as two C calls each (norm, q/k/v, rotation | attention, o, norm, gate/up, SiLU,
    down): padded and unpadded rows, q/k/v biases, a head size that is not a multiple of 8."""
    from chattune.models.blockweights import enable
    from tiny import make_block_exact

    torch.manual_seed(2)
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**SMALL, use_sliding_window=False))
    else:
        kw = dict(SMALL, hidden_size=96, num_attention_heads=8, num_key_value_heads=4) if family == "llama-hd12" \
            else SMALL
        model = AutoModelForCausalLM.from_config(__import__("transformers").LlamaConfig(**kw))
    model = make_block_exact(model.float().eval())
    if family == "qwen2":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.k_proj.bias.normal_()  # biases that matter
    enable(model, lambda m: None)
    step = DecodeStep(model)
    assert all(layer.native for layer in step.layers)
    want = run(model, None, FEED)
    scale = float(want.abs().max())
    torch.testing.assert_close(run(model, step, FEED), want, atol=1e-5 * scale, rtol=0)
    with torch.inference_mode():  # one row, nothing padded: no mask at all
        logits, cache, mask = prefill(model, [PROMPTS[0]], 0)
        batch, ref = Batch.start(cache, mask), []
        logits2, cache2, mask2 = prefill(model, [PROMPTS[0]], 0)
        batch2 = Batch.start(cache2, mask2)
        for tokens in FEED:
            ref.append(batch.step(model, tokens[:1]))
            torch.testing.assert_close(batch2.step(model, tokens[:1], step), ref[-1], atol=1e-5 * scale, rtol=0)
    assert step_matches_transformers(model, step, 0) and batching_is_exact(model, 0, decode=step)


def _generate(model, **kw):
    ids = torch.tensor([[0] * 6 + PROMPTS[1], PROMPTS[0]])
    mask = (torch.arange(9) >= torch.tensor([[6], [0]])).long()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.scores)


def test_generate_decodes_through_the_step_with_the_same_tokens(llama, monkeypatch):
    from chattune.models.decode_step import enable_for_generate, install, uninstall

    greedy = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    want = _generate(llama, **greedy)
    torch.manual_seed(3)
    sampled = _generate(llama, do_sample=True, temperature=1.0, top_p=0.9)[0]
    calls = []
    real = DecodeStep.__call__
    monkeypatch.setattr(DecodeStep, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    lines = []
    assert enable_for_generate(llama, 0, lines.append) and "chattune's own" in lines[0]
    try:
        calls.clear()
        got = _generate(llama, **greedy)
        assert len(calls) == 7  # every token after the first (the prefill's) came from the step
        assert torch.equal(got[0], want[0])
        torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
        torch.manual_seed(3)
        assert torch.equal(_generate(llama, do_sample=True, temperature=1.0, top_p=0.9)[0], sampled)
        # anything but a plain decode step goes to the model's own forward: prefill, training with labels
        calls.clear()
        ids = torch.tensor([PROMPTS[0]])
        with torch.no_grad():
            loss = llama(input_ids=ids, labels=ids).loss
        assert calls == [] and loss.ndim == 0
    finally:
        uninstall(llama)
    assert not hasattr(llama.forward, "chattune_original")

    # a step whose logits are not transformers' is refused, and the model's forward is left as it was
    monkeypatch.setattr(DecodeStep, "__call__", lambda self, *a: real(self, *a) + 1.0 * (torch.arange(VOCAB_SIZE) == 7))
    lines.clear()
    assert not enable_for_generate(llama, 0, lines.append)
    assert lines == ["decode step: transformers' forward (its logits differ from transformers' on this model)"]
    assert not hasattr(llama.forward, "chattune_original")
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2))
    lines.clear()
    assert not enable_for_generate(gpt2, 0, lines.append) and "model type 'gpt2'" in lines[0]
    install(llama, DecodeStep(llama))
    uninstall(llama)
    assert not hasattr(llama.forward, "chattune_original")


@pytest.mark.skipif(__import__("chattune.models.blockweights", fromlist=["x"]).why_unavailable() is not None,
                    reason="block-weight kernel unavailable here")
@pytest.mark.parametrize("targets,dora", [("all-linear", False), (["q_proj", "v_proj", "down_proj"], False),
                                          ("all-linear", True)])
def test_lora_over_packed_layers(tmp_path, targets, dora):
    """A LoRA adapter over packed base layers (`serve --adapter` on the bundled model): plain LoRA is folded into
    the fused groups and runs in the C layer — one down-projection for q/k/v, a block-diagonal up-projection with
    zeros where a projection has no adapter; DoRA is left to peft's own module calls."""
    from peft import LoraConfig, get_peft_model

    from chattune.models.blockweights import enable
    from tiny import exact_tiny

    torch.manual_seed(4)
    model = get_peft_model(exact_tiny(tmp_path), LoraConfig(r=4, lora_alpha=16, target_modules=targets,
                                                            init_lora_weights=False, use_dora=dora)).eval()
    assert enable(model, lambda m: None)["q4"] == 14
    step = DecodeStep(model)
    first = step.layers[0]
    if dora:
        assert not first.native and first.qkv is None
    else:
        assert all(layer.native for layer in step.layers)
        r = 4 * (3 if targets == "all-linear" else 2)
        assert first.qkv.lora_a.shape == (r, 32) and first.qkv.lora_bt.shape == (r, 32 + 16 + 16)
        if targets != "all-linear":  # k_proj has no adapter: its columns of the up-projection are zeros
            assert first.qkv.lora_bt[:, 32:48].abs().sum() == 0 and first.gate_up.lora_a is None
    want = run(model, None, FEED)
    with model.disable_adapter():
        assert not torch.allclose(run(model, None, FEED), want, atol=1e-2)  # the adapter matters
    torch.testing.assert_close(run(model, step, FEED), want, atol=1e-5 * float(want.abs().max()), rtol=0)
    assert step_matches_transformers(model, step, 0) and batching_is_exact(model, 0, decode=step)
