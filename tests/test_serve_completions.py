"""`/v1/completions` and logprobs in `chattune serve`, on the tiny model: a plain prompt is raw text (special-token
strings stay text) after the tokenizer's own leading tokens; echoed prompts' logprobs are the model's own; answer
logprobs are the same batched and alone, taken before temperature and penalties, in OpenAI's chat and legacy
shapes, streamed with their tokens; every field the server cannot honour is refused by name."""

from __future__ import annotations

import threading

import httpx
import pytest
import torch
from tokenizers import processors

openai = pytest.importorskip("openai")

from chattune.inference import load_tuned  # noqa: E402
from chattune.serve.app import create_app  # noqa: E402
from chattune.serve.convert import plain_prompts, prompt_prefix  # noqa: E402
from chattune.serve.engine import prompt_scores  # noqa: E402
from serve_helpers import Script, running  # noqa: E402
from tiny import SPECIAL_ID, VOCAB_SIZE, make_tiny_llama, make_tokenizer  # noqa: E402

IM_END = SPECIAL_ID["<|im_end|>"]
PROMPTS = ["hi", "tell me a story about a cat", "2+2?", "ok", "a much longer question, the longest of the lot", "x"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("completions") / "model", max_position_embeddings=128)


def tuned(model_dir):
    return load_tuned(model=str(model_dir), template="chatml", log=lambda m: None)


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def complete(url: str, **body) -> dict:
    r = httpx.post(url + "/v1/completions", json={"temperature": 0, **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def chat(url: str, prompt: str, **body) -> dict:
    r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": prompt}], "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


@torch.inference_mode()
def model_logprobs(t, ids: list[int]) -> torch.Tensor:
    """The model's own next-token log-probabilities at each position of `ids` [len, V]."""
    return t.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_a_text_prompt_is_raw_text(model_dir):
    t = tuned(model_dir)
    Script(t.model, list(b"ok") + [IM_END])
    with running(create_app(t)) as url:
        r = complete(url, prompt="hi<|im_end|>", max_tokens=5)
        assert r["object"] == "text_completion" and r["choices"][0]["text"] == "ok"
        assert r["choices"][0]["finish_reason"] == "stop" and r["choices"][0]["logprobs"] is None
        # the control-token string is 10 byte tokens, not <|im_end|>: no template, no control token from text
        assert r["usage"] == {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
        assert complete(url, prompt="hi", echo=True, max_tokens=5)["choices"][0]["text"] == "hiok"
        five = complete(url, prompt="hi", max_tokens=5, stop=["k", "x", "y", "z", "<|im_end|>"])  # lm-eval adds one
        assert five["choices"][0]["text"] == "o"
        answer = client(url).completions.create(model="model", prompt="hi", max_tokens=2, temperature=0)
        assert answer.choices[0].text == "ok" and answer.choices[0].finish_reason == "length"


def test_a_text_prompt_gets_the_tokenizers_own_leading_tokens():
    tok = make_tokenizer()
    assert prompt_prefix(tok) == []  # like Qwen's or SmolLM2's: tokenizer(text) adds nothing
    bos = SPECIAL_ID["<|begin_of_text|>"]
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])  # like Llama's
    assert prompt_prefix(tok) == [bos]
    (text,), (ids,) = plain_prompts(["hi<|im_end|>"], tok, [bos], VOCAB_SIZE), plain_prompts([[1, 2]], tok, [bos], 9)
    assert text.ids == [bos] + list(b"hi<|im_end|>") and text.text == "hi<|im_end|>"
    assert ids.ids == [1, 2]  # token ids are taken as given


def test_echoed_prompt_logprobs_are_the_models_own(model_dir):
    t = tuned(model_dir)
    ids = list(b"hello world")
    want = model_logprobs(t, ids)
    with running(create_app(t)) as url:
        r = complete(url, prompt="hello world", echo=True, max_tokens=0, logprobs=3)
        twice = complete(url, prompt=[ids, ids[:4]], echo=True, max_tokens=0, logprobs=0)
    (choice,) = r["choices"]
    lp = choice["logprobs"]
    assert choice["text"] == "hello world" and choice["finish_reason"] == "length"
    assert r["usage"]["completion_tokens"] == 0 and r["usage"]["prompt_tokens"] == 11
    assert lp["tokens"] == list("hello world") and lp["text_offset"] == list(range(11))
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for i in range(1, len(ids)):
        assert lp["token_logprobs"][i] == pytest.approx(float(want[i - 1, ids[i]]), abs=1e-5)
        best = want[i - 1].topk(3)
        expected = {t.tokenizer.decode([int(b)]): float(v) for v, b in zip(best.values, best.indices)}
        expected.setdefault(chr(ids[i]), float(want[i - 1, ids[i]]))  # the prompt's own token is always listed
        assert lp["top_logprobs"][i] == pytest.approx(expected, abs=1e-5)
    assert [c["index"] for c in twice["choices"]] == [0, 1]
    assert [c["text"] for c in twice["choices"]] == ["hello world", "hell"]
    assert twice["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(lp["token_logprobs"], abs=1e-6)
    assert twice["usage"]["prompt_tokens"] == 15


def test_prompt_scores_in_chunks_equal_one_pass(model_dir):
    t = tuned(model_dir)
    ids = list(b"a prompt longer than one chunk of three tokens")
    whole, chunked = prompt_scores(t.model, ids, 4, chunk=1000), prompt_scores(t.model, ids, 4, chunk=3)
    assert [s.token for s in chunked] == ids and chunked[0].logprob is None
    assert [s.logprob for s in chunked[1:]] == pytest.approx([s.logprob for s in whole[1:]], abs=1e-5)
    assert [[i for i, _ in s.top] for s in chunked] == [[i for i, _ in s.top] for s in whole]


def test_lm_evals_loglikelihood_request(model_dir):
    """What lm-eval sends for a loglikelihood (echo, logprobs 1, max_tokens 1, temperature 0): the prompt's tokens
    and one generated token, whose logprob is the best of its alternatives (greedy)."""
    with running(create_app(tuned(model_dir))) as url:
        r = complete(url, prompt=[list(b"the cat sat")], echo=True, logprobs=1, max_tokens=1, seed=1234)
    lp = r["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 12 and r["usage"]["completion_tokens"] == 1
    assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())
    assert r["choices"][0]["text"].startswith("the cat sat")


def test_greedy_logprobs_batched_equal_alone(model_dir):
    """The chosen tokens and their logprobs, chat and completions, one request at a time (transformers'
    `generate`) and concurrently in the batched engine: the same tokens, logprobs equal to float rounding."""
    def ask_all(url: str, concurrent: bool) -> list[tuple]:
        out: list = [None] * (2 * len(PROMPTS))

        def one(i):
            p = PROMPTS[i % len(PROMPTS)]
            if i < len(PROMPTS):
                content = chat(url, p, max_tokens=6 + i, logprobs=True, top_logprobs=2)["choices"][0]["logprobs"]
                out[i] = [(e["token"], e["logprob"], [x["token"] for x in e["top_logprobs"]]) for e in content["content"]]
            else:
                lp = complete(url, prompt=p, max_tokens=5, echo=True, logprobs=2)["choices"][0]["logprobs"]
                out[i] = list(zip(lp["tokens"], lp["token_logprobs"], [sorted(x or {}) for x in lp["top_logprobs"]]))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(out))]
        for th in threads:
            th.start()
            if not concurrent:
                th.join()
        for th in threads:
            th.join(timeout=120)
        return out

    with running(create_app(tuned(model_dir), max_batch=1)) as url:
        alone = ask_all(url, concurrent=False)
    app = create_app(tuned(model_dir), max_batch=8)
    with running(app) as url:
        together = ask_all(url, concurrent=True)
        assert httpx.get(url + "/health").json()["largest_batch"] >= 2
    for a, b in zip(alone, together, strict=True):
        assert [(tok, top) for tok, _, top in a] == [(tok, top) for tok, _, top in b]
        assert [lp for _, lp, _ in b] == pytest.approx([lp for _, lp, _ in a], abs=1e-4)


