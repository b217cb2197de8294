"""`chattune serve --lora NAME=DIR`: several LoRA adapters on one tiny base. Rows of different adapters (and the
base) decoded in one batch give each request's lone greedy tokens; /v1/models lists them with their parent; a
request's `model` picks one (404 for another name); each adapter keeps its run's template and stop tokens; every
folder that cannot share the base is refused with the reason."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from peft import LoraConfig, PrefixTuningConfig

from chattune.cli import build_parser, main
from chattune.commands.serve import load
from chattune.data.formats import Conversation, Message
from chattune.inference import generate, load_tuned
from chattune.serve.app import create_app
from chattune.serve.adapters import add_loras, check_loras
from serve_helpers import Script, make_adapter, running
from tiny import SPECIAL_ID, make_tiny_llama

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    base = make_tiny_llama(root / "model", max_position_embeddings=2048)
    return {"base": base, "a": make_adapter(base, root / "run-a", 1), "b": make_adapter(base, root / "run-b", 2),
            "b3": make_adapter(base, root / "run-b3", 2, template="llama3"), "root": root}


def serve_three(runs, b="b", **kw):
    tuned = load_tuned(model=str(runs["base"]), template="chatml", log=lambda m: None)
    models = add_loras("model", tuned, check_loras([f"a={runs['a']}", f"b={runs[b]}"]), str(runs["base"]),
                       log=lambda m: None)
    return tuned, create_app(tuned, models=models, **kw)


def ask(url: str, model: str | None, content: str = "hi", **kw) -> dict:
    body = {"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 8, **kw}
    if model is not None:
        body["model"] = model
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def alone(folder: Path | None, base: Path, content: str = "hi", template: str = "chatml") -> str:
    """The greedy answer of one model loaded on its own (the base alone, or load_tuned's single adapter)."""
    tuned = load_tuned(adapter=str(folder), log=lambda m: None) if folder else \
        load_tuned(model=str(base), template=template, log=lambda m: None)
    return generate(tuned, Conversation([Message("user", content)]), max_new_tokens=8)


def test_mixed_batch_gives_each_request_its_lone_tokens(runs):
    tuned, app = serve_three(runs)
    hold, gate = threading.Event(), threading.Event()

    def wait_at_gate(module, args, kwargs):
        if hold.is_set():
            gate.wait(30)

    tuned.model.register_forward_pre_hook(wait_at_gate, with_kwargs=True)
    asks = [("b", "hello there"), ("a", "hi"), ("b", "hi"), ("model", "hi")]
    answers: dict[int, dict] = {}
    with running(app) as url:
        worker = app.state.worker
        assert worker.batching and worker.decode_step == "transformers"
        hold.set()  # the first request stops in its prefill; the others queue meanwhile and join it together

        def send(i):
            answers[i] = ask(url, asks[i][0], asks[i][1])

        threads = [threading.Thread(target=send, args=(0,))]
        threads[0].start()
        deadline = time.time() + 30
        while not worker.busy.is_set() and time.time() < deadline:
            time.sleep(0.01)
        threads += [threading.Thread(target=send, args=(i,)) for i in (1, 2, 3)]
        for t in threads[1:]:
            t.start()
        while worker.waiting < 3 and time.time() < deadline:
            time.sleep(0.01)
        assert worker.waiting == 3
        hold.clear()
        gate.set()
        for t in threads:
            t.join(60)
        assert worker.largest_batch == 4  # all four decoded together: a, b (twice) and the base
    texts = [answers[i]["choices"][0]["message"]["content"] for i in range(4)]
    assert [answers[i]["model"] for i in range(4)] == ["b", "a", "b", "model"]
    expected = [alone(runs["b"], runs["base"], "hello there"), alone(runs["a"], runs["base"]),
                alone(runs["b"], runs["base"]), alone(None, runs["base"])]
    assert texts == expected
    assert len({texts[1], texts[2], texts[3]}) == 3  # the adapters really change the answer


def test_models_list_and_selection(runs):
    tuned, app = serve_three(runs)
    with running(app) as url:
        listed = httpx.get(url + "/v1/models").json()
        assert listed["object"] == "list"
        assert [(m["id"], m["object"], m["parent"]) for m in listed["data"]] == \
            [("model", "model", None), ("a", "model", "model"), ("b", "model", "model")]
        assert [m["method"] for m in listed["data"]] == [None, "lora", "lora"]
        assert ask(url, None)["model"] == "model"
        assert ask(url, None)["choices"][0]["message"]["content"] == ask(url, "model")["choices"][0]["message"][
            "content"]
        for path, body in (("/v1/chat/completions", {"messages": HI}), ("/v1/completions", {"prompt": "x"})):
            r = httpx.post(url + path, json={**body, "model": "c"}, timeout=30)
            assert r.status_code == 404
            assert r.json() == {"error": {"message": "model 'c' does not exist here; this server serves 'model', "
                                                     "'a', 'b'", "type": "not_found_error", "param": "model",
                                          "code": "model_not_found"}}
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "model": "a", "max_tokens": 3,
                                                      "temperature": 0}, timeout=30)
        assert r.status_code == 200 and r.json()["model"] == "a"
        health = httpx.get(url + "/health").json()
        assert health["models"] == ["model", "a", "b"] and health["decode_step"] == "transformers"


