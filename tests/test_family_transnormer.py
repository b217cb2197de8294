"""chattune's own TransNormerLLM computes what the publisher's code computes, to 1e-5 in fp32.

How the reference numbers below were produced (once, outside this repository; the publisher's code is not in it):
- Code: `modeling_transnormer.py` (34607 bytes, sha256 db0458c20feeb638...), `configuration_transnormer.py`,
  `norm.py`, `utils.py` of the Hugging Face repos OpenNLPLab/TransNormerLLM-* in their latest form (the 7B main's
  "Upgrade to lightning att2" modeling file, 34.6 kB, importing lightning_attention2), as mirrored in
  github.com/weigao266/TNL-MoE at 0b5d4e32880dac439e2a209eeef3c79d1bc6a62d, smoe/models/tnl/. Run from /tmp as a
  package in a separate virtualenv: transformers 4.37.2, einops, torch 2.13.0+cpu, Python 3.11.7.
- Patches: the environment variable use_triton=False (the publisher's documented switch; it selects the code's own
  pure-torch paths: in eval mode `NormLinearAttention.inference`, a block-wise prefill with BLOCK=256 and a
  token-by-token recurrent decode; in train mode the quadratic `linear_attention`), and srmsnorm_triton.py replaced
  by a stub re-exporting norm.SimpleRMSNorm (triton is not installed; both compute x * rsqrt(mean(x^2) + 1e-6) in
  fp32). No other change. The decay slopes are a plain attribute there, so nothing was on the meta device.
- Twin: the published TransNormerLLM-1B config.json (`PUBLISHED_1B`) with decoder_layers 2, decoder_embed_dim 64,
  hidden_dim 64, decoder_attention_heads 4, vocab_size 160, glu_dim 176 (the 1B's ratio 5632 / 2048),
  linear_use_lrpe_list [1, 0] (LRPE in the first layer, as published), torch_dtype float32, every other field as
  published. `TransnormerForCausalLM(TransnormerConfig(**twin))` (tie_word_embeddings left at the default True:
  lm_head *is* embed_tokens), `load_state_dict(twin_weights(...), strict=True)` over the official names, eval().
- "full": logits of `model(input_ids=twin_ids(2, 40), use_cache=False)` (eval: the block-wise path; the train-mode
  quadratic path gave the same, max difference 0), 9 significant digits. "long300": the same for twin_ids(1, 300,
  offset=7) (two blocks; quadratic path within 1.8e-6).
- "recurrent": a fresh model, prefill of the first token, then one token per call with the returned
  past_key_values (its own per-layer states): the last-token logits of each call, stacked (within 4.1e-6 of "full").
  "prefill_decode": prefill of 25 tokens, then 15 single-token calls, logits concatenated.
- "greedy": the official `generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)`
  with its cache; equal to greedy decoding by repeated full forwards; smallest top-1/top-2 margin 0.0016 >> 1e-5.
- "leftpad": row 1 of twin_ids(2, 20) cut to 15 tokens and left-padded with five 0s (attention_mask 0 there): the
  official code's logits of the padded row equal the unpadded row's within 1.4e-6.
- bf16: the official model cast with .to(torch.bfloat16) differs from fp32 by up to 0.072 (|logits| <= 3.3).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from chattune.models.families import transnormer
from chattune.models.families.transnormer import TransnormerCache, TransnormerForCausalLM, config_from_published

PUBLISHED_1B = {  # OpenNLPLab/TransNormerLLM-1B config.json as published
    "architectures": ["TransnormerForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_transnormer.TransnormerConfig",
                 "AutoModelForCausalLM": "modeling_transnormer.TransnormerForCausalLM"},
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "vocab_size": 64000, "use_cache": True,
    "init_std": 0.02, "decoder_embed_dim": 2048, "decoder_layers": 16, "decoder_attention_heads": 16,
    "no_scale_embedding": False, "add_bos_token": False, "norm_type": "simplermsnorm",
    "linear_use_lrpe_list": [1] + [0] * 15, "hidden_dim": 2048, "linear_act_fun": "swish",
    "glu_dim": 5632, "bias": False, "torch_dtype": "bfloat16", "transformers_version": "4.32.0"}
TWIN = {**PUBLISHED_1B, "vocab_size": 160, "decoder_embed_dim": 64, "hidden_dim": 64, "decoder_layers": 2,
        "decoder_attention_heads": 4, "linear_use_lrpe_list": [1, 0], "glu_dim": 176, "torch_dtype": "float32"}

REFERENCE = {
    "full": {"s0": [-0.409899056, -0.822068036, 0.228827387, 1.26931059, -0.225535214, -0.282046109, -0.458060712,
                    -0.0058137062, -0.779965937, 0.00335944095, 0.786152899, -0.129802749, -1.17304814,
                    -0.427426338, -0.0782840997],
             "s1": [-0.338672549, -0.69314152, 0.941952467, 1.08851528, 0.664009035, 1.10026753, -0.278598696,
                    0.397511691],
             "s2": [-0.634858966, -1.01444757, -0.960984826, -0.202650577, -0.996053815],
             "sum": 148.111978, "sumsq": 6379.66595},
    "long300": {"s0": [1.07532895, 0.310133725, 0.56093657, 0.786106527, -0.523678839, 0.41275987],
                "s1": [0.281747878, 0.475465298, -0.118506029, 0.513068914, -0.0580824874, -0.091588527],
                "sum": 153.373621, "sumsq": 24402.9794},
    "recurrent": {"s0": [0.209571689, -0.16036728, 0.901106477, -1.45943832, 0.385338813, 1.15958607],
                  "s1": [-0.48956567, 1.01959002, 0.231697649, 0.901642799, 0.110000312, -0.98187381],
                  "sum": 148.111967},
    "prefill_decode": {"s0": [-0.48775506, -0.0594853759, -0.822794497, -0.366712809, -0.140237212, -0.575816631],
                       "s1": [0.753166795, -0.920733333, -0.807218075, 0.547655582, 0.0515244454, 0.0622599721]},
    "greedy_prompt": [[6, 40, 104, 71, 128, 148, 4, 40, 129, 144, 115, 72],
                      [23, 57, 121, 88, 145, 8, 21, 57, 146, 4, 132, 89]],
    "greedy": [[122, 144, 72, 72, 72, 72, 72, 72, 72, 22], [89, 89, 89, 78, 11, 15, 15, 15, 15, 15]],
    "leftpad_row1_last": [-0.493805468, -0.535592139, -0.708284795, -1.2948693, -0.220717654, -2.04486895],
}


def official_shapes(c: dict) -> dict:
    """The official state_dict layout (names and shapes it reported for the twin), derived from the config."""
    d, hd, g, v, heads = c["decoder_embed_dim"], c["hidden_dim"], c["glu_dim"], c["vocab_size"], \
        c["decoder_attention_heads"]
    shapes = {"model.embed_tokens.weight": (v, d), "lm_head.weight": (v, d)}
    for i, lrpe in enumerate(c["linear_use_lrpe_list"]):
        p = f"model.layers.{i}."
        shapes.update({p + "token_mixer.qkvu_proj.weight": (4 * hd, d), p + "token_mixer.out_proj.weight": (d, hd),
                       p + "channel_mixer.l1.weight": (g, d), p + "channel_mixer.l2.weight": (g, d),
                       p + "channel_mixer.l3.weight": (d, g)})
        if lrpe:
            shapes[p + "token_mixer.lrpe.theta"] = (heads, 1, hd // heads)
    return shapes


def twin_weights(shapes):
    """Deterministic weights for the official state-dict names (sorted); out_proj/l3 x3 so the mixers matter."""
    out = {}
    for k, name in enumerate(sorted(shapes)):
        shape = shapes[name]
        n = math.prod(shape)
        idx = torch.arange(n, dtype=torch.float64)
        wave = torch.sin(0.731 * idx + 0.0173 * idx * idx + 1.37 * k)
        if name.endswith("lrpe.theta"):
            w = 10000 ** (-2 / n * idx) * (1 + 0.05 * wave)
        else:
            gain = 3.0 if name.endswith(("out_proj.weight", "l3.weight")) else 1.0
            w = gain * wave / math.sqrt(shape[-1])
        out[name] = w.reshape(shape).to(torch.float32)
    return out


def twin_ids(batch, length, offset=0):
    return torch.tensor([[(5 * i * i * i + 29 * i + 17 * r + offset) % 157 + 3 for i in range(length)]
                         for r in range(batch)])


def published_state() -> dict:
    """The twin's state dict as the official (tied) model saves it: lm_head.weight equal to the embedding."""
    state = twin_weights(official_shapes(TWIN))
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    return state


