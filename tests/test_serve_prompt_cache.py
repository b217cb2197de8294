"""The serve engine's prompt cache (serve/prompt_cache.py): a prompt that starts with a finished request's tokens
prefills only the rest, with the answers a full prefill gives."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
import torch

from chattune.inference import load_tuned
from chattune.models.decode_step import DecodeStep
from chattune.serve.app import create_app
from chattune.serve.engine import Batch, _forward, prefill
from chattune.serve.prompt_cache import MIN_PREFIX, Entry, PromptCache, prefill_after, reuse_is_exact, row_cache
from serve_helpers import running
from tiny import make_tiny_llama

pytestmark = pytest.mark.cpu_kind


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("prompt_cache") / "model", max_position_embeddings=2048)


def tuned(model_dir):
    return load_tuned(model=str(model_dir), template="chatml", log=lambda m: None)


def chat(url: str, messages: list[dict], max_tokens: int = 12, **extra) -> dict:
    r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
        "messages": messages, "max_tokens": max_tokens, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def entry(tokens: list[int], width: int = 2) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor]]:
    kv = [torch.zeros(1, 1, len(tokens), width)]
    return tokens, kv, [t.clone() for t in kv]


def test_the_longest_shared_prefix_is_found_and_the_budget_kept():
    cache = PromptCache(budget=10_000)
    cache.put(None, *entry(list(range(20))))
    cache.put(None, *entry(list(range(10)) + [99] * 10))
    cache.put("other", *entry(list(range(30))))
    assert cache.find(None, list(range(5)) + [7] * 10) is None  # 5 shared tokens: below MIN_PREFIX
    got = cache.find(None, list(range(15)) + [1, 2])
    assert got is not None and got[1] == 15 and got[0].tokens == list(range(20))
    got = cache.find(None, list(range(20)))  # the whole entry: all but the prompt's last token are reused
    assert got[1] == 19
    assert cache.find("other", list(range(25)))[1] == 24  # entries are per served model
    assert cache.find("third", list(range(25))) is None
    assert (cache.hits, cache.reused_tokens) == (3, 15 + 19 + 24)
    # An entry that extends another replaces it; past the budget the least recently used goes first.
    cache.put(None, *entry(list(range(25))))
    assert [k[1][:3] for k in cache.entries] == [(0, 1, 2)] * 3 and len(cache.entries) == 3
    assert (None, tuple(range(20))) not in cache.entries
    small = PromptCache(budget=3 * 4 * 2 * 2 * 20)  # room for three entries of 20 tokens
    for first in range(4):
        small.put(None, *entry([first] * 20))
    assert [k[1][0] for k in small.entries] == [1, 2, 3] and small.size == sum(e.nbytes for e in small.entries.values())
    assert not PromptCache(0) and PromptCache(0).find(None, list(range(20))) is None


def test_a_prefill_after_a_reused_prefix_gives_the_full_prefills_logits(model_dir):
    model = tuned(model_dir).model
    prompt = [(5 * i + 3) % 200 + 1 for i in range(40)]
    with torch.inference_mode():
        want, cache, mask = prefill(model, [prompt], 0)
        keys, values = row_cache(cache, 0, len(prompt))
        step = DecodeStep(model)
        # one forward for the rest, or (a rest of at most STEP_TOKENS) a token at a time through the decode step
        for reuse, decode in ((MIN_PREFIX, None), (25, None), (39, None), (39, step), (37, step), (20, step)):
            got, got_cache, got_mask = prefill_after(model, Entry(prompt, keys, values), reuse, prompt, _forward,
                                                     decode)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            assert got_mask.tolist() == mask.tolist() and got_cache.get_seq_length() == 40
            # and decoding on from it matches decoding on from the full prefill
            a, b = Batch.start(cache, mask), Batch.start(got_cache, got_mask)
            torch.testing.assert_close(b.step(model, [7]), a.step(model, [7]), atol=1e-5, rtol=0)
            want, cache, mask = prefill(model, [prompt], 0)
        assert reuse_is_exact(model, 0, _forward) and reuse_is_exact(model, 0, _forward, step)


def test_a_repeated_prompt_and_the_next_turn_reuse_the_cache_with_the_same_answers(model_dir):
    turn1 = [{"role": "user", "content": "tell me about cats and why they sleep so much"}]
    with running(create_app(tuned(model_dir), prompt_cache_mb=0)) as url:
        plain = [chat(url, turn1)]
        turn2 = turn1 + [{"role": "assistant", "content": plain[0]["choices"][0]["message"]["content"]},
                         {"role": "user", "content": "and dogs?"}]
        plain += [chat(url, turn1), chat(url, turn2)]
        assert httpx.get(url + "/health").json()["prompt_cache"] == {"enabled": False, "why": "--prompt-cache 0"}
    app = create_app(tuned(model_dir))
    with running(app) as url:
        cached = [chat(url, turn1), chat(url, turn1), chat(url, turn2)]
        health = httpx.get(url + "/health").json()["prompt_cache"]
        seeded = chat(url, turn1, temperature=1.0, seed=3)  # a seeded request never reuses a prefix
        after = httpx.get(url + "/health").json()["prompt_cache"]
    assert [c["choices"][0]["message"]["content"] for c in cached] == \
        [p["choices"][0]["message"]["content"] for p in plain]
    assert [c["usage"] for c in cached] == [p["usage"] for p in plain]
    prompt1 = cached[0]["usage"]["prompt_tokens"]
    assert health["enabled"] is True and health["budget_mb"] == 256
    assert health["hits"] == 2 and health["reused_tokens"] >= (prompt1 - 1) + prompt1
    assert after["hits"] == 2 and seeded["choices"][0]["message"]["content"]


def test_the_option_is_checked():
    r = subprocess.run([sys.executable, "-m", "chattune", "serve", "--prompt-cache", "-1"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "--prompt-cache: -1 is not allowed: give 0 (off) or more" in r.stderr
