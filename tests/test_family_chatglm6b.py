"""chattune's own ChatGLM-6B (GLM v1) computes what the publisher's code computes, to 1e-5 in fp32.

How the reference numbers below were produced (once, outside this repository; the publisher's code is not in it):
- Code: `modeling_chatglm.py` + `configuration_chatglm.py` (+ config.json) of THUDM/chatglm-6b as mirrored with its
  Hugging Face history in github.com/greensheng/chatglm-6b, HEAD 8b7d33596d18c5e83e2da052d05ca4db02e60620
  (modeling_chatglm.py blob 4bef958fb33db5f65827ad44b1370656bd8d2f1b, last changed by a8ede826cf1b, "Fix position
  ids in 1d position encoding", 2023-04-27). Run read-only from /tmp in a separate virtualenv with transformers
  4.27.1 and torch 2.13.0 (CPU), as a package (glm1/) so its relative import works. No patches.
- Twin: the published config.json with num_layers 2, hidden_size 64, num_attention_heads 4, inner_hidden_size 256,
  vocab_size 160, mask 150, gmask 151, bos (<sop>) 152, eos (<eop>) 153, pad 3, max_sequence_length 256, every other
  field as published. `ChatGLMForConditionalGeneration(config, empty_init=False).float().eval()`, weights from
  `make_weights` below over the official state_dict names minus the `rotary_emb.inv_freq` buffers (kept at the
  official values: fp16-rounded 1/10000**(arange(0,8,2)/8)), loaded with load_state_dict(strict=True).
- Note: the official ChatGLMModel never passes num_layers to its GLMBlocks, so the residual alpha is sqrt(2 * 28)
  even in the 2-layer twin; chattune's `alpha_num_layers` (default 28) reproduces that.
- "untied": that model as constructed (lm_head separate). "tied": the same after
  `model.lm_head.weight = model.transformer.word_embeddings.weight`, which is what the published loading path does:
  with the twin saved as a folder, 4.27.1's `ChatGLMForConditionalGeneration.from_pretrained` returned an lm_head
  that *is* word_embeddings (equal to its fp16-rounded values, not to the checkpoint's lm_head.weight).
- Logits of `model(input_ids=...)` (the official code computes its positions and mask), printed to 9 significant
  digits; greedy: the official `generate(max_new_tokens=6, do_sample=False)` with its own cache (tuples), equal to
  greedy decoding by repeated full forwards for the untied model; smallest top-1/top-2 margin 0.0022 >> 1e-5.
"""

from __future__ import annotations

import json

import pytest
import torch

from chattune.models.families import chatglm6b
from chattune.models.families.chatglm6b import ChatGLM6BForCausalLM, config_from_published

CHATGLM_6B = {  # THUDM/chatglm-6b config.json as published (auto_map / _name_or_path left out)
    "architectures": ["ChatGLMModel"], "bos_token_id": 130004, "eos_token_id": 130005, "mask_token_id": 130000,
    "gmask_token_id": 130001, "pad_token_id": 3, "hidden_size": 4096, "inner_hidden_size": 16384,
    "layernorm_epsilon": 1e-05, "max_sequence_length": 2048, "model_type": "chatglm", "num_attention_heads": 32,
    "num_layers": 28, "position_encoding_2d": True, "torch_dtype": "float16", "transformers_version": "4.23.1",
    "use_cache": True, "vocab_size": 130528,
}
TWIN = {**CHATGLM_6B, "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "inner_hidden_size": 256,
        "vocab_size": 160, "mask_token_id": 150, "gmask_token_id": 151, "bos_token_id": 152, "eos_token_id": 153,
        "pad_token_id": 3, "max_sequence_length": 256}
INV_FREQ = [1.0, 0.0999755859375, 0.01000213623046875, 0.0010004043579101562]

