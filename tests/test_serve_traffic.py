"""`chattune serve` under real traffic: one request's failure is that request's alone, every queued request gets an
answer, the queue's bound covers every waiting request, and no request field is silently ignored."""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time

import httpx
import pytest

from chattune.inference import load_tuned
from chattune.sampling import SamplingSettings
from chattune.serve.app import create_app
from chattune.serve.worker import Job, Worker
from serve_helpers import running
from tiny import make_tiny_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("traffic") / "model", max_position_embeddings=2048)


def tuned(model_dir):
    return load_tuned(model=str(model_dir), template="chatml", log=lambda m: None)


def post(url: str, prompt: str, **extra) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": prompt}], "max_tokens": 6, **extra})


def concurrently(url: str, requests: list[tuple[str, dict]]) -> list[httpx.Response]:
    out: list[httpx.Response | None] = [None] * len(requests)

    def one(i):
        out[i] = post(url, requests[i][0], **requests[i][1])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    return out


def test_top_p_zero_and_tiny_temperatures_do_not_fail_the_batch(model_dir):
    """The issue's case: three greedy requests and one with temperature 1, top_p 0 (valid in OpenAI's API) all got
    HTTP 500 (`invalid multinomial distribution`); a temperature of 1e-39 too."""
    with running(create_app(tuned(model_dir), max_batch=8)) as url:
        replies = concurrently(url, [("hi", {"temperature": 0}), ("2+2?", {"temperature": 0}),
                                     ("ok", {"temperature": 0}), ("x", {"temperature": 1, "top_p": 0}),
                                     ("y", {"temperature": 1e-39})])
    assert [r.status_code for r in replies] == [200] * 5, [r.text for r in replies]


def test_one_rows_failure_is_that_requests_alone(model_dir, monkeypatch):
    """A row whose sampling raises gets a 500; the requests decoding beside it get their answers."""
    import chattune.serve.worker as worker

    real_take = worker._Row.take

    def take(self, logits):
        if self.job.max_new_tokens == 5:
            raise RuntimeError("this row breaks")
        return real_take(self, logits)

    monkeypatch.setattr(worker._Row, "take", take)
    with running(create_app(tuned(model_dir), max_batch=8)) as url:
        replies = concurrently(url, [("hi", {"temperature": 0}), ("2+2?", {"temperature": 0, "max_tokens": 5}),
                                     ("ok", {"temperature": 0})])
    assert [r.status_code for r in replies] == [200, 500, 200], [r.text for r in replies]
    assert "this row breaks" in replies[1].text


def test_a_prompt_that_cannot_be_prefilled_fails_alone(model_dir, monkeypatch):
    """When prefilling newcomers together fails (e.g. out of memory on one long prompt), each is prefilled on its
    own: only the one that fails gets the error."""
    import chattune.serve.worker as worker

    real = worker.prefill

    def prefill(model, prompts, pad_id):
        if any(len(p) > 40 for p in prompts):
            raise RuntimeError("out of memory (simulated)")
        return real(model, prompts, pad_id)

    monkeypatch.setattr(worker, "prefill", prefill)
    app = create_app(tuned(model_dir), max_batch=8)
    assert app.state.worker.batching
    long = "a much longer question that makes this prompt far longer than forty tokens, padding it " * 2
    with running(app) as url:
        replies = concurrently(url, [("hi", {"temperature": 0}), (long, {"temperature": 0}), ("ok", {"temperature": 0})])
    codes = [r.status_code for r in replies]
    assert codes[1] == 500 and "out of memory" in replies[1].text
    assert codes[0] == 200 and codes[2] == 200


def _job(prompt_ids, loop, seed=None, **kw) -> Job:
    sampling = SamplingSettings(temperature=1.0 if seed is not None else 0.0, seed=seed)
    return Job(prompt_ids, kw.get("max_new_tokens", 4), sampling, [], loop)


def test_a_job_cancelled_while_queued_is_answered(model_dir):
    """A non-streaming request that goes away while queued: the worker skips the job and still answers it, so the
    request's handler returns instead of waiting forever."""
    loop = asyncio.new_event_loop()
    try:
        w = Worker(tuned(model_dir), max_queue=4, max_batch=1)
        job = _job([1, 2, 3], loop)
        job.cancel.set()
        w.submit(job)

        async def first_event():
            return await asyncio.wait_for(job.events.get(), timeout=30)

        kind, value = loop.run_until_complete(first_event())
        assert kind == "done" and value["cancelled"] and value["completion_tokens"] == 0
    finally:
        loop.close()


def test_the_queue_bound_counts_deferred_seeded_jobs(model_dir):
    loop = asyncio.new_event_loop()
    try:
        w = Worker(tuned(model_dir), max_queue=2, max_batch=8)
        w.busy.set()  # hold nothing: the worker thread is blocked on an empty queue; fill the deferred list by hand
        w.deferred.append(_job([1, 2], loop, seed=1))
        w.deferred.append(_job([1, 2], loop, seed=2))
        with pytest.raises(queue.Full):
            w.submit(_job([1, 2], loop))
        w.deferred.clear()
    finally:
        loop.close()
    with pytest.raises(ValueError, match="at least 1"):
        Worker(tuned(model_dir), max_queue=0)


