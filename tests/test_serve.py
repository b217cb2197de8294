"""`chattune serve` on 127.0.0.1 with the tiny model: the official openai client (streaming and not, tools),
every error in the OpenAI shape, a bounded burst against a small queue, and a client disconnect."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

from chattune.inference import load_tuned  # noqa: E402
from chattune.serve.app import create_app  # noqa: E402
from serve_helpers import Script, running  # noqa: E402
from tiny import SPECIAL_ID, make_tiny_llama  # noqa: E402

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("serve") / "model", max_position_embeddings=2048)


def tuned(model_dir, template="chatml"):
    return load_tuned(model=str(model_dir), template=template, log=lambda m: None)


def answer_ids(text: str) -> list[int]:
    return list(text.encode()) + [SPECIAL_ID["<|im_end|>"]]


@pytest.fixture(scope="module")
def hello(model_dir):
    t = tuned(model_dir)
    Script(t.model, answer_ids("Hello there!"))
    with running(create_app(t)) as url:
        yield url


def client(url, key="none"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def test_openai_client_non_streaming(hello):
    r = client(hello).chat.completions.create(model="model", messages=[{"role": "user", "content": "hi"}])
    assert r.object == "chat.completion" and r.model == "model"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == "Hello there!"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == len(answer_ids("Hello there!")) and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_openai_client_streaming(hello):
    chunks = list(client(hello).chat.completions.create(
        model="model", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == "Hello there!" and chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_raw_stream_ends_with_done(hello):
    with httpx.stream("POST", hello + "/v1/chat/completions", timeout=30,
                      json={"messages": [{"role": "user", "content": "hi"}], "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_stop_strings_and_length(hello):
    c = client(hello)
    r = c.chat.completions.create(model="model", messages=[{"role": "user", "content": "hi"}], stop=[" there"])
    assert r.choices[0].message.content == "Hello" and r.choices[0].finish_reason == "stop"
    r = c.chat.completions.create(model="model", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert r.choices[0].message.content == "Hel" and r.choices[0].finish_reason == "length"
    chunks = list(c.chat.completions.create(model="model", messages=[{"role": "user", "content": "hi"}],
                                            stop="there", stream=True))
    assert "".join(x.choices[0].delta.content or "" for x in chunks) == "Hello "


def test_sampling_with_a_seed_is_repeatable(model_dir):
    t = tuned(model_dir)
    with running(create_app(t)) as url:
        c = client(url)
        ask = dict(model="model", messages=[{"role": "user", "content": "hi"}], temperature=1.0, top_p=0.9,
                   seed=7, max_tokens=12)
        assert c.chat.completions.create(**ask).choices[0].message.content == \
            c.chat.completions.create(**ask).choices[0].message.content


def test_tools_round_trip(model_dir):
    t = tuned(model_dir)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    Script(t.model, answer_ids(call))
    with running(create_app(t)) as url:
        c = client(url)
        messages = [{"role": "user", "content": "weather in Paris?"}]
        r = c.chat.completions.create(model="model", messages=messages, tools=TOOLS)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and not choice.message.content
        (tc,) = choice.message.tool_calls
        assert tc.type == "function" and tc.function.name == "get_weather"
        assert json.loads(tc.function.arguments) == {"city": "Paris"}
        # the call and its result go back in; the prompt renders them (ChatML tool turns)
        messages += [{"role": "assistant", "content": None, "tool_calls": [tc.model_dump()]},
                     {"role": "tool", "tool_call_id": tc.id, "content": "18 degrees"}]
        chunks = list(c.chat.completions.create(model="model", messages=messages, tools=TOOLS, stream=True))
        calls = [x for x in chunks if x.choices[0].delta.tool_calls]
        assert calls and calls[0].choices[0].delta.tool_calls[0].function.name == "get_weather"
        assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("body,status,fragment", [
    ("{not json", 400, "not valid JSON"),
    ({"messages": []}, 400, "`messages` must be a non-empty list"),
    ({"messages": "hi"}, 400, "`messages` must be a non-empty list"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "unknown role 'wizard'"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "must be a string or a list of text parts"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "`temperature` must be a number"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "`max_tokens` must be between"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "`n`=2 is not supported"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "`stream` must be true or false"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "must end with a user message"),
    ({"messages": [{"role": "user", "content": "x" * 2100}]}, 400, "this model's context is 2048 tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2100}, 400, "exceeds this model's context of 2048"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model 'gpt-4' does not exist"),
])
def test_errors_in_the_openai_shape(hello, body, status, fragment):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(hello + "/v1/chat/completions", content=content, timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == status
    error = r.json()["error"]
    assert fragment in error["message"] and set(error) == {"message", "type", "param", "code"}


def test_api_key(model_dir):
    with running(create_app(tuned(model_dir), api_key="s3cret")) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.get(url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").chat.completions.create(model="model", messages=[{"role": "user", "content": "x"}])
        r = client(url, "s3cret").chat.completions.create(model="model", max_tokens=2,
                                                          messages=[{"role": "user", "content": "x"}])
        assert r.usage.completion_tokens <= 2
        assert httpx.get(url + "/health").status_code == 200  # health needs no key


def test_burst_gets_only_200_and_503_and_the_server_survives(model_dir):
    t = tuned(model_dir)
    Script(t.model, None, delay=0.004)  # real (random) answers, slowed to ~4 ms a token
    with running(create_app(t, max_queue=4)) as url:
        codes, lock = [], threading.Lock()

        def one():
            r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 30})
            with lock:
                codes.append((r.status_code, r.headers.get("retry-after")))

        threads = [threading.Thread(target=one) for _ in range(40)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=120)
        statuses = [c for c, _ in codes]
        print(f"\nserve burst: 40 requests, queue 4: {statuses.count(200)} x 200, {statuses.count(503)} x 503")
        assert len(codes) == 40 and set(statuses) <= {200, 503}
        assert statuses.count(503) > 0 and statuses.count(200) >= 5
        assert all(retry == "1" for c, retry in codes if c == 503)
        r = client(url).chat.completions.create(model="model", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=3)
        assert r.choices[0].finish_reason == "length"


def test_client_disconnect_frees_the_worker(model_dir):
    """A client that leaves mid-stream stops its generation: the worker is free long before the scripted 400
    tokens (20 s) would end.

    The client keeps its line iterator while it waits: a discarded `iter_lines()` generator closes the response
    when it is collected, so the client used to leave at once, and on a busy machine the job could be cancelled
    before the worker ever took it (the worker was then never seen busy: the old flake). Waits are conditions with
    generous deadlines, not speeds."""
    t = tuned(model_dir)
    script = Script(t.model, list(b"a" * 400), delay=0.05)  # 400 tokens at 50 ms: 20 s if nobody stops it
    app = create_app(t)
    worker = app.state.worker
    # The start-up checks (batching, prompt cache) ran the scripted model and left its count at 3, so the count
    # starts again here, and the wait below is for both signs of generation together (the checks' count, seen
    # before the worker took the job, was a flake)
    script.step = 0

    def generating():
        return worker.busy.is_set() and script.step >= 3

    with running(app) as url:
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=60, json={
                "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 400}) as r:
            lines = r.iter_lines()
            assert "assistant" in next(lines)  # the first chunk: the role
            deadline = time.time() + 60
            while not generating() and time.time() < deadline:  # the worker is generating
                time.sleep(0.01)
            assert generating()
        left_at = script.step  # the client leaves here, closing the connection
        deadline = time.time() + 60
        while worker.busy.is_set() and time.time() < deadline:
            time.sleep(0.02)
        assert not worker.busy.is_set() and script.step < 400, \
            f"the generation went on after the client left ({left_at} tokens then, {script.step} now)"


def test_models_health_and_page(hello):
    models = httpx.get(hello + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "model"
    health = httpx.get(hello + "/health").json()
    assert health["status"] == "ok" and health["batching"] and health["decode_step"] == "chattune"
    page = httpx.get(hello + "/")
    assert page.status_code == 200 and "<title>chattune</title>" in page.text and "http" not in page.text.split(
        "<body>")[0].replace("http-equiv", "")  # no CDN: every asset is served by the app itself
    assert httpx.get(hello + "/web/app.js").status_code == 200
    assert httpx.get(hello + "/web/../cli.py").status_code == 404