IDS = [5, 17, 99, 3, 64, 151, 152, 40, 41, 42]  # prompt, [gMASK], <sop>, answer
IDSM = [5, 150, 99, 3, 64, 152, 40, 41]  # [MASK] inside the prompt
REFERENCE = {
    "untied": {
        "gmask": {"last8": [0.617914498, -0.692631125, 0.374733746, -0.262981385, -0.199661136, 0.587498128,
                            0.388355076, 0.619237542],
                  "pos2_100_104": [-0.719282866, -0.187445402, 0.0544965975, 0.219251409],
                  "sum": 28.8328608, "sumsq": 269.873682},
        "mask": {"last8": [-0.152818203, 0.520498693, 0.0807871073, -0.12195345, 0.0683299601, -0.159430861,
                           0.38241294, 0.599059165],
                 "pos2_100_104": [-0.713406563, -0.18929711, 0.0524993986, 0.210989296],
                 "sum": 22.0451409, "sumsq": 214.152908},
        "greedy": {tuple(IDS[:7]): [113, 114, 146, 81, 44, 14], tuple(IDSM[:6]): [113, 114, 146, 81, 44, 14]},
    },
    "tied": {
        "gmask": {"last8": [-0.487138748, 0.835735261, -0.378920823, -0.0475380123, -0.153489485, -0.251408875,
                            0.333279103, -0.939617276],
                  "pos2_100_104": [-0.235252157, -0.0701637194, 0.357821167, -0.965695918],
                  "sum": 27.0863907, "sumsq": 341.83653},
        "mask": {"last8": [0.24673982, -0.259305209, 0.15880242, 0.74067378, 0.464491814, 0.415543705, 0.0358965881,
                           -0.0571605265],
                 "pos2_100_104": [-0.236567065, -0.0725907534, 0.358854055, -0.968411565],
                 "sum": 18.6090614, "sumsq": 276.42466},
        "greedy": {tuple(IDS[:7]): [152, 152, 152, 152, 152, 152]},
    },
}


def official_shapes(c: dict) -> dict:
    """The official state_dict layout (names and shapes it reported for the twin), derived from the config."""
    h, inner, v = c["hidden_size"], c["inner_hidden_size"], c["vocab_size"]
    shapes = {"lm_head.weight": (v, h), "transformer.word_embeddings.weight": (v, h),
              "transformer.final_layernorm.weight": (h,), "transformer.final_layernorm.bias": (h,)}
    for i in range(c["num_layers"]):
        p = f"transformer.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "input_layernorm.bias": (h,),
                       p + "attention.query_key_value.weight": (3 * h, h),
                       p + "attention.query_key_value.bias": (3 * h,),
                       p + "attention.dense.weight": (h, h), p + "attention.dense.bias": (h,),
                       p + "post_attention_layernorm.weight": (h,), p + "post_attention_layernorm.bias": (h,),
                       p + "mlp.dense_h_to_4h.weight": (inner, h), p + "mlp.dense_h_to_4h.bias": (inner,),
                       p + "mlp.dense_4h_to_h.weight": (h, inner), p + "mlp.dense_4h_to_h.bias": (h,)})
    return shapes


def make_weights(shapes: dict) -> dict:
    """One generator seeded 0 walks the sorted names: norms 1 + 0.1 * randn, biases 0.02 * randn, the rest
    0.05 * randn."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for name in sorted(shapes):
        t = torch.randn(shapes[name], generator=g, dtype=torch.float32)
        if name.endswith("layernorm.weight"):
            out[name] = 1 + 0.1 * t
        else:
            out[name] = 0.02 * t if name.endswith(".bias") else 0.05 * t
    return out


def published_state() -> dict:
    """The twin's state dict as the official model saves it (inv_freq buffers included)."""
    state = make_weights(official_shapes(TWIN))
    for i in range(TWIN["num_layers"]):
        state[f"transformer.layers.{i}.attention.rotary_emb.inv_freq"] = torch.tensor(INV_FREQ)
    return state


def build(tied: bool) -> ChatGLM6BForCausalLM:
    config = config_from_published({**TWIN, "tie_word_embeddings": tied} if not tied else TWIN)
    model = ChatGLM6BForCausalLM(config).float().eval()
    result = model.load_state_dict(published_state(), strict=True)  # every published name, none missing
    assert not result.missing_keys and not result.unexpected_keys
    return model


