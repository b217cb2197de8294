"""A bounded soak of the server on 127.0.0.1: a few hundred mixed requests from several clients at once against a
small queue — chat and plain completions, streamed and not, greedy and seeded sampling, three models (the base and
two LoRA adapters sharing it), streams dropped mid-answer, requests dropped while they wait, and bad requests.
Every request is accounted for (answered or cancelled by its client); only the queue's 503 is a 5xx; afterwards no
asyncio task or thread is left behind, the process' RSS is within 10% of what it was after the warm-up, and a
greedy request still gives the answer it gave before. The counts are printed."""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter

import httpx
import psutil
import pytest

from chattune.inference import load_tuned
from chattune.serve.adapters import add_loras, check_loras
from chattune.serve.app import create_app
from serve_helpers import make_adapter, running_server, server_tasks
from tiny import make_tiny_llama

REQUESTS, CLIENTS, TIME_LIMIT = 320, 6, 240
MODELS = ["model", "a", "b"]
KINDS = ["chat", "chat_stream", "completion", "completion_stream", "seeded", "drop_stream", "drop_waiting", "bad"]


def body(kind: str, rng: random.Random) -> tuple[str, dict | bytes]:
    """(path, JSON body or raw bytes) of one request of `kind`."""
    model, words = rng.choice(MODELS), " ".join(rng.choice(["hi", "tell", "me", "more", "x"]) for _ in range(3))
    chat = {"model": model, "messages": [{"role": "user", "content": words}], "max_tokens": rng.randrange(1, 7),
            "temperature": 0}
    if kind in ("chat", "drop_waiting"):
        return "/v1/chat/completions", chat
    if kind in ("chat_stream", "drop_stream"):
        return "/v1/chat/completions", {**chat, "stream": True, "max_tokens": 12 if kind == "drop_stream" else 4}
    if kind.startswith("completion"):
        return "/v1/completions", {"model": model, "prompt": words, "max_tokens": 4, "temperature": 0,
                                   "stream": kind.endswith("stream"), "logprobs": 1}
    if kind == "seeded":
        return "/v1/chat/completions", {**chat, "temperature": 1.0, "seed": rng.randrange(100)}
    bad = [b"{not json", b"\xff\xfe", b"[]", {**chat, "model": "nope"}, {**chat, "temperature": "hot"}]
    return "/v1/chat/completions", rng.choice(bad)


def send(http: httpx.Client, url: str, kind: str, path: str, payload) -> str:
    """One request; its outcome: the status code, or `cancelled` where the client let go of it on purpose."""
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = {"content-type": "application/json"}
    if kind == "drop_waiting":  # gives up before the answer can come: dropped while queued or decoding
        try:
            return str(http.post(url + path, content=content, headers=headers, timeout=0.02).status_code)
        except httpx.TimeoutException:
            return "cancelled"
    if kind in ("chat_stream", "completion_stream", "drop_stream"):
        with http.stream("POST", url + path, content=content, headers=headers) as r:
            if r.status_code != 200:
                return str(r.status_code)
            lines = []
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                if kind == "drop_stream" and len(lines) == 2:
                    return "cancelled"  # the connection closes mid-answer
            assert lines[-1] == "data: [DONE]", lines
            return "200"
    r = http.post(url + path, content=content, headers=headers)
    if r.status_code == 200:
        assert r.json()["choices"] and r.json()["model"] == payload["model"]
    return str(r.status_code)


def settle(worker, server, tasks: list[str], threads: set[str]) -> tuple[list[str], set[str]]:
    """The server's tasks and this process' threads once the worker is idle (a few seconds at most)."""
    deadline = time.time() + 15
    while time.time() < deadline:
        now_tasks, now_threads = server_tasks(server), {t.name for t in threading.enumerate()}
        if not worker.busy.is_set() and worker.waiting == 0 and now_tasks == tasks and now_threads == threads:
            break
        time.sleep(0.2)
    return now_tasks, now_threads


@pytest.mark.slow
def test_soak_with_mixed_requests_and_adapters(tmp_path):
    base = make_tiny_llama(tmp_path / "model", max_position_embeddings=2048)
    loras = check_loras([f"a={make_adapter(base, tmp_path / 'run-a', 1)}",
                         f"b={make_adapter(base, tmp_path / 'run-b', 2)}"])
    tuned = load_tuned(model=str(base), template="chatml", log=lambda m: None)
    models = add_loras("model", tuned, loras, str(base), log=lambda m: None)
    process = psutil.Process()
    rng = random.Random(20261205)
    plan = [(kind, *body(kind, rng)) for kind in (KINDS * REQUESTS)[:REQUESTS]]
    rng.shuffle(plan)
    probe = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0}
    app = create_app(tuned, max_queue=6, max_batch=4, models=models)
    with running_server(app) as (url, server):
        worker = app.state.worker
        assert worker.batching  # the adapters share batches
        with httpx.Client(timeout=60) as http:
            before = http.post(url + "/v1/chat/completions", json=probe).json()["choices"][0]["message"]["content"]
            for kind, path, payload in plan[:40]:  # warm-up: allocator, caches and pools settle before the baseline
                send(http, url, kind, path, payload)
        tasks, threads = settle(worker, server, server_tasks(server), {t.name for t in threading.enumerate()})
        rss_before = process.memory_info().rss
        outcomes: Counter = Counter()
        by_kind: Counter = Counter()
        lock = threading.Lock()
        deadline = time.time() + TIME_LIMIT

        def client(share):
            with httpx.Client(timeout=60) as http:
                for kind, path, payload in share:
                    if time.time() > deadline:
                        return
                    outcome = send(http, url, kind, path, payload)
                    with lock:
                        outcomes[outcome] += 1
                        by_kind[kind, outcome] += 1

        clients = [threading.Thread(target=client, args=(plan[i::CLIENTS],)) for i in range(CLIENTS)]
        for t in clients:
            t.start()
        for t in clients:
            t.join(TIME_LIMIT + 60)
        tasks_after, threads_after = settle(worker, server, tasks, threads)
        rss_after = process.memory_info().rss
        with httpx.Client(timeout=60) as http:
            after = http.post(url + "/v1/chat/completions", json=probe).json()["choices"][0]["message"]["content"]
        print(f"\nserve soak: {sum(outcomes.values())} requests, outcomes {dict(sorted(outcomes.items()))}, largest "
              f"batch {worker.largest_batch}, RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB")
        assert sum(outcomes.values()) == REQUESTS  # every request answered or cancelled by its client
        assert set(outcomes) <= {"200", "400", "404", "503", "cancelled"}, outcomes
        assert outcomes["200"] > REQUESTS // 4 and outcomes["cancelled"] > 0 and outcomes["400"] > 0 \
            and outcomes["404"] > 0
        assert by_kind["drop_stream", "cancelled"] > 0 and by_kind["seeded", "200"] > 0
        assert worker.largest_batch > 1
        assert tasks_after == tasks, (tasks, tasks_after)  # no handler or watcher task left behind
        assert threads_after == threads, (threads, threads_after)
        assert rss_after < rss_before * 1.10
        assert after == before
