"""`chattune eval` and batched generation: batched greedy answers equal one-at-a-time ones; the command writes one
prediction per sample and the metrics; bad data and non-model folders are clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from chattune.data.encode import encode_prompt
from chattune.evaluate.generate import generate_batch
from chattune.evaluate.run import load_samples
from chattune.inference import load_tuned
from tiny import make_tiny_llama, write_jsonl

RECORDS = [{"messages": [{"role": "user", "content": "say " + "x" * n}, {"role": "assistant", "content": "y" * (n % 3 + 1)}]}
           for n in (1, 7, 3, 12, 5)] + [
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"},
                  {"role": "assistant", "content": "hello again"}]}]


def chattune(*args):
    return subprocess.run([sys.executable, "-m", "chattune", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    return make_tiny_llama(root / "model"), write_jsonl(root / "test.jsonl", RECORDS)


def _prompts(tuned, data):
    return [encode_prompt(s.prompt, tuned.template, tuned.tokenizer) for s in load_samples(str(data))]


def test_batched_generation_equals_one_at_a_time_on_the_tiny_model(tiny):
    model, data = tiny
    tuned = load_tuned(model=str(model), log=lambda m: None)
    prompts = _prompts(tuned, data)
    assert len({len(p) for p in prompts}) == len(prompts)  # all lengths differ: real left padding
    stop = tuned.template.stop_tokens(tuned.tokenizer)
    one = generate_batch(tuned.model, tuned.tokenizer, prompts, stop, max_new_tokens=12, batch_size=1)
    many = generate_batch(tuned.model, tuned.tokenizer, prompts, stop, max_new_tokens=12, batch_size=4)
    assert [g.text for g in many] == [g.text for g in one] and [g.new_tokens for g in many] == [g.new_tokens for g in one]
    assert all(g.new_tokens > 0 for g in one)


@pytest.mark.slow
def test_batched_generation_equals_one_at_a_time_on_the_bundled_model(tmp_path):
    from chattune.models.bundled import ensure_bundled_model

    ensure_bundled_model(log=lambda m: None)
    data = write_jsonl(tmp_path / "q.jsonl", [
        {"instruction": q, "output": "-"} for q in ["What is the capital of France?", "Say hello.",
                                                    "List three colours, one per line.", "什么是机器学习？请简短回答。"]])
    tuned = load_tuned(model="bundled", log=lambda m: None)
    prompts = _prompts(tuned, data)
    stop = tuned.template.stop_tokens(tuned.tokenizer)
    one = generate_batch(tuned.model, tuned.tokenizer, prompts, stop, max_new_tokens=24, batch_size=1)
    many = generate_batch(tuned.model, tuned.tokenizer, prompts, stop, max_new_tokens=24, batch_size=4)
    assert [g.text for g in many] == [g.text for g in one]
    assert "Paris" in one[0].text


def test_eval_writes_one_prediction_per_sample_and_the_metrics(tiny, tmp_path):
    model, data = tiny
    out = tmp_path / "out"
    r = chattune("eval", "--model", str(model), "--data", str(data), "--metrics", "rouge,bleu,exact,triple_f1,loss",
                 "--max-new-tokens", "6", "--batch-size", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [row["source"] for row in rows] == [f"{data}:{i}" for i in range(1, len(RECORDS) + 1)]
    assert rows[0]["reference"] == "yy" and rows[0]["prompt"].endswith("<|im_start|>assistant\n")
    assert rows[-1]["reference"] == "hello again" and "hello<|im_end|>" in rows[-1]["prompt"]  # history kept
    m = json.loads((out / "metrics.json").read_text())
    assert m["samples"] == len(RECORDS)
    for key in ("rouge-1", "rouge-2", "rouge-l", "bleu-4", "exact", "triple_f1", "loss", "perplexity",
                "generation_seconds", "generated_tokens_per_s", "peak_memory_mb"):
        assert key in m, key
    assert m["loss"] > 0 and m["perplexity"] > 1 and m["peak_memory_mb"] > 0 and m["generated_tokens_per_s"] > 0
    assert "rouge-1" in r.stdout and "perplexity" in r.stdout
    assert m["decode_step"] == "transformers" and m["packed_layers"] == 0  # the defaults: transformers' own

    # --block-weights auto --decode-step auto: chattune's step, checked at start-up; the same predictions and metrics
    fast = tmp_path / "fast"
    r = chattune("eval", "--model", str(model), "--data", str(data), "--metrics", "rouge,bleu,exact,triple_f1,loss",
                 "--max-new-tokens", "6", "--batch-size", "4", "--out", str(fast), "--block-weights", "auto",
                 "--decode-step", "auto")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "decode step: chattune's own" in r.stderr + r.stdout
    assert (fast / "predictions.jsonl").read_text() == (out / "predictions.jsonl").read_text()
    m2 = json.loads((fast / "metrics.json").read_text())
    assert m2["decode_step"] == "chattune"
    assert {k: m2[k] for k in ("rouge-l", "bleu-4", "exact", "loss")} == {k: m[k] for k in ("rouge-l", "bleu-4", "exact",
                                                                                            "loss")}


def test_eval_of_a_run_writes_beside_it_by_default(tiny, tmp_path):
    model, data = tiny
    run = tmp_path / "run"
    r = chattune("train", f"model={model}", f"data.train={data}", f"output_dir={run}", "train.max_steps=1")
    assert r.returncode == 0, r.stderr[-2000:]
    r = chattune("eval", "--adapter", str(run), "--data", str(data), "--limit", "2", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    assert len((run / "eval-test" / "predictions.jsonl").read_text().splitlines()) == 2


def test_bad_data_and_non_model_folders_are_clear_errors(tiny, tmp_path):
    model, _ = tiny
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"messages": [{"role": "bot", "content": "x"}]}\n')
    r = chattune("eval", "--model", str(model), "--data", str(bad))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{bad}:2: messages[0].role: unknown role 'bot'" in r.stderr
    r = chattune("eval", "--adapter", str(tmp_path), "--data", str(tiny[1]))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "neither an adapter (adapter_config.json) nor a model (config.json)" in r.stderr
    r = chattune("eval", "--model", str(model), "--data", str(bad), "--metrics", "bleu,rogue")
    assert r.returncode == 2 and "unknown metric(s) rogue" in r.stderr


def test_generation_metrics_during_training_and_the_best_checkpoint_as_final_output(tiny, tmp_path):
    from safetensors.torch import load_file

    model, data = tiny
    train_data = write_jsonl(tmp_path / "train.jsonl", [{"instruction": f"say {w}", "output": w * 3}
                                                       for w in ["ab", "cd", "ef", "gh"]])
    out = tmp_path / "run"
    r = chattune("train", f"model={model}", f"data.train={train_data}", f"data.eval={data}", f"output_dir={out}",
                 "train.max_steps=8", "train.eval_steps=2", "train.save_steps=2", "train.lr=5e-2",
                 "train.eval_generate=3", "train.eval_metrics=rouge,exact", "train.eval_max_new_tokens=4",
                 "train.load_best=true", "train.best_metric=loss", "train.precision=fp32", "train.batch_size=2")
    assert r.returncode == 0, r.stderr[-2000:]
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
    assert [e["step"] for e in evals] == [2, 4, 6, 8]
    assert all({"eval_rouge-1", "eval_rouge-2", "eval_rouge-l", "eval_exact"} <= set(e) for e in evals)
    best_step = min(evals, key=lambda e: e["eval_loss"])["step"]
    best = json.loads((out / "run.json").read_text())["best"]
    assert best["step"] == best_step and best["metric"] == "loss"
    assert f"best checkpoint: step {best_step} (loss = " in r.stderr
    final = load_file(out / "adapter_model.safetensors")
    kept = load_file(out / f"checkpoint-{best_step}" / "adapter_model.safetensors")
    assert final.keys() == kept.keys() and all((final[k] == kept[k]).all() for k in final)


def test_load_best_needs_an_evaluated_metric(tiny, tmp_path):
    model, data = tiny
    r = chattune("train", f"model={model}", f"data.train={data}", "train.load_best=true", "train.eval_steps=2",
                 "train.save_steps=4", "train.best_metric=rouge-l")
    assert r.returncode == 2 and "train.best_metric='rouge-l' is not measured by this run" in r.stderr