@pytest.fixture(scope="module")
def models():
    return {"untied": build(False), "tied": build(True)}


def check_logits(logits: torch.Tensor, ref: dict):
    torch.testing.assert_close(logits[0, -1, :8], torch.tensor(ref["last8"]), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[0, 2, 100:104], torch.tensor(ref["pos2_100_104"]), atol=1e-5, rtol=0)
    assert float(logits.double().sum()) == pytest.approx(ref["sum"], abs=1e-4)
    assert float(logits.double().pow(2).sum()) == pytest.approx(ref["sumsq"], abs=1e-4)


def greedy_by_full_forwards(model, prompt: list[int], n: int = 6) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
    return seq[len(prompt):]


def test_config_from_the_published_config():
    c = config_from_published(CHATGLM_6B)
    assert c.model_type == "chattune_chatglm6b" and c.architectures == ["ChatGLM6BForCausalLM"]
    assert (c.num_layers, c.num_hidden_layers, c.hidden_size, c.num_attention_heads) == (28, 28, 4096, 32)
    assert (c.inner_hidden_size, c.vocab_size) == (16384, 130528)
    assert (c.max_sequence_length, c.layernorm_epsilon, c.alpha_num_layers) == (2048, 1e-5, 28)
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (130004, 130005, 3)
    assert (c.mask_token_id, c.gmask_token_id) == (130000, 130001)
    assert c.tie_word_embeddings is True and c.dtype == torch.float16
    for field, value in (("position_encoding_2d", False), ("pre_seq_len", 128), ("quantization_bit", 4)):
        with pytest.raises(ValueError, match=field):
            config_from_published({**CHATGLM_6B, field: value})


def test_state_dict_names_are_the_published_ones(models):
    for name, model in models.items():
        names = set(model.state_dict())
        expected = set(official_shapes(TWIN))
        assert names == expected  # (tied: lm_head.weight is the embedding, still listed)
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == official_shapes(TWIN)
    tied = models["tied"]
    assert tied.lm_head.weight is tied.transformer.word_embeddings.weight
    assert torch.equal(tied.lm_head.weight, make_weights(official_shapes(TWIN))["transformer.word_embeddings.weight"])


def test_positions_follow_the_official_get_position_ids():
    c = config_from_published(TWIN)
    pos = chatglm6b.position_ids_from_input_ids(torch.tensor([IDS, IDSM + [42, 42]]), c)
    assert pos[0].tolist() == [[0, 1, 2, 3, 4, 5, 5, 5, 5, 5], [0, 0, 0, 0, 0, 0, 1, 2, 3, 4]]
    assert pos[1].tolist() == [[0, 1, 2, 3, 4, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 2, 3, 4, 5]]
    with pytest.raises(ValueError, match="bos_token_id"):
        chatglm6b.position_ids_from_input_ids(torch.tensor([[5, 151, 7]]), c)
    with pytest.raises(ValueError, match="gMASK"):
        chatglm6b.position_ids_from_input_ids(torch.tensor([[5, 7, 152]]), c)


@pytest.mark.parametrize("kind", ["untied", "tied"])
def test_logits_equal_the_official_code(models, kind):
    with torch.no_grad():
        for case, ids in (("gmask", IDS), ("mask", IDSM)):
            check_logits(models[kind](input_ids=torch.tensor([ids])).logits, REFERENCE[kind][case])


@pytest.mark.parametrize("kind", ["untied", "tied"])
def test_greedy_generate_with_the_cache_equals_the_official_generate(models, kind):
    model = models[kind]
    for prompt, expected in REFERENCE[kind]["greedy"].items():
        ids = torch.tensor([prompt])
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                             do_sample=False, use_cache=True)
        assert gen[0, len(prompt):].tolist() == expected
        assert greedy_by_full_forwards(model, list(prompt)) == expected


