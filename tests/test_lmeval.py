"""lm-evaluation-harness against `chattune serve` on the bundled model: its `local-completions` model (loglikelihood
through /v1/completions with echo and logprobs; greedy generation through /v1/completions) and its
`local-chat-completions` model (generation through /v1/chat/completions) run small local tasks
(tests/fixtures/lmeval: YAML tasks over JSON-lines files, nothing downloaded), and what lm-eval reports equals what
the test computes with transformers itself on the same model: each choice's loglikelihood, the accuracy, each
generated answer.

The server is the real command line (`python -m chattune serve`, fp32, its defaults otherwise: the packed 4-bit
blocks, chattune's decode step, continuous batching); the reference is transformers' forward and `generate` on the
fp32 weights. They differ by float rounding only, so the test first checks that its own questions are not near ties
(a margin of 1e-2 between the best and the second choice or token), then compares exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

pytest.importorskip("lm_eval")  # the [test] extra installs lm-eval

from chattune.data.formats import Conversation, Message  # noqa: E402
from chattune.inference import load_tuned  # noqa: E402
from chattune.sampling import sampling_settings  # noqa: E402
from serve_helpers import free_port  # noqa: E402

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).parent / "fixtures" / "lmeval"
NAME = "SmolLM2-135M-Instruct"  # the id /v1/models gives the bundled model (its folder's name)
MARGIN = 1e-2


@pytest.fixture(scope="module")
def bundled():
    from chattune.models.bundled import ensure_bundled_model

    return ensure_bundled_model(log=lambda m: None)


@pytest.fixture(scope="module")
def server(bundled, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "chattune", "serve", "--port", str(port),
                                 "train.precision=fp32"], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            pytest.fail(f"chattune serve did not start: {log.read_text()[-2000:]}")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def reference(bundled):
    return load_tuned(model=str(bundled), log=lambda m: None)  # fp32, transformers' own forward


def lm_eval(model: str, model_args: str, tasks: str, out: Path, *extra: str) -> tuple[dict, dict[str, list]]:
    """Run the lm_eval command line offline; its results and its logged samples per task."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(out / "datasets")}
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", model, "--model_args", model_args, "--tasks", tasks,
           "--include_path", str(FIXTURES), "--output_path", str(out / "results"), "--log_samples", *extra]
    done = subprocess.run(cmd, cwd=FIXTURES, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (results_file,) = (out / "results").rglob("results_*.json")
    samples = {}
    for path in (out / "results").rglob("samples_*.jsonl"):
        task = path.name.removeprefix("samples_").rsplit("_", 1)[0]
        samples[task] = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])
    return json.loads(results_file.read_text())["results"], samples


def records(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines()]


@torch.inference_mode()
def loglikelihood(tuned, context: str, continuation: str) -> float:
    """As lm-eval splits a (context, continuation) pair into tokens: the whole text's tokens, the context's first."""
    tok = tuned.tokenizer
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    n = len(tok(context, add_special_tokens=False)["input_ids"])
    logits = tuned.model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
    return sum(float(logits[i - 1, whole[i]]) for i in range(n, len(whole)))


@torch.inference_mode()
def greedy(tuned, ids: list[int], max_new_tokens: int, stops: list[str]) -> str:
    """transformers' greedy `generate` with chattune's sampling rules (the model's repetition penalty), cut at the
    first stop string; asserts that no token before the cut was a near tie."""
    settings = sampling_settings(tuned.model.generation_config, 0.0)
    x = torch.tensor([ids])
    out = tuned.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                               eos_token_id=tuned.stop_ids, pad_token_id=tuned.tokenizer.pad_token_id,
                               output_logits=True, return_dict_in_generate=True, **settings.generate_kwargs())
    new = out.sequences[0, len(ids):].tolist()
    for i, step in enumerate(out.logits):
        if any(stop in tuned.tokenizer.decode(new[:i], skip_special_tokens=True) for stop in stops):
            break  # the answer ends before this token
        scores = settings.processors(len(ids))(out.sequences[:, : len(ids) + i], step.float())  # as it chose
        top = scores[0].topk(2).values
        assert float(top[0] - top[1]) > MARGIN, f"a near tie after {new[:i]}: choose another question"
    text = tuned.tokenizer.decode(new, skip_special_tokens=True)
    for stop in stops:
        text = text.split(stop)[0]
    return text


def test_lm_eval_loglikelihood_and_generation_through_completions(server, reference, bundled, tmp_path):
    args = (f"model={NAME},base_url={server}/v1/completions,tokenizer_backend=huggingface,"
            f"tokenizer={bundled}")
    results, samples = lm_eval("local-completions", args, "chattune_mc,chattune_gen", tmp_path)

    # multiple choice: every choice's loglikelihood, then the accuracy
    correct = []
    for doc, sample in zip(records("mc.jsonl"), samples["chattune_mc"], strict=True):
        ours = [loglikelihood(reference, doc["question"], " " + choice) for choice in doc["choices"]]
        theirs = [float(r[0][0]) for r in sample["resps"]]
        assert theirs == pytest.approx(ours, abs=1e-3), doc["question"]
        best, second = sorted(ours, reverse=True)[:2]
        assert best - second > MARGIN, f"a near tie: {doc['question']}"
        correct.append(max(range(len(ours)), key=ours.__getitem__) == doc["answer"])
    acc = sum(correct) / len(correct)
    print(f"\nlm-eval on chattune serve: chattune_mc acc {results['chattune_mc']['acc,none']} (ours {acc})")
    assert results["chattune_mc"]["acc,none"] == acc

    # generation: each answer, then exact match
    matches = []
    for doc, sample in zip(records("qa.jsonl"), samples["chattune_gen"], strict=True):
        context = sample["arguments"]["gen_args_0"]["arg_0"]
        assert context == f"Question: {doc['question']}\nAnswer:"
        ids = reference.tokenizer(context, add_special_tokens=False)["input_ids"]
        ours = greedy(reference, ids, 12, ["\n", "."])
        assert sample["resps"][0][0] == ours
        matches.append(ours == " " + doc["answer"])
    assert results["chattune_gen"]["exact_match,none"] == sum(matches) / len(matches)


def test_lm_eval_generation_through_chat_completions(server, reference, tmp_path):
    results, samples = lm_eval("local-chat-completions", f"model={NAME},base_url={server}/v1/chat/completions",
                               "chattune_chat", tmp_path, "--apply_chat_template")
    matches = []
    for doc, sample in zip(records("qa.jsonl"), samples["chattune_chat"], strict=True):
        (sent,) = sample["arguments"]["gen_args_0"]["arg_0"]  # the messages lm-eval sent, as JSON
        messages = json.loads(sent)
        assert messages == [{"role": "user", "content": f"{doc['question']} Answer in one word."}]
        conv = Conversation([Message("user", messages[0]["content"])])
        ours = greedy(reference, reference.prompt_ids(conv), 12, ["\n"])  # chattune's own prompt, as chat renders it
        assert sample["resps"][0][0] == ours
        matches.append(ours == doc["answer"])
    print(f"\nlm-eval on chattune serve: chattune_chat exact_match {results['chattune_chat']['exact_match,none']}")
    assert results["chattune_chat"]["exact_match,none"] == sum(matches) / len(matches)
