"""`chattune eval`'s memory and input: the loss metric runs the output head only where a token is scored and sums the
cross-entropy a chunk at a time (as training does), giving the full-logits loss; prompts longer than the model's
context less --max-new-tokens are cut from the left; metrics.json records the device the model really ran on and
that device's memory."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from chattune import hardware
from chattune.data.encode import IGNORE, encode_conversations, encode_prompt
from chattune.errors import ConfigError
from chattune.evaluate.generate import model_context
from chattune.evaluate.run import evaluate, load_samples, teacher_forced_loss
from chattune.inference import load_tuned
from tiny import VOCAB_SIZE, make_tiny_llama, make_tokenizer, write_jsonl

# The records of tests/test_eval.py: 32 trained tokens on the tiny model's ChatML template.
RECORDS = [{"messages": [{"role": "user", "content": "say " + "x" * n}, {"role": "assistant", "content": "y" * (n % 3 + 1)}]}
           for n in (1, 7, 3, 12, 5)] + [
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"},
                  {"role": "assistant", "content": "hello again"}]}]
# What the former computation (full [batch, length, vocab] logits, their fp32 copy, F.cross_entropy) gave on them,
# batch size 4, the tiny model of seed 0 in fp32.
FULL_LOGITS_LOSS = 5.5715637207031250


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_memory")
    model = make_tiny_llama(root / "model")
    tuned = load_tuned(model=str(model), log=lambda m: None)
    data = write_jsonl(root / "test.jsonl", RECORDS)
    return tuned, [s.full for s in load_samples(str(data))], model, data


def _full_logits_loss(tuned, conversations) -> float:
    """The former computation, kept here as the reference."""
    rows = encode_conversations(conversations, tuned.template, tuned.tokenizer, 4096, "right")
    total, count = 0.0, 0
    with torch.no_grad():
        for enc in rows:
            ids, labels = torch.tensor([enc.input_ids]), torch.tensor([enc.labels])[:, 1:]
            logits = tuned.model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            keep = labels != IGNORE
            total += float(torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            count += int(keep.sum())
    return total / count


@pytest.mark.parametrize("batch_size", [1, 4])
def test_the_loss_equals_the_full_logits_loss(tiny, batch_size):
    tuned, conversations, _, _ = tiny
    loss, tokens = teacher_forced_loss(tuned.model, tuned.tokenizer, tuned.template, conversations,
                                       batch_size=batch_size)
    assert tokens == 32
    assert loss == pytest.approx(FULL_LOGITS_LOSS, rel=1e-6)
    assert loss == pytest.approx(_full_logits_loss(tuned, conversations), rel=1e-6)


def test_the_output_head_runs_only_where_a_token_is_scored(tiny):
    tuned, conversations, _, _ = tiny
    shapes: list[tuple] = []
    hook = tuned.model.get_output_embeddings().register_forward_hook(lambda m, i, out: shapes.append(tuple(out.shape)))
    try:
        _, tokens = teacher_forced_loss(tuned.model, tuned.tokenizer, tuned.template, conversations, batch_size=4)
    finally:
        hook.remove()
    # Two batches (4 + 2 records): one row of logits per scored token (10 + 22), never [batch, length, vocab].
    assert shapes == [(10, VOCAB_SIZE), (22, VOCAB_SIZE)] and tokens == 32


def test_a_model_without_logits_to_keep_gets_the_same_loss(tiny, tmp_path):
    """Remote code whose forward does not take logits_to_keep: full logits, the scored rows picked, chunked loss."""
    from fixtures.make_remote_glm import make_remote_glm

    path = make_remote_glm(tmp_path / "glm")
    make_tokenizer(eos="</s>").save_pretrained(path)
    glm = load_tuned(model=str(path), template="chatml", trust_remote_code=True, log=lambda m: None)
    assert "logits_to_keep" not in inspect.signature(glm.model.forward).parameters
    _, conversations, _, _ = tiny
    loss, tokens = teacher_forced_loss(glm.model, glm.tokenizer, glm.template, conversations, batch_size=1)
    assert tokens == 32 and loss == pytest.approx(_full_logits_loss(glm, conversations), rel=1e-6)


# ---------------------------------------------------------------- prompts cut to the context


LONG = [{"instruction": "say " + "x" * 100, "output": "y"}, {"instruction": "hi", "output": "yo"}]


def test_prompts_longer_than_the_context_are_cut_from_the_left(tmp_path):
    model = make_tiny_llama(tmp_path / "model", max_position_embeddings=64)
    data = write_jsonl(tmp_path / "long.jsonl", LONG)
    logs: list[str] = []
    result = evaluate(None, str(model), str(data), "exact", max_new_tokens=8, out=str(tmp_path / "out"),
                      log=logs.append)
    assert "eval: 1 prompts longer than 56 tokens were cut from the left (the model's context is 64 tokens, 8 kept " \
           "for the answer)" in logs
    tuned = load_tuned(model=str(model), log=lambda m: None)
    full = [encode_prompt(s.prompt, tuned.template, tuned.tokenizer) for s in load_samples(str(data))]
    assert len(full[0]) > 56 and len(full[1]) <= 56
    prompts = [p["prompt"] for p in result.predictions]
    assert prompts == [tuned.tokenizer.decode(full[0][-56:]), tuned.tokenizer.decode(full[1])]
    assert prompts[0].endswith("x" * 20 + "<|im_end|>\n<|im_start|>assistant\n")  # the end, the user turn, is kept


def test_the_context_is_the_smaller_of_the_models_and_the_tokenizers(tmp_path):
    model = make_tiny_llama(tmp_path / "model", max_position_embeddings=64)
    tuned = load_tuned(model=str(model), log=lambda m: None)
    assert model_context(tuned.model, tuned.tokenizer) == 64  # the tokenizer does not know its length (1e30)
    tuned.tokenizer.model_max_length = 40
    assert model_context(tuned.model, tuned.tokenizer) == 40


def test_max_new_tokens_that_leave_no_room_for_a_prompt_are_refused(tmp_path):
    model = make_tiny_llama(tmp_path / "model", max_position_embeddings=64)
    data = write_jsonl(tmp_path / "long.jsonl", LONG)
    with pytest.raises(ConfigError) as e:
        evaluate(None, str(model), str(data), "exact", max_new_tokens=64, out=str(tmp_path / "out"), log=lambda m: None)
    assert str(e.value) == ("--max-new-tokens 64 leaves no room for a prompt in the model's context of 64 tokens; "
                            "give --max-new-tokens below 64")


# ---------------------------------------------------------------- the device and memory recorded


def test_metrics_record_where_the_model_ran_not_the_machines_gpu(tiny, tmp_path, monkeypatch):
    """On a GPU machine, an eval run on the CPU records cpu and the CPU's memory (peak RSS), not cuda's numbers."""
    _, _, model, data = tiny
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, as device_type() sees it
    assert hardware.device_type() == "cuda"
    asked: list[str] = []
    monkeypatch.setattr(hardware, "reset_peak_memory", lambda device: asked.append(f"reset {device}") or True)
    monkeypatch.setattr(hardware, "peak_memory_mb", lambda device: asked.append(f"peak {device}") or 123.0)
    result = evaluate(None, str(model), str(data), "exact", max_new_tokens=2, out=str(tmp_path / "out"),
                      dtype=torch.bfloat16, device="cpu", log=lambda m: None)
    assert asked == ["reset cpu", "peak cpu"]
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (written["device"], written["precision"], written["peak_memory_mb"]) == ("cpu", "bf16", 123.0)
    assert result.metrics == written


def test_peak_memory_of_a_model_spread_over_devices_adds_them(monkeypatch):
    seen: list[str] = []
    monkeypatch.setattr(hardware, "peak_memory_mb", lambda device: seen.append(device) or 100.0)
    assert hardware.peak_memory_of("cuda:0,cuda:1") == 200.0 and seen == ["cuda:0", "cuda:1"]
    net = torch.nn.Linear(2, 2)
    assert hardware.placed_on(net) == "cpu"