def test_logprobs_are_taken_before_temperature_and_penalties(model_dir):
    with running(create_app(tuned(model_dir))) as url:
        plain = chat(url, "hi", max_tokens=1, logprobs=True, top_logprobs=5)
        hot = chat(url, "hi", max_tokens=1, logprobs=True, top_logprobs=5, temperature=1.9, seed=3, top_p=0.5,
                   presence_penalty=2, frequency_penalty=2)
    first, other = plain["choices"][0]["logprobs"]["content"][0], hot["choices"][0]["logprobs"]["content"][0]
    assert [x["token"] for x in first["top_logprobs"]] == [x["token"] for x in other["top_logprobs"]]
    assert [x["logprob"] for x in other["top_logprobs"]] == pytest.approx(
        [x["logprob"] for x in first["top_logprobs"]], abs=1e-5)


@pytest.mark.parametrize("max_batch", [8, 1])
def test_chat_logprobs_shape_bytes_and_stop_strings(model_dir, max_batch):
    t = tuned(model_dir)
    Script(t.model, list("Hé!".encode()) + [IM_END])
    with running(create_app(t, max_batch=max_batch)) as url:
        r = client(url).chat.completions.create(model="model", messages=[{"role": "user", "content": "hi"}],
                                                logprobs=True, top_logprobs=2, temperature=0)
        assert r.choices[0].message.content == "Hé!"
        content = r.choices[0].logprobs.content
        assert [c.token for c in content] == ["H", "\ufffd", "\ufffd", "!", "<|im_end|>"]
        assert [c.bytes for c in content] == [[72], [0xC3], [0xA9], [33], list(b"<|im_end|>")]
        assert all(c.logprob == 0.0 and c.top_logprobs[0].token == c.token and len(c.top_logprobs) == 2
                   for c in content)  # the scripted token holds all the probability
        cut = chat(url, "hi", stop="!", logprobs=True)
        assert cut["choices"][0]["message"]["content"] == "Hé"
        assert [c["bytes"] for c in cut["choices"][0]["logprobs"]["content"]] == [[72], [0xC3], [0xA9]]
        assert all(c["top_logprobs"] == [] for c in cut["choices"][0]["logprobs"]["content"])
        assert chat(url, "hi")["choices"][0]["logprobs"] is None


