"""The command line: exit codes, error lines without tracebacks, data inspect, chat on a tiny model."""

import json
import subprocess
import sys

import pytest

from tiny import make_tiny_llama, write_jsonl


def chattune(*args, input=None, env=None):
    return subprocess.run([sys.executable, "-m", "chattune", *args], capture_output=True, text=True, input=input,
                          timeout=600, env=env)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = make_tiny_llama(root / "model")
    data = write_jsonl(root / "data.jsonl", [{"instruction": f"say {w}", "output": w} for w in ["a", "bb", "ccc"]])
    return root, model, data


def test_bad_data_exits_2_with_file_line_field(tiny, tmp_path):
    root, model, _ = tiny
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"messages": [{"role": "bot", "content": "x"}]}\n[1]\n')
    for cmd in (["data", "inspect", str(bad), f"model={model}"],
                ["train", f"model={model}", f"data.train={bad}", f"output_dir={tmp_path / 'out'}"]):
        r = chattune(*cmd)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr
        assert f"{bad}:2: messages[0].role: unknown role 'bot'" in r.stderr
        assert f"{bad}:3: (record): expected a JSON object, got list" in r.stderr
    assert not (tmp_path / "out").exists()  # nothing written for a run that could not start


def test_unknown_key_exits_2(tiny):
    r = chattune("train", "lora", "train.lrate=1")
    assert r.returncode == 2 and "did you mean `train.lr`?" in r.stderr and "Traceback" not in r.stderr


def test_missing_model_is_a_clear_error(tiny, tmp_path):
    _, _, data = tiny
    r = chattune("train", f"model={tmp_path / 'nope'}", f"data.train={data}", f"output_dir={tmp_path / 'o'}")
    assert r.returncode == 2 and "model folder" in r.stderr and "not found" in r.stderr


def test_data_inspect_shows_trained_spans_and_stats(tiny):
    _, model, data = tiny
    r = chattune("data", "inspect", str(data), f"model={model}", "data.max_length=40")
    assert r.returncode == 0, r.stderr
    assert "3 valid records, format alpaca" in r.stdout
    assert "⟦a<|im_end|>⟧" in r.stdout  # the answer and its stop token are trained
    assert "<|im_start|>user\nsay a<|im_end|>" in r.stdout
    assert "data.max_length=40: 3 of 3 samples are longer" in r.stdout


def test_train_then_chat(tiny, tmp_path):
    _, model, data = tiny
    out = tmp_path / "run"
    r = chattune("train", "lora", f"model={model}", f"data.train={data}", f"output_dir={out}", "train.max_steps=2",
                 "train.logging_steps=1")
    assert r.returncode == 0, r.stderr
    assert "trainable params:" in r.stderr and "done: 2 steps" in r.stderr
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert json.loads((out / "chattune.json").read_text())["method"] == "lora"
    r = chattune("chat", "--adapter", str(out), "--prompt", "say a", "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr
    assert "decode step: chattune's own (checked against transformers'" in r.stderr
    # the CLI prints exactly the model's greedy answer, as the library generates it (through transformers' forward)
    from chattune.chat import answer_once
    from chattune.inference import load_tuned

    tuned = load_tuned(adapter=str(out), log=lambda m: None)
    expected = answer_once(tuned, "say a", max_new_tokens=5)
    assert len(tuned.tokenizer(expected, add_special_tokens=False)["input_ids"]) > 0
    assert r.stdout == expected + "\n"
    # interactive: two turns, /clear, /exit
    r = chattune("chat", "--adapter", str(out), "--max-new-tokens", "3", input="hello\n/clear\nagain\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("assistant> ") == 2 and "(conversation cleared)" in r.stdout


def test_packed_still_works_as_the_former_name_of_block_weights(capsys):
    """`--packed` was renamed `--block-weights` (sequence packing is `data.packing`); for one release the old name
    sets the same value and prints a one-line notice. The new name and the defaults print nothing."""
    from chattune.cli import build_parser

    parser = build_parser()
    notice = "note: --packed is renamed --block-weights; the old name still works in this release only\n"
    for command, default in (("chat", "auto"), ("serve", "auto"), ("eval", "off")):
        given = ["--data", "d.jsonl"] if command == "eval" else []
        assert parser.parse_args([command, *given]).block_weights == default
        assert capsys.readouterr().err == ""
        for value in ("auto", "off"):
            assert parser.parse_args([command, *given, "--block-weights", value]).block_weights == value
            assert capsys.readouterr().err == ""
            args = parser.parse_args([command, *given, "--packed", value])
            assert args.block_weights == value and not hasattr(args, "packed")
            assert capsys.readouterr().err == notice
    shown = " ".join(chattune("serve", "--help").stdout.split())  # however argparse wraps it
    assert "--block-weights {auto,off}" in shown and "formerly --packed)" in shown
