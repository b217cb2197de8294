"""The GPU check: every command chattune's users run on a GPU, once each, in under ten minutes, with the figures
written into docs/gpu.md (date, GPU, versions). Run by benchmarks/gpu_check.sh on a machine with a CUDA GPU.

Steps (each a `chattune` subprocess, so a failure is recorded and the next step still runs):
 1. quickstart (trains on the GPU, chats before/after);
 2. train lora, qlora, ptuning_v2 and freeze on the bundled model (the huanhuan data from ../shared/data, or the
    quickstart's demo data when it is absent): tokens/s, peak memory, train time and final loss from run.json;
 3. eval of the LoRA run (rouge, bleu, loss): device and dtype as metrics.json records them, generation tokens/s;
 4. serve of the LoRA run with 8 concurrent streaming clients (benchmarks/serve_bench.py): single-stream and
    aggregate tokens/s, time to first token, and /health's batching state;
 5. `chattune bench` (tutorial recipe vs chattune's defaults): tokens/s ratio and chattune's MFU.

`--smoke` runs the same steps with a few steps each on whatever device is here (a CPU included), to check the
script itself; its figures mean nothing and it writes to --out only (default: a temporary file, never docs/gpu.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HUANHUAN = ROOT.parent / "shared" / "data" / "huanhuan" / "huanhuan.json"


def chattune(args: list[str], log_file: Path, timeout: float) -> tuple[int, float, str]:
    """Run `chattune ARGS`; returns (exit code, seconds, the output's last lines)."""
    start = time.perf_counter()
    with open(log_file, "a", encoding="utf-8") as f:
        f.write(f"\n$ chattune {' '.join(args)}\n")
        f.flush()
        try:
            r = subprocess.run([sys.executable, "-m", "chattune", *args], stdout=f, stderr=subprocess.STDOUT,
                               timeout=timeout, cwd=ROOT)
            code = r.returncode
        except subprocess.TimeoutExpired:
            code = 124
    seconds = time.perf_counter() - start
    tail = log_file.read_text(encoding="utf-8", errors="replace").splitlines()[-6:]
    return code, seconds, "\n".join(tail)


def gpu_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            return f"{p.name} ({p.total_memory / 2**30:.0f} GiB), {torch.cuda.device_count()} visible"
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        return f"unknown ({e})"
    return f"none (CPU: {platform.processor() or platform.machine()})"


def versions() -> str:
    import peft
    import torch
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"


def train_data(work: Path, smoke: bool) -> Path:
    if HUANHUAN.is_file():
        rows = json.loads(HUANHUAN.read_text(encoding="utf-8"))[: 64 if smoke else 2000]
    else:  # the quickstart's own demo data, written by quickstart into its output folder
        from chattune.quickstart import demo_records

        rows = demo_records()
    out = work / "train.jsonl"
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_check(run_dir: Path, work: Path, smoke: bool, log_file: Path) -> dict:
    port = free_port()
    with open(log_file, "a", encoding="utf-8") as f:
        f.write(f"\n$ chattune serve --adapter {run_dir} --port {port}\n")
        f.flush()
        proc = subprocess.Popen([sys.executable, "-m", "chattune", "serve", "--adapter", str(run_dir), "--port",
                                 str(port)], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    try:
        health = None
        for _ in range(600):
            if proc.poll() is not None:
                return {"error": f"serve exited with {proc.returncode} (see the log)"}
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    health = json.loads(r.read())
                break
            except OSError:
                time.sleep(0.5)
        if health is None:
            return {"error": "serve did not answer /health within 5 minutes"}
        out = work / "serve.json"
        args = [sys.executable, str(ROOT / "benchmarks" / "serve_bench.py"), "--base-url",
                f"http://127.0.0.1:{port}/v1", "--clients", "8", "--max-tokens", "16" if smoke else "128",
                "--repeats", "1" if smoke else "3", "--json", str(out)]
        with open(log_file, "a", encoding="utf-8") as f:
            r = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, timeout=600)
        if r.returncode != 0:
            return {"error": f"serve_bench exited with {r.returncode}", "health": health}
        res = json.loads(out.read_text())
        return {"health": health, "single_tok_s": res["single"]["median_decode_tok_s"],
                "ttft_s": res["single"]["median_ttft_s"], "aggregate_tok_s": res["aggregate"]["aggregate_tok_s"],
                "clients_ok": res["aggregate"]["clients_ok"]}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def run_figures(run_dir: Path) -> dict:
    f = run_dir / "run.json"
    if not f.is_file():
        return {}
    run = json.loads(f.read_text())
    keep = ("device", "precision", "tokens_per_s", "peak_memory_mb", "train_seconds", "final_loss",
            "trainable_params")
    return {k: run.get(k) for k in keep}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a few steps each, any device: checks the script only")
    ap.add_argument("--out", help="the markdown report (default: docs/gpu.md; with --smoke a temporary file)")
    ap.add_argument("--work", help="working folder (default: a temporary one)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="chattune-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else (work / "gpu.md" if args.smoke else ROOT / "docs" / "gpu.md")
    log_file = work / "log.txt"
    steps = 3 if args.smoke else 60
    started = time.perf_counter()
    results: dict = {"date": dt.date.today().isoformat(), "gpu": gpu_name(), "versions": versions(),
                     "smoke": args.smoke, "steps": {}}
    print(f"gpu check: {results['gpu']}; log: {log_file}", flush=True)

    def step(name: str, cmd: list[str], timeout: float = 600) -> bool:
        code, seconds, tail = chattune(cmd, log_file, timeout)
        results["steps"][name] = {"ok": code == 0, "exit": code, "seconds": round(seconds, 1),
                                  **({} if code == 0 else {"tail": tail})}
        print(f"  {name}: {'ok' if code == 0 else f'FAILED ({code})'} in {seconds:.0f} s", flush=True)
        return code == 0

    step("quickstart", ["quickstart", "--output-dir", str(work / "quickstart"), "--steps", str(steps)])
    data = train_data(work, args.smoke)
    common = [f"data.train={data}", "data.max_length=512", f"train.max_steps={steps}", "train.batch_size=8",
              "train.logging_steps=5", "train.save_steps=100000", "overwrite=true"]
    for method in ("lora", "qlora", "ptuning_v2", "freeze"):
        run_dir = work / method
        if step(f"train {method}", ["train", method, *common, f"output_dir={run_dir}"]):
            results["steps"][f"train {method}"].update(run_figures(run_dir))
    lora = work / "lora"
    if results["steps"]["train lora"]["ok"]:
        eval_out = work / "eval"
        if step("eval", ["eval", "--adapter", str(lora), "--data", str(data), "--limit", "8" if args.smoke else "64",
                         "--metrics", "rouge,bleu,loss", "--max-new-tokens", "16" if args.smoke else "128",
                         "--batch-size", "8", "--out", str(eval_out)]):
            m = json.loads((eval_out / "metrics.json").read_text())
            results["steps"]["eval"].update({k: m.get(k) for k in ("device", "precision", "rouge-l", "bleu-4", "loss",
                                                                    "generated_tokens_per_s", "peak_memory_mb")})
        start = time.perf_counter()
        results["steps"]["serve 8 clients"] = serve_check(lora, work, args.smoke, log_file)
        results["steps"]["serve 8 clients"]["seconds"] = round(time.perf_counter() - start, 1)
        print(f"  serve 8 clients: {results['steps']['serve 8 clients']}", flush=True)
    bench_out = work / "bench.json"
    if step("bench", ["bench", "model=bundled", f"samples={16 if args.smoke else 120}",
                      f"steps={2 if args.smoke else 30}", "batch_size=4", "max_length=256" if args.smoke else
                      "max_length=512", "recipes=tutorial,chattune", "eval_samples=0", f"out={bench_out}"]):
        b = json.loads(bench_out.read_text())
        results["steps"]["bench"].update({
            "ratios": b.get("ratios"),
            "mfu_percent": {k: r.get("mfu_percent") for k, r in b.get("recipes", {}).items()},
            "tokens_per_s": {k: r.get("tokens_per_s") for k, r in b.get("recipes", {}).items()}})
    results["seconds"] = round(time.perf_counter() - started, 1)
    write_report(results, out, work)
    print(f"gpu check: {sum(s.get('ok', 'error' not in s) for s in results['steps'].values())} of "
          f"{len(results['steps'])} steps ok in {results['seconds']:.0f} s; wrote {out}", flush=True)
    return 0 if all(s.get("ok", "error" not in s) for s in results["steps"].values()) else 1


def write_report(results: dict, out: Path, work: Path) -> None:
    lines = ["# GPU check", "",
             "`bash benchmarks/gpu_check.sh` on a machine with a CUDA GPU (after `pip install -e \".[test,qlora]\"`) runs "
             "quickstart, `train` lora / qlora / ptuning_v2 / freeze on the bundled model, eval, serve with 8 clients "
             "and `chattune bench`, and rewrites this page with what it measured. `--smoke` checks the script on any "
             "machine (a temporary report).", "",
             f"Last run by `bash benchmarks/gpu_check.sh` on {results['date']}: GPU {results['gpu']}; {results['versions']}; "
             f"{results['seconds']:.0f} s in all{' (SMOKE run: a few steps each, figures meaningless)' if results['smoke'] else ''}.",
             "", "| step | ok | seconds | figures |", "|---|---|---|---|"]
    for name, s in results["steps"].items():
        figures = {k: v for k, v in s.items() if k not in ("ok", "exit", "seconds", "tail")}
        ok = s.get("ok", "error" not in s)
        lines.append(f"| {name} | {'yes' if ok else 'NO'} | {s.get('seconds', '')} | "
                     f"`{json.dumps(figures, ensure_ascii=False)}` |")
    lines += ["", "Raw results: the JSON below; the full log stays in the working folder of the run.", "", "```json",
              json.dumps(results, indent=2, ensure_ascii=False), "```", ""]
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    tmp.replace(out)
    if out.parent != work:  # the working folder keeps a copy beside its log
        shutil.copy(out, work / "gpu.md")


if __name__ == "__main__":
    sys.exit(main())