def test_left_padded_batch_equals_the_rows_alone(models):
    model = models["untied"]
    ids = torch.tensor([IDS, [3, 3] + IDSM])
    mask = torch.tensor([[1] * 10, [0, 0] + [1] * 8])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=torch.tensor([IDSM])).logits
    check_logits(logits[:1], REFERENCE["untied"]["gmask"])
    torch.testing.assert_close(logits[1, 2:], alone[0], atol=1e-5, rtol=0)
    prompts = torch.tensor([IDS[:7], [3] + IDSM[:6]])
    gen = model.generate(input_ids=prompts, attention_mask=torch.tensor([[1] * 7, [0] + [1] * 6]), max_new_tokens=6,
                         min_new_tokens=6, do_sample=False, use_cache=True)
    assert gen[:, 7:].tolist() == [REFERENCE["untied"]["greedy"][tuple(IDS[:7])],
                                   REFERENCE["untied"]["greedy"][tuple(IDSM[:6])]]


def test_cached_forward_needs_positions(models):
    model = models["untied"]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([IDS[:7]]), use_cache=True)
        with pytest.raises(ValueError, match="position_ids"):
            model(input_ids=torch.tensor([[40]]), past_key_values=out.past_key_values)


def _cache_of(layers):
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)
    return cache


def test_a_ptuning_prefix_is_seen_by_every_token_and_positions_ignore_it(models):
    """With a prefix in the cache (P-tuning v2, as the official code does with pre_seq_len): positions come from the
    input ids alone, the prompt still attends bidirectionally, and every token sees the prefix. A prefix whose
    columns are masked out gives exactly the logits without one; a visible prefix changes every position."""
    model = models["untied"]
    ids = torch.tensor([IDS])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        hidden = model(input_ids=ids, past_key_values=_cache_of([(k, v) for k, v in _layers(model, 3)]),
                       attention_mask=torch.tensor([[0] * 3 + [1] * len(IDS)]), use_cache=False).logits
        seen = model(input_ids=ids, past_key_values=_cache_of(_layers(model, 3)),
                     attention_mask=torch.ones(1, 3 + len(IDS), dtype=torch.long), use_cache=False).logits
    torch.testing.assert_close(hidden, plain, atol=1e-5, rtol=0)
    assert bool(((seen - plain).abs().amax(-1) > 1e-3).all())  # every position, the prompt's first one included


def _layers(model, n: int):
    c = model.config
    g = torch.Generator().manual_seed(7)
    shape = (1, c.num_attention_heads, n, c.hidden_size // c.num_attention_heads)
    return [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(c.num_layers)]


@pytest.mark.parametrize("kind", ["untied", "tied"])
def test_save_and_auto_from_pretrained_without_remote_code(models, kind, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    models[kind].save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "chattune_chatglm6b" and "auto_map" not in config
    assert AutoConfig.from_pretrained(tmp_path).model_type == "chattune_chatglm6b"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert isinstance(loaded, ChatGLM6BForCausalLM)
    with torch.no_grad():
        check_logits(loaded(input_ids=torch.tensor([IDS])).logits, REFERENCE[kind]["gmask"])
    chatglm6b.register()  # idempotent
    assert AutoModelForCausalLM.from_pretrained(tmp_path) is not None


def test_a_published_folder_loads_through_from_pretrained(tmp_path):
    """The checkpoint as published (lm_head.weight and inv_freq buffers included) under a chattune config.json."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    config_from_published(TWIN).save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in published_state().items()}, str(tmp_path / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        check_logits(model(input_ids=torch.tensor([IDS])).logits, REFERENCE["tied"]["gmask"])


def test_gradients_flow_with_and_without_checkpointing():
    model = build(False).train()
    ids = torch.tensor([IDS])
    labels = torch.tensor([[-100] * 7 + IDS[7:]])
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["transformer.layers.0.attention.query_key_value.weight"].abs().sum() > 0
    model.zero_grad()
    model.gradient_checkpointing_enable()
    loss2 = model(input_ids=ids, labels=labels).loss
    loss2.backward()
    assert float(loss2.detach()) == pytest.approx(float(loss.detach()), abs=1e-6)
    torch.testing.assert_close(model.lm_head.weight.grad, grads["lm_head.weight"], atol=1e-6, rtol=0)