def test_each_adapter_keeps_its_template_and_stop_tokens(runs):
    tuned, app = serve_three(runs, b="b3")
    Script(tuned.model, list(b"ab") + [SPECIAL_ID["<|eot_id|>"]] + list(b"cd") + [SPECIAL_ID["<|im_end|>"]])
    conv = Conversation([Message("user", "hi")])
    with running(app) as url:
        chatml, llama3 = ask(url, "a"), ask(url, "b")
        assert chatml["choices"][0]["message"]["content"] == "abcd"  # ChatML stops at <|im_end|> only
        assert llama3["choices"][0]["message"]["content"] == "ab"  # Llama 3 stops at <|eot_id|>
        assert llama3["usage"]["prompt_tokens"] == len(load_tuned(adapter=str(runs["b3"]),
                                                                  log=lambda m: None).prompt_ids(conv))
        assert chatml["usage"]["prompt_tokens"] == len(tuned.prompt_ids(conv))
        assert chatml["usage"]["prompt_tokens"] != llama3["usage"]["prompt_tokens"]


def test_adapter_with_loras_serves_the_base_too(runs):
    args = build_parser().parse_args(["serve", "--adapter", str(runs["a"]), "--lora", f"b={runs['b']}",
                                      "--dtype", "fp32", "--max-batch", "4"])
    tuned = load(args, log=lambda m: None)
    assert [(m.id, m.adapter, m.parent) for m in args.models] == \
        [("run-a", "default", "model"), ("model", "__base__", None), ("b", "b", "model")]
    with running(create_app(tuned, models=args.models)) as url:
        assert ask(url, None)["choices"][0]["message"]["content"] == alone(runs["a"], runs["base"])
        # the base alone, as `--model BASE` serves it: its tokenizer's own chat template (`auto`)
        assert ask(url, "model")["choices"][0]["message"]["content"] == alone(None, runs["base"], template="auto")
        assert ask(url, "b")["choices"][0]["message"]["content"] == alone(runs["b"], runs["base"])


def refused(runs, capsys, *lora: str) -> str:
    argv = ["serve", "--model", str(runs["base"]), "--dtype", "fp32", "--port", "1"]
    for spec in lora:
        argv += ["--lora", spec]
    capsys.readouterr()
    assert main(argv) == 2
    return capsys.readouterr().err.strip().splitlines()[-1]  # (after any of transformers' progress bars)


def test_folders_that_cannot_share_the_base_are_refused(runs, capsys):
    root, base = runs["root"], runs["base"]
    other = make_tiny_llama(root / "other", seed=3)
    wrong_base = make_adapter(other, root / "run-other", 4)
    prefix = make_adapter(base, root / "run-prefix", 5, peft_config=PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=2))
    dora = make_adapter(base, root / "run-dora", 6, peft_config=LoraConfig(r=4, target_modules="all-linear",
                                                                           use_dora=True))
    qlora = make_adapter(base, root / "run-qlora", 7, info={"method": "qlora"})
    plain = root / "plain-peft"
    make_adapter(base, plain, 8)
    (plain / "chattune.json").unlink()
    a = runs["a"]
    assert refused(runs, capsys, str(a)) == f"error: --lora {a}: give it as NAME=DIR (a name requests use as " \
                                            "`model`, then a LoRA run's output_dir)"
    assert "'a b' is not a plain id" in refused(runs, capsys, f"a b={a}")
    assert refused(runs, capsys, f"a={a}", f"a={runs['b']}") == \
        "error: --lora a= is given twice; give each adapter its own name"
    assert "'default' is a name peft uses itself" in refused(runs, capsys, f"default={a}")
    assert refused(runs, capsys, f"x={root / 'nope'}") == f"error: --lora x={root / 'nope'}: no such folder; " \
                                                        "point it at a LoRA run's output_dir (or a checkpoint-N in it)"
    assert "a whole model (a Freeze or full run, an export), not a LoRA adapter" in refused(runs, capsys, f"x={base}")
    assert "a PREFIX_TUNING adapter (P-tuning v2), not LoRA" in refused(runs, capsys, f"x={prefix}")
    assert "a DoRA adapter; peft's mixed-batch forward (adapter_names) refuses DoRA" in \
        refused(runs, capsys, f"x={dora}")
    assert "not a chattune run (no chattune.json)" in refused(runs, capsys, f"x={plain}")
    assert refused(runs, capsys, f"x={wrong_base}") == \
        f"error: --lora x={wrong_base} was trained on {other}, but the served base is {base}; serve it with its own " \
        "base (--model), or give adapters of the same base"
    assert f"--lora x={qlora} was trained on a 4-bit base (bitsandbytes), but the served base is loaded as an " \
           "unquantized base" in refused(runs, capsys, f"x={qlora}")
    assert "'model' is already the id of a served model" in refused(runs, capsys, f"model={a}")
    assert json.loads((a / "chattune.json").read_text())["template"] == "chatml"  # nothing was written