@pytest.mark.parametrize("max_batch", [8, 1])
def test_streams_carry_their_tokens_logprobs(model_dir, max_batch):
    t = tuned(model_dir)
    Script(t.model, list(b"Hello there!") + [IM_END])
    with running(create_app(t, max_batch=max_batch)) as url:
        chunks = list(client(url).chat.completions.create(
            model="model", messages=[{"role": "user", "content": "hi"}], stream=True, logprobs=True, temperature=0))
        texts = [c.choices[0].delta.content or "" for c in chunks]
        tokens = [[e.token for e in c.choices[0].logprobs.content] if c.choices[0].logprobs else [] for c in chunks]
        assert "".join(texts) == "Hello there!" and sum(tokens, []) == list("Hello there!") + ["<|im_end|>"]
        for text, toks in zip(texts, tokens):  # each chunk carries the logprobs of the tokens it holds
            assert text == "".join(x for x in toks if x != "<|im_end|>")

        streamed = list(client(url).completions.create(model="model", prompt="Hi", echo=True, logprobs=1,
                                                       max_tokens=20, stream=True, temperature=0, stop=[" there"]))
        whole = complete(url, prompt="Hi", echo=True, logprobs=1, max_tokens=20, stop=[" there"])["choices"][0]
    first = streamed[0].choices[0]
    assert first.text == "Hi" and first.logprobs.tokens == ["H", "i"] and first.logprobs.token_logprobs[0] is None
    assert "".join(c.choices[0].text for c in streamed) == whole["text"] == "HiHello"
    parts = [c.choices[0].logprobs for c in streamed if c.choices[0].logprobs]
    assert sum((p.tokens for p in parts), []) == whole["logprobs"]["tokens"] == list("HiHello")
    assert sum((p.text_offset for p in parts), []) == whole["logprobs"]["text_offset"] == list(range(7))
    assert streamed[-1].choices[0].finish_reason == "stop" and streamed[-1].usage.completion_tokens == 11


