"""Continuous batching in `chattune serve` (serve/engine.py): concurrent requests decode together and every answer
is the one the request gets alone; the start-up check refuses what the engine cannot drive exactly."""

from __future__ import annotations

import threading

import httpx
import pytest
import torch

from chattune.inference import load_tuned
from chattune.serve.app import create_app
from chattune.sampling import SamplingSettings
from chattune.serve.engine import Batch, Sampling, batching_is_exact, prefill
from serve_helpers import running
from tiny import make_tiny_llama

# Runs once more per CPU kind (tests/test_cpu_kinds.py): its outcome depends on the precision chattune picks or
# on the CPU's kernels.
pytestmark = pytest.mark.cpu_kind

PROMPTS = ["hi", "tell me a story about a cat", "2+2?", "what is the capital of France? answer briefly", "ok",
           "a much longer question that makes this prompt the longest of the lot by far, padding the others", "x"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("batching") / "model", max_position_embeddings=2048)


def tuned(model_dir):
    return load_tuned(model=str(model_dir), template="chatml", log=lambda m: None)


def ask(url: str, prompt: str, max_tokens: int, **extra) -> dict:
    """One request; greedy unless `extra` says otherwise (the API's default temperature is 1)."""
    r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    body = r.json()
    return {"text": body["choices"][0]["message"]["content"], "reason": body["choices"][0]["finish_reason"],
            "tokens": body["usage"]["completion_tokens"]}


def test_concurrent_answers_equal_one_at_a_time_answers(model_dir):
    requests = [(p, 8 + 5 * i, {}) for i, p in enumerate(PROMPTS)]
    with running(create_app(tuned(model_dir), max_batch=1)) as url:
        alone = [ask(url, p, n, **extra) for p, n, extra in requests]
    app = create_app(tuned(model_dir), max_batch=8)
    with running(app) as url:
        together: dict[int, dict] = {}

        def one(i):
            p, n, extra = requests[i]
            together[i] = ask(url, p, n, **extra)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=120)
        health = httpx.get(url + "/health").json()
    assert app.state.worker.batching is True and health["batching"] is True
    assert health["largest_batch"] >= 2, "the requests never decoded together"
    print(f"\nserve batching: {len(requests)} concurrent requests, largest batch {health['largest_batch']}")
    assert [together[i] for i in range(len(requests))] == alone
    assert {a["reason"] for a in alone} >= {"length"}


def test_stop_strings_end_a_batched_row(model_dir):
    with running(create_app(tuned(model_dir), max_batch=8)) as url:
        full = ask(url, PROMPTS[1], 20)["text"]
        stop = next(c for c in full[3:] if c.isascii() and c.isprintable())  # a character the answer reaches
        results: dict[int, dict] = {}

        def one(i, extra):
            results[i] = ask(url, PROMPTS[1] if i == 0 else PROMPTS[i], 20, **extra)

        threads = [threading.Thread(target=one, args=(0, {"stop": [stop]}))]
        threads += [threading.Thread(target=one, args=(i, {})) for i in (2, 3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=120)
    assert results[0]["text"] == full[:full.index(stop)] and results[0]["reason"] == "stop"


def test_rows_join_and_leave_a_running_batch_exactly(model_dir):
    """The engine's own pieces: a row joins a batch mid-way, another leaves, and every row's logits match its
    lone decoding."""
    model = tuned(model_dir).model
    prompts = [[3, 4, 5, 6, 7, 8], [9, 10], [11, 12, 13]]

    def alone(p, steps):
        logits, cache, mask = prefill(model, [p], 0)
        batch, out = Batch.start(cache, mask), [logits[0]]
        for _ in range(steps):
            out.append(batch.step(model, [int(out[-1].argmax())])[0])
        return torch.stack(out)

    with torch.inference_mode():
        want = [alone(prompts[0], 2), alone(prompts[1], 5), alone(prompts[2], 4)]
        logits, cache, mask = prefill(model, prompts[:2], 0)  # two rows start together
        batch = Batch.start(cache, mask)
        got = [[logits[0]], [logits[1]], []]
        live = [0, 1]
        for step in range(5):
            if step == 1:  # the third joins
                joined, cache3, mask3 = prefill(model, [prompts[2]], 0)
                batch.merge(Batch.start(cache3, mask3))
                got[2].append(joined[0])
                live.append(2)
            if step == 2:  # the first leaves
                batch.keep([1, 2])
                live = [1, 2]
                assert batch.mask.shape[1] == len(prompts[2]) + 1, "padding-only columns are trimmed"
            out = batch.step(model, [int(got[r][-1].argmax()) for r in live])
            for k, r in enumerate(live):
                got[r].append(out[k])
    for g, w in zip(got, want):
        assert torch.allclose(torch.stack(g), w, atol=1e-4)


def test_seeded_sampling_is_repeatable_next_to_other_requests(model_dir):
    with running(create_app(tuned(model_dir), max_batch=8)) as url:
        seeded = dict(temperature=1.0, top_p=0.9, seed=11)
        first = ask(url, "hi", 12, **seeded)
        results: dict[str, dict] = {}

        def one(name, prompt, extra):
            results[name] = ask(url, prompt, 12, **extra)

        threads = [threading.Thread(target=one, args=(f"other{i}", PROMPTS[i], {})) for i in range(3)]
        threads.append(threading.Thread(target=one, args=("seeded", "hi", seeded)))
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=120)
    assert results["seeded"] == first


def test_sampling_follows_temperature_and_top_p():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    assert Sampling().choose(logits, []) == 0  # greedy
    top_half = SamplingSettings(temperature=1.0, top_p=0.5, seed=1)
    assert Sampling(top_half).choose(logits, []) == 0  # top_p 0.5 leaves only the most likely token
    draws = [Sampling(SamplingSettings(1.0, 1.0, seed=s)).choose(logits, []) for s in range(200)]
    assert set(draws) == {0, 1, 2, 3} and draws.count(0) > draws.count(3)
    assert [Sampling(SamplingSettings(1.0, 1.0, seed=s)).choose(logits, []) for s in range(20)] == draws[:20]
    penalised = Sampling(SamplingSettings(repetition_penalty=4.0)).choose(logits, [0])  # 2.0 / 4 = 0.5 < 1.0
    assert penalised == 1
    top2 = [Sampling(SamplingSettings(1.0, 1.0, top_k=2, seed=s)).choose(logits, []) for s in range(100)]
    assert set(top2) == {0, 1}  # top_k 2: only the two most likely tokens


def test_models_the_engine_cannot_drive_run_one_at_a_time(model_dir):
    from peft import PrefixTuningConfig, get_peft_model

    model = tuned(model_dir).model
    assert batching_is_exact(model, 0)
    prefix = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert not batching_is_exact(prefix, 0)

    class Broken(torch.nn.Module):  # a model whose forward does not take a cache
        def forward(self, input_ids, **kwargs):
            raise TypeError("unexpected keyword argument")

        def parameters(self):
            yield torch.zeros(1)

    assert not batching_is_exact(Broken(), 0)