def test_a_seeded_request_is_not_starved_by_steady_traffic(model_dir):
    """A seeded request waits only for the running batch to drain: new requests do not join while it waits."""
    with running(create_app(tuned(model_dir), max_batch=4)) as url:
        done: dict[str, float] = {}
        stop = threading.Event()

        def steady(i):
            while not stop.is_set():
                post(url, f"steady {i}", temperature=0, max_tokens=8)

        workers = [threading.Thread(target=steady, args=(i,), daemon=True) for i in range(3)]
        for th in workers:
            th.start()
        time.sleep(0.5)
        start = time.time()
        r = post(url, "seeded", temperature=1, seed=7)
        done["seeded"] = time.time() - start
        stop.set()
        for th in workers:
            th.join(timeout=60)
    assert r.status_code == 200 and done["seeded"] < 60


@pytest.mark.parametrize("extra, param", [({"tool_choice": "required"}, "tool_choice"),
                                          ({"presence_penalty": 2.5}, "presence_penalty"),
                                          ({"frequency_penalty": -3}, "frequency_penalty"),
                                          ({"min_p": 1.5}, "min_p"),
                                          ({"response_format": {"type": "json_object"}}, "response_format"),
                                          ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                                          ({"logit_bias": {"5": 10}}, "logit_bias"),
                                          ({"best_of": 2}, "best_of")])
def test_parameters_it_cannot_honour_are_refused_by_name(model_dir, extra, param):
    from fastapi.testclient import TestClient

    client = TestClient(create_app(tuned(model_dir), max_batch=1))
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_neutral_values_penalties_and_tool_choice_none_work(model_dir):
    from fastapi.testclient import TestClient

    client = TestClient(create_app(tuned(model_dir), max_batch=1))
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    r = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "presence_penalty": 0.5,
        "frequency_penalty": 0.25, "min_p": 0.05, "temperature": 0.7, "logprobs": False, "response_format": {"type": "text"}, "tool_choice": "none",
        "tools": tools, "user": "someone", "stream_options": {"include_usage": True}})
    assert r.status_code == 200, r.text


def test_bodies_must_be_json_and_bounded(model_dir):
    from fastapi.testclient import TestClient

    from chattune.serve.app import MAX_BODY

    client = TestClient(create_app(tuned(model_dir), max_batch=1))
    ok = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = client.post("/v1/chat/completions", content=json.dumps(ok), headers={"content-type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    huge = json.dumps({"messages": [{"role": "user", "content": "x" * (MAX_BODY + 10)}]})
    r = client.post("/v1/chat/completions", content=huge, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = client.post("/v1/chat/completions", json=ok, headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200, r.text


def test_other_sites_and_other_host_names_are_refused_without_a_key(model_dir):
    """Without an API key, a web page from another site cannot call the local server (Origin), and a server bound
    to 127.0.0.1 answers only requests for a loopback name (Host: DNS rebinding). With a key, auth decides."""
    from fastapi.testclient import TestClient

    ok = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    client = TestClient(create_app(tuned(model_dir), max_batch=1, bind_host="127.0.0.1"),
                        base_url="http://127.0.0.1:8000")
    assert client.post("/v1/chat/completions", json=ok).status_code == 200
    assert client.post("/v1/chat/completions", json=ok, headers={"origin": "http://127.0.0.1:8000"}).status_code == 200
    r = client.post("/v1/chat/completions", json=ok, headers={"origin": "https://evil.example"})
    assert r.status_code == 403 and "evil.example" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json=ok, headers={"host": "evil.example:8000"})
    assert r.status_code == 403 and "DNS rebinding" in r.json()["error"]["message"]
    assert client.get("/health", headers={"host": "localhost:8000"}).status_code == 200
    keyed = TestClient(create_app(tuned(model_dir), max_batch=1, api_key="k", bind_host="127.0.0.1"))
    r = keyed.post("/v1/chat/completions", json=ok, headers={"origin": "https://evil.example",
                                                              "authorization": "Bearer k"})
    assert r.status_code == 200, r.text


def test_penalties_apply_on_the_batched_path_too(model_dir):
    """Batched and one at a time give the same greedy answer with a presence/frequency penalty."""
    extra = {"temperature": 0, "presence_penalty": 1.5, "frequency_penalty": 0.5, "max_tokens": 10}
    with running(create_app(tuned(model_dir), max_batch=1)) as url:
        alone = post(url, "tell me a story", **extra).json()["choices"][0]["message"]["content"]
        plain = post(url, "tell me a story", temperature=0, max_tokens=10).json()["choices"][0]["message"]["content"]
    with running(create_app(tuned(model_dir), max_batch=8)) as url:
        batched = concurrently(url, [("tell me a story", extra), ("hi", {"temperature": 0})])
    assert batched[0].status_code == 200 and batched[0].json()["choices"][0]["message"]["content"] == alone
    assert alone != plain  # the penalties changed the answer