def build(**overrides) -> TransnormerForCausalLM:
    model = TransnormerForCausalLM(config_from_published({**TWIN, **overrides})).float().eval()
    result = model.load_state_dict(published_state(), strict=True)  # every published name, none missing
    assert not result.missing_keys and not result.unexpected_keys
    return model


@pytest.fixture(scope="module")
def model():
    return build()


def check_full(logits: torch.Tensor):
    ref = REFERENCE["full"]
    logits = logits.double()
    torch.testing.assert_close(logits[0, :3, :5].flatten(), torch.tensor(ref["s0"], dtype=torch.float64),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[1, -1, :8], torch.tensor(ref["s1"], dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[0, 17, 100:105], torch.tensor(ref["s2"], dtype=torch.float64),
                               atol=1e-5, rtol=0)
    assert float(logits.sum()) == pytest.approx(ref["sum"], abs=1e-3)
    assert float(logits.pow(2).sum()) == pytest.approx(ref["sumsq"], abs=1e-3)


def greedy_by_full_forwards(model, prompt: torch.Tensor, n: int) -> list[list[int]]:
    seq = prompt
    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    return seq[:, prompt.shape[1]:].tolist()


def test_config_from_the_published_config():
    c = config_from_published(PUBLISHED_1B)
    assert c.model_type == "chattune_transnormer" and c.architectures == ["TransnormerForCausalLM"]
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == (16, 2048, 16, 5632)
    assert (c.decoder_layers, c.decoder_embed_dim, c.hidden_dim, c.vocab_size) == (16, 2048, 2048, 64000)
    assert c.lrpe_layers() == [True] + [False] * 15 and c.linear_act_fun == "swish"
    assert (c.pad_token_id, c.bos_token_id, c.eos_token_id) == (0, 1, 2)
    assert c.no_scale_embedding is False and c.bias is False and c.initializer_range == 0.02
    assert c.tie_word_embeddings is True and c.dtype == torch.bfloat16
    saved = c.to_dict()
    assert "auto_map" not in saved and saved["model_type"] == "chattune_transnormer"
    with pytest.raises(ValueError, match="norm_type"):
        config_from_published({**PUBLISHED_1B, "norm_type": "layernorm"})
    with pytest.raises(ValueError, match="TransNormerLLM3"):
        config_from_published({**PUBLISHED_1B, "gate_dim": 16})
    with pytest.raises(ValueError, match="linear_use_lrpe_list"):
        config_from_published({**PUBLISHED_1B, "linear_use_lrpe_list": [1, 0]})


def test_decay_slopes_are_the_official_ones():
    assert transnormer.alibi_slopes(4) == [0.25, 0.0625, 0.015625, 0.00390625]
    assert len(transnormer.alibi_slopes(12)) == 12  # not a power of 2: the ALiBi workaround
    first, last = transnormer.layer_slopes(4, 0, 2), transnormer.layer_slopes(4, 1, 2)
    assert first == pytest.approx([0.25 * (1 + 1e-5), 0.0625 * (1 + 1e-5), 0.015625 * (1 + 1e-5),
                                   0.00390625 * (1 + 1e-5)], rel=1e-6)
    assert last == pytest.approx([0.25e-5, 0.0625e-5, 0.015625e-5, 0.00390625e-5], rel=1e-3)


def test_state_dict_names_are_the_published_ones(model):
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == official_shapes(TWIN)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_logits_equal_the_official_code(model):
    with torch.no_grad():
        check_full(model(input_ids=twin_ids(2, 40), use_cache=False).logits)
        check_full(model(input_ids=twin_ids(2, 40)).logits)  # with a (fresh) cache: the same


@pytest.mark.parametrize("chunk", [64, 100, 7])
def test_long_sequence_equals_the_official_code(chunk):
    model = build()
    for layer in model.model.layers:
        layer.token_mixer.chunk_size = chunk
    ref = REFERENCE["long300"]
    with torch.no_grad():
        logits = model(input_ids=twin_ids(1, 300, offset=7), use_cache=False).logits.double()
    torch.testing.assert_close(logits[0, 299, :6], torch.tensor(ref["s0"], dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[0, 257, 40:46], torch.tensor(ref["s1"], dtype=torch.float64), atol=1e-5, rtol=0)
    assert float(logits.sum()) == pytest.approx(ref["sum"], abs=1e-3)
    assert float(logits.pow(2).sum()) == pytest.approx(ref["sumsq"], abs=1e-3)


@pytest.mark.parametrize("chunk", [1, 3, 5, 16, 37, 64])
def test_chunked_form_equals_the_recurrent_form(chunk):
    g = torch.Generator().manual_seed(0)
    b, h, n, dk, dv = 2, 3, 37, 8, 5
    q, k, v = (torch.randn(b, h, n, d, generator=g) for d in (dk, dk, dv))
    slopes = torch.tensor([0.5, 0.05, 1e-5])
    state0 = torch.randn(b, h, dk, dv, generator=g)
    chunked, recurrent = transnormer.chunked_linear_attention, transnormer.recurrent_linear_attention
    for state in (None, state0):
        ref, ref_state = recurrent(q, k, v, slopes, state)
        out, out_state = chunked(q, k, v, slopes, state, chunk_size=chunk, return_state=True)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out_state, ref_state, atol=1e-5, rtol=1e-5)
        out2, none = chunked(q, k, v, slopes, state, chunk_size=chunk)
        assert none is None and torch.equal(out2, out)
    # the quadratic definition, with no state
    i = torch.arange(n)
    decay = torch.exp(-slopes.view(h, 1, 1) * (i[:, None] - i[None, :]).clamp(min=0)) * (i[:, None] >= i[None, :])
    quadratic = ((q @ k.transpose(-1, -2)) * decay) @ v
    torch.testing.assert_close(chunked(q, k, v, slopes, chunk_size=chunk)[0], quadratic, atol=1e-5, rtol=1e-5)


def test_whole_model_in_the_recurrent_form_equals_the_official_code():
    model = build()
    for layer in model.model.layers:
        layer.token_mixer.mode = "recurrent"
    with torch.no_grad():
        check_full(model(input_ids=twin_ids(2, 40)).logits)


def test_decoding_with_the_cache_equals_the_official_decoding(model):
    ids = twin_ids(2, 40)
    with torch.no_grad():
        out = model(input_ids=ids[:, :1], use_cache=True)
        cache = out.past_key_values
        assert isinstance(cache, TransnormerCache) and cache.get_seq_length() == 1
        steps = [out.logits[:, -1]]
        for t in range(1, 40):
            out = model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits[:, -1])
        assert cache.get_seq_length() == 40
        assert [tuple(s.shape) for s in cache.states] == [(2, 4, 32, 16), (2, 4, 16, 16)]  # LRPE doubles d_k
        assert all(s.dtype == torch.float32 for s in cache.states)
        stepped = torch.stack(steps, 1).double()
        ref = REFERENCE["recurrent"]
        torch.testing.assert_close(stepped[0, 39, :6], torch.tensor(ref["s0"], dtype=torch.float64),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(stepped[1, 20, 50:56], torch.tensor(ref["s1"], dtype=torch.float64),
                                   atol=1e-5, rtol=0)
        assert float(stepped.sum()) == pytest.approx(ref["sum"], abs=1e-3)
        full = model(input_ids=ids, use_cache=False).logits.double()
        torch.testing.assert_close(stepped, full, atol=1e-5, rtol=0)

        out = model(input_ids=ids[:, :25], use_cache=True)
        cache, parts = out.past_key_values, [out.logits]
        for t in range(25, 40):
            out = model(input_ids=ids[:, t:t + 1], past_key_values=cache)
            parts.append(out.logits)
        joined = torch.cat(parts, 1).double()
        ref = REFERENCE["prefill_decode"]
        torch.testing.assert_close(joined[0, 30, :6], torch.tensor(ref["s0"], dtype=torch.float64), atol=1e-5, rtol=0)
        torch.testing.assert_close(joined[1, 39, 10:16], torch.tensor(ref["s1"], dtype=torch.float64),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(joined, full, atol=1e-5, rtol=0)
        # a multi-token continuation of a cache (chunked with an incoming state) also equals the full forward
        out = model(input_ids=ids[:, :9], use_cache=True)
        more = model(input_ids=ids[:, 9:], past_key_values=out.past_key_values)
        torch.testing.assert_close(more.logits.double(), full[:, 9:], atol=1e-5, rtol=0)


def test_greedy_generate_with_the_cache_equals_the_official_generate(model):
    prompt = torch.tensor(REFERENCE["greedy_prompt"])
    gen = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10,
                         min_new_tokens=10, do_sample=False, use_cache=True, return_dict_in_generate=True)
    assert gen.sequences[:, 12:].tolist() == REFERENCE["greedy"]
    assert isinstance(gen.past_key_values, TransnormerCache) and gen.past_key_values.get_seq_length() == 21
    assert greedy_by_full_forwards(model, prompt, 10) == REFERENCE["greedy"]


def test_beam_search_reorders_the_cache(model):
    from transformers import DynamicCache

    prompt = torch.tensor(REFERENCE["greedy_prompt"])
    kwargs = dict(max_new_tokens=6, num_beams=3, do_sample=False, eos_token_id=None)
    assert model.generate(input_ids=prompt, **kwargs).tolist() == \
        model.generate(input_ids=prompt, use_cache=False, **kwargs).tolist()
    with pytest.raises(TypeError, match="TransnormerCache"):
        model(input_ids=prompt, past_key_values=DynamicCache())


def test_left_padding_equals_the_rows_alone(model):
    short = twin_ids(2, 20)
    padded = short.clone()
    padded[1, 5:], padded[1, :5] = short[1, :15], 0
    mask = torch.ones_like(padded)
    mask[1, :5] = 0
    with torch.no_grad():
        logits = model(input_ids=padded, attention_mask=mask).logits
        alone = model(input_ids=short[1:, :15]).logits
        first = model(input_ids=short[:1]).logits
    torch.testing.assert_close(logits[1, 5:], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[0], first[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[1, -1, :6], torch.tensor(REFERENCE["leftpad_row1_last"]), atol=1e-5, rtol=0)
    # batch generation pads on the left: each row's greedy tokens are those of the row alone
    prompts = torch.tensor(REFERENCE["greedy_prompt"])
    batch = torch.cat([prompts[:1], torch.cat([torch.zeros(1, 3, dtype=torch.long), prompts[1:, 3:]], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    gen = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert gen[0, 12:].tolist() == REFERENCE["greedy"][0][:6]
    assert gen[1, 12:].tolist() == greedy_by_full_forwards(model, prompts[1:, 3:], 6)[0]


def test_right_padding_in_training_changes_no_real_token():
    model = build().train()
    ids = twin_ids(2, 16)
    padded = torch.cat([ids, torch.zeros(2, 5, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(2, 16, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long)], 1)
    labels = padded.masked_fill(mask == 0, -100)
    out_pad = model(input_ids=padded, attention_mask=mask, labels=labels)
    out = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(out_pad.logits[:, :16], out.logits, atol=1e-5, rtol=0)
    assert out_pad.loss.item() == pytest.approx(out.loss.item(), abs=1e-6)
    # the loss is transformers' causal LM loss: shifted, -100 ignored (and num_items_in_batch accepted)
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 160), ids[:, 1:].reshape(-1))
    assert out.loss.item() == pytest.approx(manual.item(), abs=1e-6)
    summed = model(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(60)).loss  # 30 labels here
    assert summed.item() == pytest.approx(manual.item() / 2, abs=1e-5)


def test_gradients_equal_with_and_without_checkpointing():
    model = build().train()
    ids = twin_ids(2, 24)
    labels = ids.clone()
    labels[:, :5] = -100
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    model.zero_grad()
    model.gradient_checkpointing_enable()
    assert model.model.layers[0].gradient_checkpointing
    loss2 = model(input_ids=ids, labels=labels, use_cache=True).loss
    loss2.backward()
    assert float(loss2.detach()) == pytest.approx(float(loss.detach()), abs=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], atol=1e-6, rtol=1e-5)


def test_inputs_embeds_are_used_as_given(model):
    ids = twin_ids(2, 40)
    embeds = model.get_input_embeddings()(ids) * math.sqrt(64)  # the official code scales only input_ids' lookup
    with torch.no_grad():
        check_full(model(inputs_embeds=embeds).logits)


def test_save_and_auto_from_pretrained_without_remote_code(model, tmp_path):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "chattune_transnormer" and "auto_map" not in config
    assert config["linear_use_lrpe_list"] == [1, 0] and config["decoder_embed_dim"] == 64
    assert AutoConfig.from_pretrained(tmp_path).model_type == "chattune_transnormer"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert isinstance(loaded, TransnormerForCausalLM)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.no_grad():
        check_full(loaded(input_ids=twin_ids(2, 40)).logits)
    base = AutoModel.from_pretrained(tmp_path, dtype=torch.float32)
    assert isinstance(base, transnormer.TransnormerModel)
    torch.testing.assert_close(base.layers[0].token_mixer.lrpe.theta, model.model.layers[0].token_mixer.lrpe.theta)
    transnormer.register()  # idempotent


def test_a_published_folder_loads_through_from_pretrained(tmp_path):
    """The checkpoint as published (names as they are, lm_head.weight included) under a chattune config.json; a
    different lm_head.weight is ignored by the tied model (the embedding wins)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    config_from_published(TWIN).save_pretrained(tmp_path)
    state = published_state()
    state["lm_head.weight"] = torch.zeros_like(state["lm_head.weight"])
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        check_full(loaded(input_ids=twin_ids(2, 40)).logits)
    tied = build()
    tied.load_state_dict(state, strict=True)
    with torch.no_grad():
        check_full(tied(input_ids=twin_ids(2, 40)).logits)


def test_bf16_runs_and_is_close_to_fp32(model):
    low = build().to(torch.bfloat16)
    ids = twin_ids(2, 40)
    with torch.no_grad():
        logits = low(input_ids=ids).logits
        ref = model(input_ids=ids).logits
        assert logits.dtype == torch.bfloat16
        torch.testing.assert_close(logits.float(), ref, atol=0.15, rtol=0)  # the official bf16: within 0.072
        cached = low(input_ids=ids[:, :30], use_cache=True)
        assert cached.past_key_values.states[0].dtype == torch.float32
        step = low(input_ids=ids[:, 30:31], past_key_values=cached.past_key_values).logits
        torch.testing.assert_close(step[:, -1].float(), ref[:, 30], atol=0.15, rtol=0)
    low.train()
    low(input_ids=ids, labels=ids).loss.backward()  # no mixed-dtype errors in the backward either
    gen = low.generate(input_ids=ids[:, :8], max_new_tokens=3, do_sample=False)
    assert gen.shape == (2, 11)