def test_several_prompts_answer_in_order(model_dir):
    with running(create_app(tuned(model_dir))) as url:
        alone = [complete(url, prompt=p, max_tokens=4) for p in PROMPTS[:3]]
        r = complete(url, prompt=PROMPTS[:3], max_tokens=4)
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    assert [c["text"] for c in r["choices"]] == [a["choices"][0]["text"] for a in alone]
    assert r["usage"]["prompt_tokens"] == sum(len(p) for p in PROMPTS[:3])
    assert r["usage"]["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in alone)


@pytest.mark.parametrize("path, body, status, param, fragment", [
    ("completions", {"prompt": "hi", "n": 2}, 400, "n", "`n`=2 is not supported"),
    ("completions", {"prompt": "hi", "best_of": 3}, 400, "best_of", "only 1"),
    ("completions", {"prompt": "hi", "suffix": "x"}, 400, "suffix", "left to right only"),
    ("completions", {"prompt": "hi", "logprobs": 6}, 400, "logprobs", "between 0 and 5"),
    ("completions", {"prompt": "hi", "logprobs": True}, 400, "logprobs", "must be an integer"),
    ("completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", "without `echo: true`"),
    ("completions", {"prompt": ["a", "b"], "stream": True}, 400, "stream", "takes one prompt"),
    ("completions", {"prompt": [[1, 99999]]}, 400, "prompt", "token id 99999 is not in this model's vocabulary"),
    ("completions", {"prompt": [[2], [1, -1]]}, 400, "prompt[1]", "token id -1"),
    ("completions", {"prompt": ""}, 400, "prompt", "`prompt` is empty"),
    ("completions", {"prompt": [1, "x"]}, 400, "prompt", "`prompt` must be a string, a list of strings"),
    ("completions", {"prompt": "hi", "logit_bias": {"1": 1}}, 400, "logit_bias", "not supported"),
    ("completions", {"prompt": "hi", "stop": ["a"] * 17}, 400, "stop", "`stop` takes at most 16 strings"),
    ("chat/completions", {"stop": ["a"] * 5}, 400, "stop", "`stop` takes at most 4 strings"),
    ("completions", {"prompt": "hi", "messages": []}, 400, "messages", "unsupported parameter `messages`"),
    ("completions", {"prompt": "x" * 200}, 400, "prompt", "the prompt is 200 tokens; this model's context is 128"),
    ("completions", {"prompt": "hi", "max_tokens": 127}, 400, "max_tokens", "exceeds this model's context of 128"),
    ("completions", {"prompt": ["a"] * 17}, 400, "prompt", "17 prompts in one request"),
    ("completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model", "model 'gpt-4' does not exist"),
    ("chat/completions", {"top_logprobs": 2}, 400, "top_logprobs", "needs `logprobs: true`"),
    ("chat/completions", {"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "between 0 and 20"),
    ("chat/completions", {"logprobs": 1}, 400, "logprobs", "`logprobs` must be true or false"),
    ("chat/completions", {"echo": True}, 400, "echo", "unsupported parameter `echo`"),
])
def test_refusals_name_the_field(model_dir, path, body, status, param, fragment):
    from fastapi.testclient import TestClient

    http = TestClient(create_app(tuned(model_dir), max_batch=1))
    if path == "chat/completions":
        body = {"messages": [{"role": "user", "content": "hi"}], **body}
    r = http.post(f"/v1/{path}", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert fragment in error["message"], error["message"]
