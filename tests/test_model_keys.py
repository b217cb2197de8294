"""`chattune chat`, `eval` and `serve` take `train`'s `model.*` keys as `key=value` items after their options
(`chattune chat --model DIR model.trust_remote_code=true`): each key given reaches the loaded model or is refused
with the reason (exit 2, one line, no traceback); an unknown model key gets config.py's did-you-mean error; a key
outside model.* is refused on chat with the keys it takes; with --adapter the run's recorded model settings are the
default and the keys override them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fixtures.make_remote_glm import make_remote_glm
from serve_helpers import free_port
from tiny import make_tiny_llama, make_tokenizer, write_jsonl

import chattune.inference as inference
from chattune.cli import build_parser, main
from chattune.commands import chat as chat_command
from chattune.commands import serve as serve_command
from chattune.errors import ModelError

RECORDS = [{"instruction": f"say {w}", "output": w} for w in ("a", "bb")]
CHAT_KEYS = "the keys that apply: model.trust_remote_code, model.attn_implementation, model.revision"


def chattune(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "chattune", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("model_keys")
    return root, make_tiny_llama(root / "model"), write_jsonl(root / "data.jsonl", RECORDS)


@pytest.fixture(scope="module")
def eager_run(tiny):
    """A one-step LoRA run that trained with model.attn_implementation=eager (recorded in its config.yaml)."""
    root, model, data = tiny
    out = root / "run"
    assert main(["train", f"model={model}", f"data.train={data}", f"output_dir={out}", "train.max_steps=1",
                 "train.batch_size=2", "train.precision=fp32", "model.attn_implementation=eager"]) == 0
    return out


@pytest.fixture(scope="module")
def remote_glm(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote_keys")
    path = make_remote_glm(root / "glm_model_keys")
    make_tokenizer(eos="</s>").save_pretrained(path)
    return root, path, write_jsonl(root / "data.jsonl", RECORDS)


def parse(*argv):
    return build_parser().parse_args(list(argv))


def attention(tuned) -> str:
    return tuned.model.config._attn_implementation


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# ---------------------------------------------------------------- the command line, per command


def test_chat_takes_a_model_key_after_its_options(tiny):
    _, model, _ = tiny
    r = chattune("chat", "--model", str(model), "--prompt", "hi", "--max-new-tokens", "3",
                 "model.attn_implementation=eager")
    assert r.returncode == 0, r.stderr
    assert "attention: eager (model.attn_implementation)" in r.stderr
    assert "decode step: transformers' forward (model.attn_implementation=eager" in r.stderr


def test_eval_takes_a_model_key(tiny, tmp_path):
    _, model, data = tiny
    r = chattune("eval", "--model", str(model), "--data", str(data), "--metrics", "exact", "--max-new-tokens", "2",
                 "--out", str(tmp_path / "eval"), "model.attn_implementation=eager")
    assert r.returncode == 0, r.stderr
    assert "attention: eager (model.attn_implementation)" in r.stderr
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["exact"] is not None


def test_serve_takes_a_model_key(tiny):
    _, model, _ = tiny
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "chattune", "serve", "--model", str(model), "--port", str(port),
                             "--max-batch", "1", "model.attn_implementation=eager"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1]
        name = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        reply = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert reply.status_code == 200, reply.text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert "attention: eager (model.attn_implementation)" in err


@pytest.mark.parametrize("command", ["chat", "eval", "serve"])
def test_an_unknown_model_key_exits_2_with_configs_error(tiny, command):
    _, model, data = tiny
    extra = ["--data", str(data)] if command == "eval" else []
    line = one_line_error(chattune(command, "--model", str(model), *extra, "model.bogus=1"))
    assert line == "error: unknown config key `model.bogus`; did you mean `model`?"


def test_chat_refuses_a_key_outside_model_with_the_keys_it_takes(tiny):
    _, model, _ = tiny
    line = one_line_error(chattune("chat", "--model", str(model), "--prompt", "hi", "train.lr=1"))
    assert line == f"error: `train.lr` has no effect on `chattune chat`; {CHAT_KEYS}"


# ---------------------------------------------------------------- every key given has an effect or is refused


@pytest.mark.parametrize("command", ["chat", "eval", "serve"])
def test_model_keys_without_an_effect_are_refused_with_the_reason(tiny, capsys, command):
    _, model, data = tiny
    extra = ["--data", str(data)] if command == "eval" else []
    assert main([command, "--model", str(model), *extra, "model.load_in_8bit=true"]) == 2
    err = capsys.readouterr().err
    assert f"error: `model.load_in_8bit` has no effect on `chattune {command}`; an 8-bit base is a training " \
           "setting" in err
    assert main([command, *extra, "model.path=x"]) == 2
    assert f"`model.path` has no effect on `chattune {command}`; give the model with --model or --adapter" \
        in capsys.readouterr().err
    assert main([command, "--model", str(model), *extra, "model.attn_implementation=fastest"]) == 2
    assert "error: model.attn_implementation=fastest: not an attention implementation transformers knows; " \
           "choose from eager, " in capsys.readouterr().err


def test_chat_points_its_other_settings_to_their_options(tiny, capsys):
    _, model, _ = tiny
    assert main(["chat", "--model", str(model), "template=chatml"]) == 2
    assert f"`template` has no effect on `chattune chat`; give it with --template; {CHAT_KEYS}" \
        in capsys.readouterr().err


@pytest.mark.parametrize("command", ["chat", "serve"])
def test_attn_implementation_reaches_the_loaded_model(tiny, command):
    _, model, _ = tiny
    load = chat_command.load if command == "chat" else serve_command.load
    quiet = dict(log=lambda m: None)
    assert attention(load(parse(command, "--model", str(model)), **quiet)) == "sdpa"  # transformers' default
    args = parse(command, "--model", str(model), "model.attn_implementation=eager")
    assert attention(load(args, **quiet)) == "eager"
    assert args.decode_step == "transformers"  # chattune's step attends through SDPA: it would not hold
    args = parse(command, "--model", str(model), "model.attn_implementation=sdpa")
    assert attention(load(args, **quiet)) == "sdpa" and args.decode_step == "auto"


def test_eval_attn_implementation_reaches_the_loaded_model(tiny, tmp_path, monkeypatch):
    _, model, data = tiny
    seen = []
    real = inference.load_model

    def spy(*args, **kwargs):
        net = real(*args, **kwargs)
        seen.append(net.config._attn_implementation)
        return net

    monkeypatch.setattr(inference, "load_model", spy)
    argv = ["eval", "--model", str(model), "--data", str(data), "--metrics", "loss"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert main([*argv, "--out", str(tmp_path / "b"), "model.attn_implementation=eager"]) == 0
    assert seen == ["sdpa", "eager"]


@pytest.mark.parametrize("command", ["chat", "serve"])
def test_the_runs_recorded_model_settings_are_the_default_and_keys_override_them(eager_run, command):
    load = chat_command.load if command == "chat" else serve_command.load
    logs: list[str] = []
    assert attention(load(parse(command, "--adapter", str(eager_run)), log=logs.append)) == "eager"
    assert f"attention: eager (model.attn_implementation, as recorded in {eager_run / 'config.yaml'})" in logs
    assert attention(load(parse(command, "--adapter", str(eager_run), "model.attn_implementation=sdpa"),
                          log=lambda m: None)) == "sdpa"
    checkpoint = eager_run / "checkpoint-1"  # a checkpoint's settings are its run's
    assert attention(load(parse(command, "--adapter", str(checkpoint)), log=lambda m: None)) == "eager"


# ---------------------------------------------------------------- trust_remote_code reaches the loader


def test_chat_trust_remote_code_from_the_key_loads_a_remote_code_model(remote_glm):
    _, path, _ = remote_glm
    with pytest.raises(ModelError, match="ships its own code; if you trust it, set model.trust_remote_code=true"):
        chat_command.load(parse("chat", "--model", str(path)), log=lambda m: None)
    tuned = chat_command.load(parse("chat", "--model", str(path), "model.trust_remote_code=true"), log=lambda m: None)
    assert type(tuned.model).__name__ == "TinyGLMForCausalLM"


def test_serve_and_eval_trust_remote_code_from_the_key(remote_glm, tmp_path, capsys):
    _, path, data = remote_glm
    tuned = serve_command.load(parse("serve", "--model", str(path), "model.trust_remote_code=true"),
                               log=lambda m: None)
    assert type(tuned.model).__name__ == "TinyGLMForCausalLM"
    argv = ["eval", "--model", str(path), "--data", str(data), "--metrics", "loss", "--out", str(tmp_path / "e")]
    assert main(argv) == 2
    assert "set model.trust_remote_code=true" in capsys.readouterr().err
    assert main([*argv, "model.trust_remote_code=true"]) == 0
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["loss"] > 0


def test_the_chat_cli_passes_trust_remote_code(remote_glm):
    _, path, _ = remote_glm
    refused = chattune("chat", "--model", str(path), "--prompt", "hi", "--max-new-tokens", "2")
    assert "set model.trust_remote_code=true" in one_line_error(refused)
    r = chattune("chat", "--model", str(path), "--prompt", "hi", "--max-new-tokens", "2", "model.trust_remote_code=true")
    assert r.returncode == 0, r.stderr


def _hub_cache_with(root, model_folder, repo="chattune-test/tiny", revisions=("main", "v1")) -> Path:
    """A Hugging Face hub cache laid out as huggingface_hub writes it (refs/NAME -> a commit, snapshots/COMMIT/
    files) holding `model_folder` at each revision: what `hf download org/name --revision v1` leaves behind."""
    import shutil

    cache = root / "hub"
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    for i, name in enumerate(revisions):
        commit = f"{i + 1:040x}"
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / name).write_text(commit)
        shutil.copytree(model_folder, repo_dir / "snapshots" / commit)
    return cache


def test_model_revision_selects_a_cached_hub_revision_and_the_run_remembers_it(tiny, tmp_path, monkeypatch):
    """model.revision reaches the hub lookup and from_pretrained: a tag only in the cache loads offline, an unknown
    one fails with the model named; the trained run records it, and chat on the adapter uses it."""
    root, model, data = tiny
    cache = _hub_cache_with(tmp_path, model, revisions=("v1",))  # no `main`: only the revision finds it
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "chattune", "train", "lora", "model=chattune-test/tiny",
                        "model.revision=v1", f"data.train={data}", f"output_dir={out}", "train.max_steps=1",
                        "train.precision=fp32"], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "chattune.json").read_text())["revision"] == "v1"
    r = subprocess.run([sys.executable, "-m", "chattune", "chat", "--adapter", str(out), "--prompt", "hi",
                        "--max-new-tokens", "2"], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "chattune", "chat", "--model", "chattune-test/tiny", "--prompt", "hi",
                        "--max-new-tokens", "2", "model.revision=v9"], capture_output=True, text=True, timeout=600,
                       env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "hf download chattune-test/tiny --revision v9" in r.stderr


def test_model_revision_on_a_local_folder_is_refused(tiny):
    root, model, data = tiny
    r = chattune("chat", "--model", str(model), "--prompt", "hi", "model.revision=v1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"model.revision=v1 names a revision of a hub model, but model={model} is not a hub id" in r.stderr
